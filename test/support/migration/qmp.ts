/**
 * A small QMP client: JSON lines over QEMU's unix socket, one command at a time in
 * flight per id, each with a timeout. Answers are `unknown` until a typed helper
 * below checks the fields it uses.
 */
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { maxQmpEvents, maxQmpLineBytes, qmpCommandTimeoutMs, qmpConnectTimeoutMs } from './limits';

export class QmpError extends Error {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`QMP ${command}: ${errorClass}: ${desc}`);
  }
}

export interface QmpEvent {
  event: string;
  data: unknown;
  /** performance.now() when it arrived. */
  atMs: number;
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

export class QmpClient {
  /** The newest events QEMU sent (at most `maxQmpEvents`). */
  readonly events: QmpEvent[] = [];
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private buffered = '';
  private closed?: Error;
  private greeted = false;
  private greetingWaiter?: { resolve: () => void; reject: (err: Error) => void };

  private constructor(
    private readonly socket: net.Socket,
    private readonly name: string,
  ) {
    socket.setEncoding('utf8');
    socket.on('data', (text: string) => this.take(text));
    const end = (err?: Error) => this.fail(new Error(`QMP of ${name}: the connection ${err ? `failed: ${err.message}` : 'closed'}`));
    socket.on('error', end);
    socket.on('close', () => end());
  }

  /**
   * Connects (retrying until QEMU has made the socket, or `isAlive` says QEMU is gone),
   * reads the greeting and leaves capabilities negotiation mode.
   */
  static async connect(socketPath: string, name: string, isAlive: () => boolean, timeoutMs = qmpConnectTimeoutMs): Promise<QmpClient> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      if (!isAlive()) throw new Error(`${name} ended before its QMP socket ${socketPath} answered`);
      const socket = await connectOnce(socketPath);
      if (socket) {
        const client = new QmpClient(socket, name);
        await client.greeting(Math.max(1, deadline - performance.now()));
        await client.execute('qmp_capabilities');
        return client;
      }
      if (performance.now() > deadline) throw new Error(`${name}: no QMP socket at ${socketPath} within ${timeoutMs / 1000} s`);
      await sleep(50);
    }
  }

  /** Runs `command`; its "return", or a QmpError with QEMU's words. */
  execute(command: string, args?: Record<string, unknown>, timeoutMs = qmpCommandTimeoutMs): Promise<unknown> {
    if (this.closed) return Promise.reject(this.closed);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`QMP of ${this.name}: no answer to ${command} within ${timeoutMs / 1000} s`));
      }, timeoutMs);
      this.pending.set(id, { command, resolve, reject, timer });
      this.socket.write(JSON.stringify(args ? { execute: command, arguments: args, id } : { execute: command, id }) + '\n');
    });
  }

  close(): void {
    this.socket.destroy();
  }

  private greeting(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`QMP of ${this.name}: no greeting within ${timeoutMs / 1000} s`)), timeoutMs);
      this.greetingWaiter = {
        resolve: () => (clearTimeout(timer), resolve()),
        reject: (err) => (clearTimeout(timer), reject(err)),
      };
      if (this.greeted) this.greetingWaiter.resolve();
      else if (this.closed) this.greetingWaiter.reject(this.closed);
    });
  }

  private take(text: string): void {
    this.buffered += text;
    let newline: number;
    while ((newline = this.buffered.indexOf('\n')) >= 0) {
      const line = this.buffered.slice(0, newline).trim();
      this.buffered = this.buffered.slice(newline + 1);
      if (line !== '') this.message(line);
    }
    if (this.buffered.length > maxQmpLineBytes) {
      this.fail(new Error(`QMP of ${this.name}: a line longer than ${maxQmpLineBytes} bytes`));
      this.socket.destroy();
    }
  }

  private message(line: string): void {
    let message: unknown;
    try {
      message = JSON.parse(line);
    } catch {
      return this.fail(new Error(`QMP of ${this.name}: not JSON: ${line.slice(0, 200)}`));
    }
    if (!isRecord(message)) return this.fail(new Error(`QMP of ${this.name}: not an object: ${line.slice(0, 200)}`));
    if ('QMP' in message) {
      this.greeted = true;
      this.greetingWaiter?.resolve();
      this.greetingWaiter = undefined;
      return;
    }
    if (typeof message.event === 'string') {
      this.events.push({ event: message.event, data: message.data, atMs: performance.now() });
      if (this.events.length > maxQmpEvents) this.events.splice(0, this.events.length - maxQmpEvents);
      return;
    }
    const waiter = typeof message.id === 'number' ? this.pending.get(message.id) : undefined;
    if (!waiter) return;
    this.pending.delete(message.id as number);
    clearTimeout(waiter.timer);
    if ('return' in message) return waiter.resolve(message.return);
    const error = isRecord(message.error) ? message.error : {};
    waiter.reject(new QmpError(waiter.command, String(error.class ?? 'unknown'), String(error.desc ?? line)));
  }

  private fail(err: Error): void {
    this.closed ??= err;
    this.greetingWaiter?.reject(err);
    this.greetingWaiter = undefined;
    for (const waiter of this.pending.values()) {
      clearTimeout(waiter.timer);
      waiter.reject(err);
    }
    this.pending.clear();
  }
}

