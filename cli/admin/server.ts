import fs from 'node:fs';
import net from 'node:net';
import readline from 'node:readline';
import { Log } from '../../lib/logger';
import { isArborError } from '../../store/errors';
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
  private readonly sockets = new Set<net.Socket>();

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

  /** Stops listening and hangs up on clients still connected (they reconnect to the next server). */
  close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const socket of this.sockets) socket.destroy();
    return closed;
  }

  private serve(socket: net.Socket): void {
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
      void this.answer(socket, line);
    });
  }

  private async answer(socket: net.Socket, line: string): Promise<void> {
    let id: unknown = null;
    try {
      if (line.length > maxRequestBytes) throw Object.assign(new Error('request too large'), { code: 'invalid-argument' });
      const request = JSON.parse(line) as { id?: unknown; method?: unknown; args?: unknown };
      id = request.id ?? null;
      const result = request.method === 'serverInfo' ? this.info : await dispatch(this.store, request.method, request.args ?? []);
      socket.write(JSON.stringify({ id, result: result ?? null }) + '\n');
    } catch (err) {
      const code = isArborError(err) ? err.code : err instanceof SyntaxError ? 'invalid-argument' : 'internal';
      if (code === 'internal') this.log.error('admin request failed', { error: (err as Error).message });
      socket.write(JSON.stringify({ id, error: { code, message: (err as Error).message } }) + '\n');
    }
  }
}
