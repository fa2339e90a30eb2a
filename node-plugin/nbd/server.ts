import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import { Log } from '../../lib/logger';
import { nbdConnections } from '../../lib/metrics';
import { ArborError } from '../../store/errors';
import { Connection } from './connection';
import { ExportProvider } from './export';
import { maxConnections } from './limits';
import { TlsIdentity } from './tls-identity';

/** How long a client gets to send DISC after its last request finished at shutdown. */
const shutdownGraceMs = 2000;

/**
 * The NBD server: a unix socket for the local host (mode 0600) and optional TCP
 * listeners (with TLS unless on loopback, which the caller enforces; mutual TLS when
 * the identity has a CA).
 */
export class NbdServer {
  private readonly listeners: net.Server[] = [];
  private readonly connections = new Set<Connection>();
  private nextId = 1;
  private closing?: Promise<void>;
  private unixSocketPath?: string;

  constructor(
    private readonly exports: ExportProvider,
    private readonly log: Log,
  ) {}

  get connectionCount(): number {
    return this.connections.size;
  }

  /** Open connections by the export they chose (those still negotiating are not counted). */
  connectionsByExport(): Map<string, number> {
    const counts = new Map<string, number>();
    for (const connection of this.connections) {
      if (connection.exportName !== undefined) counts.set(connection.exportName, (counts.get(connection.exportName) ?? 0) + 1);
    }
    return counts;
  }

  async listenUnix(socketPath: string): Promise<void> {
    await removeStaleSocket(socketPath);
    await listenOwnerOnly(this.server({}), socketPath);
    this.unixSocketPath ??= socketPath;
    this.log.info('NBD server listening', { socket: socketPath });
  }

  /** Listens on TCP; returns the port (useful with port 0). */
  async listenTcp(host: string, port: number, identity?: TlsIdentity): Promise<number> {
    const server = this.server(identity ? { tls: { identity, required: true } } : {});
    await listen(server, { host, port });
    const bound = (server.address() as net.AddressInfo).port;
    this.log.info('NBD server listening', { host, port: bound, tls: identity ? (identity.mutual ? 'mutual' : 'server') : 'none' });
    return bound;
  }

  /** Stops accepting, lets every connection finish its requests, then closes them. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      for (const listener of this.listeners) listener.close();
      await Promise.all([...this.connections].map((c) => c.shutdown(shutdownGraceMs)));
    })();
    return this.closing;
  }

  /**
   * A connection from this process to its own server, for the kernel's NBD driver to
   * take over: made through a private listener, so the server's end of it is known.
   * `serverClosed` settles when that end closes; the kernel's device is dead from then
   * on. The listener is a socket file beside the public one, created 0600 (not an
   * abstract socket: any process in the network namespace could race to one of those)
   * and removed as soon as it has accepted.
   */
  async connectLocal(onread: net.OnReadOpts): Promise<{ socket: net.Socket; serverClosed: Promise<void> }> {
    if (this.closing) throw new ArborError('unavailable', 'the NBD server is shutting down');
    if (!this.unixSocketPath)
      throw new ArborError('failed-precondition', 'the NBD server has no unix socket: local connections are made beside it (--nbd-socket)');
    const listener = net.createServer({ pauseOnConnect: true, noDelay: true });
    const privatePath = `${this.unixSocketPath}.local-${randomBytes(8).toString('hex')}`;
    await listenOwnerOnly(listener, privatePath);
    try {
      const accepted = once(listener, 'connection') as Promise<[net.Socket]>;
      const socket = net.connect({ path: privatePath, onread });
      await once(socket, 'connect');
      const [raw] = await accepted;
      const connection = this.adopt(raw, { local: true });
      if (!connection) {
        socket.destroy();
        throw new ArborError('resource-exhausted', `the NBD server already holds ${maxConnections} connections`);
      }
      return { socket, serverClosed: connection.whenClosed() };
    } finally {
      listener.close();
      fs.rmSync(privatePath, { force: true });
    }
  }

  private server(options: ConnectionKind): net.Server {
    const server = net.createServer({ pauseOnConnect: true, noDelay: true }, (socket) => this.adopt(socket, options));
    server.on('error', (err) => this.log.error('NBD listener error', { error: err.message }));
    this.listeners.push(server);
    return server;
  }

  /** Serves an accepted socket; refuses it (undefined) past the connection limit or while shutting down. */
  private adopt(socket: net.Socket, options: ConnectionKind): Connection | undefined {
    if (this.closing || this.connections.size >= maxConnections) {
      socket.destroy();
      return undefined;
    }
    const connection = new Connection(socket, { exports: this.exports, log: this.log, tls: options.tls, local: options.local }, this.nextId++);
    this.connections.add(connection);
    nbdConnections.inc();
    void connection.whenClosed().then(() => {
      this.connections.delete(connection);
      nbdConnections.dec();
    });
    return connection;
  }
}

interface ConnectionKind {
  tls?: { identity: TlsIdentity; required: boolean };
  local?: boolean;
}

/** A unix socket only its owner (root, for the node plugin) may connect to: created 0600 from the start, the umask covering the window before chmod. */
async function listenOwnerOnly(server: net.Server, socketPath: string): Promise<void> {
  const previous = process.umask(0o177);
  try {
    await listen(server, { path: socketPath });
  } finally {
    process.umask(previous);
  }
  fs.chmodSync(socketPath, 0o600);
}

function listen(server: net.Server, options: net.ListenOptions): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(options, () => {
      server.off('error', reject);
      resolve();
    });
  });
}

/** A socket file left by a process that died is removed; one a live server answers on is not. */
async function removeStaleSocket(socketPath: string): Promise<void> {
  let stat: fs.Stats;
  try {
    stat = fs.statSync(socketPath);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw err;
  }
  if (!stat.isSocket()) throw new ArborError('invalid-argument', `${socketPath} exists and is not a socket; choose another --nbd-socket path`);
  const live = await new Promise<boolean>((resolve) => {
    const probe = net.connect(socketPath, () => (probe.destroy(), resolve(true)));
    probe.on('error', () => resolve(false));
  });
  if (live) throw new ArborError('busy', `another server is listening on ${socketPath}; stop it or choose another --nbd-socket path`);
  fs.unlinkSync(socketPath);
}