function connectOnce(socketPath: string): Promise<net.Socket | undefined> {
  return new Promise((resolve) => {
    const socket = net.connect(socketPath);
    socket.once('connect', () => {
      socket.removeAllListeners('error');
      resolve(socket);
    });
    socket.once('error', () => {
      socket.destroy();
      resolve(undefined);
    });
  });
}

export function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

// ---------------------------------------------------------------------------
// Typed commands

/** query-migrate's answer, the fields the harness reads. */
export interface MigrationInfo {
  /** 'none', 'setup', 'active', 'device', 'completed', 'failed', 'cancelling', 'cancelled', ... */
  status: string;
  totalTimeMs?: number;
  downtimeMs?: number;
  setupTimeMs?: number;
  ramTransferredBytes?: number;
  errorDesc?: string;
}

export async function queryMigrate(qmp: QmpClient): Promise<MigrationInfo> {
  const info = await qmp.execute('query-migrate');
  if (!isRecord(info)) throw new Error(`query-migrate answered ${JSON.stringify(info)}`);
  const number = (value: unknown) => (typeof value === 'number' ? value : undefined);
  const ram = isRecord(info.ram) ? info.ram : {};
  return {
    // No migration yet: QEMU leaves "status" out.
    status: typeof info.status === 'string' ? info.status : 'none',
    totalTimeMs: number(info['total-time']),
    downtimeMs: number(info.downtime),
    setupTimeMs: number(info['setup-time']),
    ramTransferredBytes: number(ram.transferred),
    errorDesc: typeof info['error-desc'] === 'string' ? info['error-desc'] : undefined,
  };
}

/** query-status's run state: 'running', 'inmigrate', 'postmigrate', 'paused', 'finish-migrate', ... */
export async function queryStatus(qmp: QmpClient): Promise<string> {
  const info = await qmp.execute('query-status');
  if (!isRecord(info) || typeof info.status !== 'string') throw new Error(`query-status answered ${JSON.stringify(info)}`);
  return info.status;
}

/** Writes and flushes the guest's disk (the first block device) sent to its backend in this QEMU: block stats do not migrate. */
export async function queryDiskOperations(qmp: QmpClient): Promise<{ writes: number; flushes: number }> {
  const devices = await qmp.execute('query-blockstats');
  const stats = Array.isArray(devices) && isRecord(devices[0]) && isRecord(devices[0].stats) ? devices[0].stats : undefined;
  if (!stats || typeof stats.wr_operations !== 'number' || typeof stats.flush_operations !== 'number') {
    throw new Error(`query-blockstats answered ${JSON.stringify(devices)}`);
  }
  return { writes: stats.wr_operations, flushes: stats.flush_operations };
}
