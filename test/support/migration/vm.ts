/**
 * One QEMU of a migration: the guest (guest.ts) on an NBD export through QEMU's own
 * NBD client, its serial console on QEMU's stdout (read here, with arrival times),
 * QMP on a unix socket. A source boots; a target starts with `-incoming` and waits.
 * Source and target command lines differ only in that, as a migration requires, and
 * in the disk's socket when each VM reaches the volume through its own node's server.
 *
 * QEMU is signalled by PID while it is this process's unreaped child, and never
 * outlives the test process: it is killed in an exit hook, and where util-linux's
 * setpriv is there, the kernel kills it even if the test process is SIGKILLed.
 */
import { ChildProcess, spawn } from 'node:child_process';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { have } from '../run';
import { ConsoleLog } from './console';
import { GuestImage } from './guest';
import { defaultMemoryMiB, maxStderrBytes, pollEveryMs, quitTimeoutMs } from './limits';
import { QmpClient, queryStatus } from './qmp';
import { guestMarker } from './stamp';

/** An NBD export on a unix socket, as QEMU's NBD client names it. */
export interface NbdExport {
  socketPath: string;
  exportName: string;
  /**
   * QEMU's reconnect-delay: when the server goes away, requests wait this long for it
   * to come back (what a kernel nbd device's dead-connection timeout does for a VM on
   * a real node); unset, they fail at once.
   */
  reconnectDelaySeconds?: number;
}

export interface VmOptions {
  /** 'source', 'target': for messages and file names. */
  name: string;
  guest: GuestImage;
  disk: NbdExport;
  /** Where its QMP socket goes (and an incoming migration's). */
  dir: string;
  memoryMiB?: number;
  /** Wait for a migration on this unix socket instead of booting. */
  incomingSocket?: string;
}

const live = new Set<ChildProcess>();
let exitHookInstalled = false;

function killAllOnExit(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.once('exit', () => {
    for (const child of live) {
      try {
        process.kill(child.pid!, 'SIGKILL');
      } catch {
        // already gone
      }
    }
  });
}

export class MigrationVm {
  readonly console = new ConsoleLog();
  readonly exited: Promise<string>;
  private stderr = '';
  private ended?: string;
  /** Set on 'exit': QEMU is reaped and its PID may be reused, so it is never signalled again. */
  private reaped = false;
  private qmpClient?: QmpClient;

  private constructor(
    readonly name: string,
    private readonly child: ChildProcess,
    readonly qmpSocket: string,
    /** `unix:<path>` for a target: what the source's `migrate` is given. */
    readonly incomingUri: string | undefined,
  ) {
    // 'close', not 'exit': by then QEMU's stdout has been read to its end, so the console holds every line the guest got out.
    child.once('exit', () => {
      this.reaped = true;
      live.delete(child);
    });
    this.exited = new Promise((resolve) =>
      child.once('close', (code, signal) => {
        this.ended = signal ?? `exit ${code}`;
        resolve(this.ended);
      }),
    );
    child.stdout!.on('data', (data: Buffer) => {
      if (!this.console.push(data)) this.kill().catch(() => undefined);
    });
    child.stderr!.on('data', (data: Buffer) => {
      this.stderr = (this.stderr + data.toString()).slice(-maxStderrBytes);
    });
  }

