import net from 'node:net';
import readline from 'node:readline';
import tls from 'node:tls';
import { TlsIdentity } from '../../node-plugin/nbd/tls-identity';
import { ArborError, ErrorCode } from '../../store/errors';
import { AdminMethod, StoreApi, adminMethods } from './methods';
import { ServerInfo } from './server';
import type { MoveReport } from '../move';
import type { MoveRequest } from '../move-request';
import type { ServerStatus } from '../status';

/** Talks to a running `arbor serve` over its admin socket; offers the same calls as the store. */
export class AdminClient {
  private nextId = 1;
  private readonly waiting = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  readonly api: StoreApi;

  private constructor(private readonly socket: net.Socket) {
    readline.createInterface({ input: socket, crlfDelay: Infinity }).on('line', (line) => this.onLine(line));
    socket.on('close', () => this.failAll(new ArborError('unavailable', 'the server closed its admin socket')));
    socket.on('error', () => {});
    const api: Record<string, unknown> = {};
    for (const method of Object.keys(adminMethods) as AdminMethod[]) api[method] = (...args: unknown[]) => this.call(method, args);
    this.api = api as unknown as StoreApi;
  }

  /** Connects, or returns undefined when no server answers on the socket. */
  static async connect(socketPath: string): Promise<AdminClient | undefined> {
    const socket = net.connect(socketPath);
    const connected = await new Promise<boolean>((resolve) => {
      socket.once('connect', () => resolve(true));
      socket.once('error', () => resolve(false));
    });
    if (!connected) {
      socket.destroy();
      return undefined;
    }
    return new AdminClient(socket);
  }

  /** Connects to another node's admin API over TCP with mutual TLS (the calls it offers other nodes only). */
  static async connectTls(host: string, port: number, identity: TlsIdentity): Promise<AdminClient> {
    const socket = tls.connect({ host, port, ...identity.clientOptions() });
    await new Promise<void>((resolve, reject) => {
      socket.once('secureConnect', resolve);
      socket.once('error', (err) =>
        reject(new ArborError('unavailable', `cannot reach the admin API of ${host}:${port} over TLS (${err.message}); check that node and the certificates`)),
      );
    });
    return new AdminClient(socket);
  }

  serverInfo(): Promise<ServerInfo> {
    return this.call('serverInfo', []) as Promise<ServerInfo>;
  }

  /** What the server holds now: open volumes, connections, data not yet committed, the last gc (`arbor status`). */
  serverStatus(): Promise<ServerStatus> {
    return this.call('serverStatus', []) as Promise<ServerStatus>;
  }

  /** Asks the server to move a volume it holds to another store (a long call: the move's rounds run in the server). */
  moveVolume(request: MoveRequest): Promise<MoveReport> {
    return this.call('moveVolume', [request]) as Promise<MoveReport>;
  }

  close(): void {
    this.socket.end();
  }

  private call(method: string, args: unknown[]): Promise<unknown> {
    const id = this.nextId++;
    this.socket.write(JSON.stringify({ id, method, args: args.map((a) => (a === undefined ? null : a)) }) + '\n');
    return new Promise((resolve, reject) => this.waiting.set(id, { resolve, reject }));
  }

  private onLine(line: string): void {
    const reply = JSON.parse(line) as { id: number; result?: unknown; error?: { code: ErrorCode; message: string } };
    const waiter = this.waiting.get(reply.id);
    if (!waiter) return;
    this.waiting.delete(reply.id);
    if (reply.error) waiter.reject(new ArborError(reply.error.code, reply.error.message));
    else waiter.resolve(reply.result === null ? undefined : reply.result);
  }

  private failAll(err: Error): void {
    for (const waiter of this.waiting.values()) waiter.reject(err);
    this.waiting.clear();
  }
}
