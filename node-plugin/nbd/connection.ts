import net from 'node:net';
import tls from 'node:tls';
import { Log } from '../../lib/logger';
import { ByteQueue } from './byte-queue';
import { ExportProvider } from './export';
import { negotiate, ProtocolError } from './handshake';
import { handOffGraceMs, handshakeTimeoutMs, socketReadBytes } from './limits';
import { peerRefusal, TlsIdentity } from './tls-identity';
import { ReplySink, Transmission } from './transmission';

export interface ConnectionOptions {
  exports: ExportProvider;
  log: Log;
  /** Present on TCP listeners with TLS; `required` is FORCEDTLS. */
  tls?: { identity: TlsIdentity; required: boolean };
  /** Made by this process for the kernel's NBD driver (NbdServer.connectLocal): stopped without refusals at shutdown. */
  local?: boolean;
}

type Phase = 'handshake' | 'transmission' | 'closed';

/**
 * One client connection: the handshake, then the transmission phase. Unix-socket
 * connections read into one reused buffer (net's `onread`), so receiving costs no
 * allocation; TCP connections read 'data' events (TLS may wrap them mid-handshake).
 */
export class Connection implements ReplySink {
  private phase: Phase = 'handshake';
  private socket: net.Socket;
  private readonly handshakeBytes = new ByteQueue();
  private transmission?: Transmission;
  private pending: Array<{ data: Buffer; release?: () => void }> = [];
  private flushScheduled = false;
  private readPauses = 0;
  private endRequested = false;
  private readonly closed: Promise<void>;
  private markClosed!: () => void;
  exportName?: string;
  /** Another node, over TCP; a unix socket is this host. */
  private readonly remote: boolean;

  constructor(
    raw: net.Socket,
    private readonly options: ConnectionOptions,
    readonly id: number,
  ) {
    this.closed = new Promise((resolve) => (this.markClosed = resolve));
    this.remote = raw.remoteAddress !== undefined;
    if (raw.remoteAddress === undefined && !options.tls) {
      // A unix socket: take its handle over with a caller-owned read buffer. The
      // listener accepted it paused, so no byte has been read into another buffer.
      const buffer = Buffer.allocUnsafe(socketReadBytes);
      const handle = (raw as unknown as { _handle: unknown })._handle;
      (raw as unknown as { _handle: unknown })._handle = null;
      // Asked before each read where its bytes go: the shared buffer, or the rest of a large WRITE payload.
      const nextReadBuffer = () => (this.phase === 'transmission' && this.transmission!.payloadSpace()) || buffer;
      this.socket = new net.Socket({
        handle: handle as never,
        onread: {
          buffer: nextReadBuffer,
          callback: (n: number, buf: Buffer) => (buf === buffer ? this.onBytes(buf, 0, n) : this.payloadRead(buf, n), true),
        },
      } as net.SocketConstructorOpts);
    } else {
      this.socket = raw;
      raw.on('data', (data: Buffer) => this.onBytes(data, 0, data.length));
    }
    this.watch(this.socket);
    this.socket.resume();
    void this.run();
  }

  /** Resolves when the socket is closed. */
  whenClosed(): Promise<void> {
    return this.closed;
  }

  /**
   * Server shutdown: refuse new requests, finish the ones in flight, then close. The
   * kernel's connections are not refused anything (ESHUTDOWN would fail the I/O): they
   * stop being read, what was read is answered, then they close, and the kernel sends
   * what was never read again to the next process.
   */
  async shutdown(graceMs: number): Promise<void> {
    if (this.phase === 'handshake') {
      this.destroy('the server is shutting down');
      return;
    }
    if (this.transmission && this.options.local) return this.handOff(graceMs);
    if (this.transmission) {
      await this.transmission.shutdown();
      // Give the client a moment to send DISC itself before we hang up.
      const timer = setTimeout(() => this.end(), graceMs);
      await this.closed;
      clearTimeout(timer);
    }
  }

  /**
   * Stops reading requests without refusing any (no ESHUTDOWN, which would fail the
   * I/O), answers what was read, and closes: the client sends the rest again, to the
   * next process (the kernel) or to wherever the volume is served now (a relay).
   */
  async handOff(graceMs: number): Promise<void> {
    if (!this.transmission) {
      this.destroy('handed off during the handshake');
      return;
    }
    await this.transmission.stopTakingRequests();
    // The replies are in the client's socket once written ('finish'): then close, not waiting for an end we no longer read.
    const finished = new Promise((resolve) => this.socket.once('finish', resolve));
    this.end();
    const timer = setTimeout(() => this.destroy(`the replies were not written within ${graceMs} ms`), graceMs);
    await Promise.race([finished, this.closed]);
    clearTimeout(timer);
    this.socket.destroy();
    await this.closed;
  }

  // ---- ReplySink ----

