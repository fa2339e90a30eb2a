import fs from 'node:fs';
import net from 'node:net';
import readline from 'node:readline';
import tls from 'node:tls';
import { Log } from '../../lib/logger';
import { peerRefusal, TlsIdentity } from '../../node-plugin/nbd/tls-identity';
import { ArborError, isArborError } from '../../store/errors';
import { Store } from '../../store/store';
import { dispatch } from './methods';

/** What the admin socket tells a CLI about the server it is talking to. */
export interface ServerInfo {
  pid: number;
  nbdSocket?: string;
}

/** Largest admin request line: these are small JSON calls. */
const maxRequestBytes = 64 * 1024;

/**
 * The local admin socket of `arbor serve` (mode 0600 in the data directory): one
 * JSON object per line each way, `{id, method, args}` → `{id, result}` or
 * `{id, error: {code, message}}`. It lets the CLI work on a data directory the
 * server holds, with every change going through the server's own store (so a
 * snapshot of a volume being written is taken by its owner).
 */
export class AdminServer {
  private readonly server: net.Server;
  private readonly remote: net.Server[] = [];
  private readonly sockets = new Set<net.Socket>();
  /** Calls the server answers itself, beside the store's (see handle). */
  private readonly handlers = new Map<string, (args: unknown[]) => Promise<unknown>>();

  private constructor(
    private readonly store: Store,
    private readonly info: ServerInfo,
    private readonly log: Log,
  ) {
    this.server = net.createServer((socket) => this.serve(socket));
  }

  static async listen(socketPath: string, store: Store, info: ServerInfo, log: Log): Promise<AdminServer> {
    // The data directory is ours (we hold its lock): a socket file left there is stale.
    fs.rmSync(socketPath, { force: true });
    const admin = new AdminServer(store, info, log);
    const previous = process.umask(0o177);
    try {
      await new Promise<void>((resolve, reject) => {
        admin.server.once('error', reject);
        admin.server.listen(socketPath, () => resolve());
      });
    } finally {
      process.umask(previous);
    }
    return admin;
  }

  /**
   * Also answers other nodes over TCP with mutual TLS (their certificates signed by
   * the cluster CA), but only the calls in `methods`: what a node plugin without the
   * data asks of the data node (to register itself, to look a volume up), never a
   * change to a volume. Returns the port.
   */
  async listenTls(host: string, port: number, identity: TlsIdentity, methods: readonly string[]): Promise<number> {
    if (!identity.mutual) throw new Error('the admin API over TCP needs mutual TLS (a CA)');
    const allowed = new Set(methods);
    const server = net.createServer((raw) => {
      raw.on('error', () => {});
      const secure = new tls.TLSSocket(raw, { isServer: true, secureContext: identity.serverContext(), requestCert: true, rejectUnauthorized: true });
      secure.on('error', (err) => this.log.debug('admin TLS connection failed', { remote: raw.remoteAddress, error: err.message }));
      secure.once('secure', () => {
        const refusal = peerRefusal(secure);
        if (refusal === undefined) return this.serve(secure, allowed);
        this.log.warn('admin API: a node was refused', { remote: raw.remoteAddress, reason: refusal });
        secure.destroy();
      });
    });
    this.remote.push(server);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host, port }, () => resolve());
    });
    return (server.address() as net.AddressInfo).port;
  }

  /** Answers `method` with `fn` (work of the server's own, such as moving a volume it serves); local socket only. */
  handle(method: string, fn: (args: unknown[]) => Promise<unknown>): void {
    this.handlers.set(method, fn);
  }

  /** Stops listening and hangs up on clients still connected (they reconnect to the next server). */
  close(): Promise<void> {
    const closed = Promise.all([this.server, ...this.remote].map((server) => new Promise<void>((resolve) => server.close(() => resolve()))));
    for (const socket of this.sockets) socket.destroy();
    return closed.then(() => undefined);
  }

  private serve(socket: net.Socket, allowed?: Set<string>): void {
    this.sockets.add(socket);
    socket.once('close', () => this.sockets.delete(socket));
    socket.on('error', () => {});
    const lines = readline.createInterface({ input: socket, crlfDelay: Infinity });
    let received = 0;
    socket.on('data', (chunk: Buffer) => {
      received += chunk.length;
      if (received > maxRequestBytes * 64) socket.destroy();
    });
    lines.on('line', (line) => {
      received = 0;
      void this.answer(socket, line, allowed);
    });
  }

  private async answer(socket: net.Socket, line: string, allowed: Set<string> | undefined): Promise<void> {
    let id: unknown = null;
    try {
      if (line.length > maxRequestBytes) throw Object.assign(new Error('request too large'), { code: 'invalid-argument' });
      const request = JSON.parse(line) as { id?: unknown; method?: unknown; args?: unknown };
      id = request.id ?? null;
      if (allowed && !allowed.has(String(request.method))) {
        throw new ArborError('failed-precondition', `${String(request.method)} is not offered to other nodes; run it on the data node`);
      }
      const handler = typeof request.method === 'string' ? this.handlers.get(request.method) : undefined;
      const result =
        request.method === 'serverInfo'
          ? this.info
          : handler
            ? await handler(Array.isArray(request.args) ? request.args : [])
            : await dispatch(this.store, request.method, request.args ?? []);
      socket.write(JSON.stringify({ id, result: result ?? null }) + '\n');
    } catch (err) {
      const code = isArborError(err) ? err.code : err instanceof SyntaxError ? 'invalid-argument' : 'internal';
      if (code === 'internal') this.log.error('admin request failed', { error: (err as Error).message });
      socket.write(JSON.stringify({ id, error: { code, message: (err as Error).message } }) + '\n');
    }
  }
}