  static async start(options: VmOptions): Promise<MigrationVm> {
    for (const word of [options.disk.socketPath, options.disk.exportName, options.dir, options.guest.initrd, options.incomingSocket ?? '']) {
      if (/[,\s]/.test(word)) throw new Error(`${options.name}: ${JSON.stringify(word)} holds a comma or white space, which QEMU's option syntax cannot carry`);
    }
    const qmpSocket = `${options.dir}/${options.name}.qmp`;
    const qemuArgs = [
      '-name', options.name,
      '-accel', 'tcg', '-m', String(options.memoryMiB ?? defaultMemoryMiB), '-smp', '1',
      '-nodefaults', '-no-user-config', '-no-reboot', '-display', 'none', '-monitor', 'none',
      '-chardev', 'stdio,id=console,signal=off', '-serial', 'chardev:console',
      '-qmp', `unix:${qmpSocket},server=on,wait=off`,
      '-kernel', options.guest.kernel.vmlinuz, '-initrd', options.guest.initrd, '-append', options.guest.append,
      // QEMU's own NBD client; the guest's writeback cache is on, so its fsync reaches the export as NBD_CMD_FLUSH.
      '-blockdev', `driver=nbd,node-name=disk0,server.type=unix,server.path=${options.disk.socketPath},export=${options.disk.exportName},cache.direct=on${options.disk.reconnectDelaySeconds === undefined ? '' : `,reconnect-delay=${options.disk.reconnectDelaySeconds}`}`,
      '-device', 'virtio-blk-pci,drive=disk0,id=vda',
    ]; // prettier-ignore
    if (options.incomingSocket) qemuArgs.push('-incoming', `unix:${options.incomingSocket}`);
    // setpriv --pdeathsig: the kernel kills QEMU when the test process dies, however it dies.
    const [command, args] = have('setpriv') ? ['setpriv', ['--pdeathsig', 'KILL', '--', 'qemu-system-x86_64', ...qemuArgs]] : ['qemu-system-x86_64', qemuArgs];
    const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    if (child.pid === undefined) throw new Error(`${options.name}: could not start qemu-system-x86_64 (is qemu-system-x86 installed?)`);
    killAllOnExit();
    live.add(child);
    const vm = new MigrationVm(options.name, child, qmpSocket, options.incomingSocket ? `unix:${options.incomingSocket}` : undefined);
    try {
      vm.qmpClient = await QmpClient.connect(qmpSocket, options.name, () => vm.running());
    } catch (err) {
      await vm.kill();
      throw vm.failure(`did not start: ${(err as Error).message}`);
    }
    return vm;
  }

  get pid(): number {
    return this.child.pid!;
  }

  get qmp(): QmpClient {
    if (!this.qmpClient) throw new Error(`${this.name}: QMP is not connected`);
    return this.qmpClient;
  }

  running(): boolean {
    return this.ended === undefined;
  }

  /** An error naming the VM, with QEMU's stderr and the tail of the guest's console. */
  failure(what: string): Error {
    const state = this.ended === undefined ? `pid ${this.pid}` : `pid ${this.pid}, ended: ${this.ended}`;
    return new Error(
      `${this.name} (qemu-system-x86_64, ${state}) ${what}\n` +
        `--- QEMU's stderr:\n${this.stderr.trimEnd() || '(nothing)'}\n--- the guest's console, last lines:\n${this.console.tail(30)}`,
    );
  }

  /** Resolves once this VM's console reported `count` writes; fails if QEMU ends, the guest's dd fails, or time runs out. */
  async waitForWrites(count: number, timeoutMs: number): Promise<void> {
    await this.waitUntil(`reported ${count} writes`, timeoutMs, () => this.console.writes.length >= count);
  }

  /** Polls `done` until it is true; fails like `waitForWrites`. */
  async waitUntil(what: string, timeoutMs: number, done: () => boolean): Promise<void> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      if (this.console.failures.length > 0) throw this.failure(`has a guest whose write failed (${this.console.failures[0]}), waiting until it ${what}`);
      if (done()) return;
      if (!this.running()) throw this.failure(`ended before it ${what}${this.guestHint()}`);
      if (performance.now() > deadline)
        throw this.failure(`has not ${what} within ${timeoutMs / 1000} s (${this.console.writes.length} so far)${this.guestHint()}`);
      await sleep(pollEveryMs);
    }
  }

  async status(): Promise<string> {
    return queryStatus(this.qmp);
  }

  /** QMP quit, SIGKILL if QEMU has not exited within `quitTimeoutMs`. */
  async quit(): Promise<void> {
    if (!this.running()) return this.qmpClient?.close();
    await this.qmpClient?.execute('quit').catch(() => undefined);
    const timer = setTimeout(() => this.signal('SIGKILL'), quitTimeoutMs);
    await this.exited;
    clearTimeout(timer);
    this.qmpClient?.close();
  }

  /** SIGKILL, then waits for the exit. */
  async kill(): Promise<void> {
    this.signal('SIGKILL');
    await this.exited;
    this.qmpClient?.close();
  }

  private signal(signal: NodeJS.Signals): void {
    if (!this.reaped) process.kill(this.pid, signal);
  }

  private guestHint(): string {
    const said = this.console
      .text()
      .split('\n')
      .filter((line) => line.includes(guestMarker) || /Kernel panic|Oops|BUG:/.test(line));
    return said.length > 0 ? `\nthe guest said:\n${said.slice(-10).join('\n')}` : '';
  }
}