  send(data: Buffer, release?: () => void): void {
    if (this.phase === 'closed') {
      release?.();
      return;
    }
    this.pending.push({ data, release });
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      // Everything completed in this turn of the event loop goes out in one write.
      setImmediate(() => this.flushReplies());
    }
  }

  pauseReading(): void {
    if (this.readPauses++ === 0) this.socket.pause();
  }

  resumeReading(): void {
    if (--this.readPauses === 0 && this.phase !== 'closed') this.socket.resume();
  }

  end(): void {
    this.endRequested = true;
    if (!this.flushScheduled) this.socket.end();
  }

  destroy(reason: string): void {
    if (this.phase === 'closed') return;
    this.options.log.warn('closing NBD connection', { connection: this.id, export: this.exportName, reason });
    this.socket.destroy();
  }

  // ---- internals ----

  private async run(): Promise<void> {
    const timer = setTimeout(() => this.destroy(`no transmission after ${handshakeTimeoutMs} ms`), handshakeTimeoutMs);
    try {
      const negotiated = await negotiate(
        {
          read: (n) => this.handshakeBytes.read(n),
          write: (data) => this.socket.write(data),
          startTls: this.options.tls ? () => this.startTls() : undefined,
        },
        {
          exports: this.options.exports,
          tlsRequired: this.options.tls?.required ?? false,
          log: this.options.log,
          client: { remote: this.remote, handOff: () => void this.handOff(handOffGraceMs) },
        },
      );
      if (!negotiated) {
        this.socket.end();
        return;
      }
      this.exportName = negotiated.export.name;
      this.transmission = new Transmission(negotiated.export, negotiated, this, this.options.log);
      this.phase = 'transmission';
      const rest = this.handshakeBytes.drain();
      if (rest.length) this.transmission.receive(rest, 0, rest.length);
      this.options.log.debug('NBD client entered transmission', {
        connection: this.id,
        export: negotiated.export.name,
        structuredReplies: negotiated.structuredReplies,
        extendedHeaders: negotiated.extendedHeaders,
      });
    } catch (err) {
      if (err instanceof ProtocolError) this.destroy(err.message);
      else if (this.phase !== 'closed') this.destroy(`handshake failed: ${(err as Error).message}`);
    } finally {
      clearTimeout(timer);
    }
  }

  private payloadRead(space: Buffer, n: number): void {
    if (this.phase === 'transmission') this.transmission!.payloadRead(space, n);
  }

  private onBytes(buf: Buffer, start: number, end: number): void {
    if (this.phase === 'transmission') this.transmission!.receive(buf, start, end);
    else if (this.phase === 'handshake') this.handshakeBytes.push(buf.subarray(start, end));
  }

  private async startTls(): Promise<void> {
    const raw = this.socket;
    raw.removeAllListeners('data');
    const { identity } = this.options.tls!;
    // Mutual TLS: the client's certificate must chain to the cluster CA, or the handshake fails.
    const secure = new tls.TLSSocket(raw, {
      isServer: true,
      secureContext: identity.serverContext(),
      requestCert: identity.mutual,
      rejectUnauthorized: identity.mutual,
    });
    this.socket = secure;
    this.watch(secure);
    secure.on('data', (data: Buffer) => this.onBytes(data, 0, data.length));
    await new Promise<void>((resolve, reject) => {
      secure.once('secure', resolve);
      secure.once('error', reject);
      secure.once('close', () => reject(new Error('closed during the TLS handshake')));
    });
    const refusal = identity.mutual ? peerRefusal(secure) : undefined;
    if (refusal) {
      secure.destroy();
      throw new Error(refusal);
    }
  }

  private watch(socket: net.Socket): void {
    socket.on('error', (err) => this.options.log.debug('NBD socket error', { connection: this.id, error: err.message }));
    socket.once('close', () => {
      const wasOpen = this.phase !== 'closed';
      this.phase = 'closed';
      this.handshakeBytes.end(new Error('connection closed'));
      for (const { release } of this.pending.splice(0)) release?.();
      if (wasOpen && this.transmission) void this.transmission.connectionClosed().finally(() => this.markClosed());
      else if (wasOpen) this.markClosed();
    });
    socket.on('drain', () => {
      if (this.writeBlocked) {
        this.writeBlocked = false;
        this.resumeReading();
      }
    });
  }

  private writeBlocked = false;

  private flushReplies(): void {
    this.flushScheduled = false;
    const batch = this.pending;
    this.pending = [];
    if (this.phase === 'closed') {
      for (const { release } of batch) release?.();
      return;
    }
    this.socket.cork();
    for (const { data, release } of batch) this.socket.write(data, release && (() => release()));
    this.socket.uncork();
    if (this.socket.writableNeedDrain && !this.writeBlocked) {
      // The client is not reading its replies: stop reading its requests.
      this.writeBlocked = true;
      this.pauseReading();
    }
    if (this.endRequested) this.socket.end();
  }
}
