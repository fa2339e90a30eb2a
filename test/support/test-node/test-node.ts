/**
 * The test node: a QEMU virtual machine (TCG, no KVM here) running the host's Debian
 * kernel, for everything that needs a real kernel's NBD driver. The host's root is
 * shared read-only over 9p and the guest chroots into it, so it runs the host's
 * Node.js, tools and built project with nothing copied; /tmp and /run in the guest
 * are its own tmpfs. An agent inside (agent.ts) runs what the tests ask over a
 * virtio-serial port. No network device: the guest reaches nothing.
 *
 * One boot per suite: `TestNode.boot()` in `before`, `shutdown()` in `after`.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { Daemon, daemonTempDir, sleep, spawnDaemon } from '../etcd';
import { have } from '../run';
import { buildInitramfs, consoleMarker, KernelFiles } from './initramfs';
import { AgentError, AgentMessage, AgentRequest, agentPortName, CsiService, ExecResult } from './protocol';

export interface TestNodeOptions {
  memoryMiB?: number;
  cpus?: number;
  /** From starting QEMU to the agent's first word. */
  bootTimeoutMs?: number;
}

/** Node.js starts in 5 to 30 s under TCG on a loaded 2-core machine; the kernel in 2 to 6. */
export const defaultBootTimeoutMs = 180_000;
const shutdownTimeoutMs = 20_000;
const defaultCallTimeoutMs = 300_000;

const repositoryRoot = path.resolve(__dirname, '..', '..', '..', '..');
const agentScript = path.join(__dirname, 'agent.js');

/** A program the agent started in the guest. */
export interface GuestProcess {
  pid: number;
  /** Its output so far (stdout and stderr together, the last 1 MiB). */
  output(): Promise<string>;
  /** Resolves once `pattern` appears in its output; fails if it exits first or the time runs out. */
  waitForOutput(pattern: RegExp | string, timeoutMs: number): Promise<void>;
  signal(signal: NodeJS.Signals): Promise<void>;
  /** Waits for it to end; undefined if it has not within `timeoutMs`. */
  wait(timeoutMs: number): Promise<{ status: number | null; signal: string | null } | undefined>;
}

type Call = (request?: object) => Promise<Record<string, unknown>>;

/** Errors from a CSI call in the guest carry the gRPC code and details, as a local client's do (for `expectCode`). */
export class GuestCsiError extends Error {
  constructor(
    readonly code: number,
    readonly details: string,
  ) {
    super(`${code} ${details}`);
  }
}

export class TestNode {
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (value: unknown) => void; reject: (err: Error) => void }>();
  private closed?: Error;

  private constructor(
    private readonly qemu: Daemon,
    private readonly agent: net.Socket,
    private readonly dir: { dir: string; cleanup: () => void },
    readonly kernelVersion: string,
    /** Seconds from starting QEMU until the agent answered. */
    readonly bootSeconds: number,
    /** The guest's uptime when the agent started: the kernel and /init's share of the boot. */
    readonly guestUptimeAtAgent: number,
  ) {}

  static async boot(options: TestNodeOptions = {}): Promise<TestNode> {
    const started = Date.now();
    const kernel = findKernel();
    const busybox = findStaticBusybox();
    if (!have('qemu-system-x86_64')) throw new Error(missingPackages('qemu-system-x86_64 is not installed'));
    if (!have('modprobe')) throw new Error(missingPackages('modprobe is not installed (it lists the modules the guest loads)'));
    if (/\s/.test(repositoryRoot)) throw new Error(`the test node cannot share ${repositoryRoot}: its path holds white space`);
    const dir = daemonTempDir('arbor-test-node-');
    try {
      const keepVisible = ['/tmp', '/run'].some((hidden) => repositoryRoot === hidden || repositoryRoot.startsWith(hidden + '/')) ? [repositoryRoot] : [];
      const initrd = path.join(dir.dir, 'initrd.cpio');
      fs.writeFileSync(initrd, buildInitramfs({ kernel, busybox, agentScript, keepVisible }));
      const agentSocket = path.join(dir.dir, 'agent.sock');
      const consoleLog = path.join(dir.dir, 'console.log');
      const qemu = spawnDaemon(
        'the test node (qemu-system-x86_64)',
        'qemu-system-x86_64',
        [
          '-accel', 'tcg', '-cpu', 'max', '-m', String(options.memoryMiB ?? 2048), '-smp', String(options.cpus ?? 2),
          '-nodefaults', '-no-reboot', '-display', 'none', '-monitor', 'none',
          '-serial', `file:${consoleLog}`,
          '-kernel', kernel.vmlinuz, '-initrd', initrd,
          '-append', 'console=ttyS0 quiet panic=-1',
          '-virtfs', 'local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap',
          '-device', 'virtio-serial-pci',
          '-chardev', `socket,id=agent,path=${agentSocket},server=on,wait=off`,
          '-device', `virtserialport,chardev=agent,name=${agentPortName}`,
        ], // prettier-ignore
        path.join(dir.dir, 'qemu.log'),
        [consoleLog],
      );
      const failure = (what: string) => new Error(`${what}\n${qemu.logTail(40)}`);
      const agent = await connectWhenListening(agentSocket, qemu, 10_000).catch((err: Error) => {
        throw failure(`the test node did not start: ${err.message}`);
      });
      const ready = await firstMessage(agent, qemu, options.bootTimeoutMs ?? defaultBootTimeoutMs).catch(async (err: Error) => {
        agent.destroy();
        await qemu.kill();
        throw failure(`the test node did not boot: ${err.message}${bootHint(consoleLog)}`);
      });
      const node = new TestNode(qemu, agent, dir, ready.kernel, (Date.now() - started) / 1000, ready.uptimeSeconds);
      node.listen(ready.rest);
      return node;
    } catch (err) {
      dir.cleanup();
      throw err;
    }
  }

  /** Runs a program in the guest to completion. */
  exec(argv: string[], options: { env?: Record<string, string>; cwd?: string; timeoutMs?: number; input?: Buffer | string } = {}): Promise<ExecResult> {
    const input = options.input === undefined ? undefined : Buffer.from(options.input).toString('base64');
    return this.call(
      { op: 'exec', argv, env: options.env, cwd: options.cwd, timeoutMs: options.timeoutMs, input },
      (options.timeoutMs ?? defaultCallTimeoutMs) + 10_000,
    ) as Promise<ExecResult>;
  }

  /** Runs a program and returns its stdout; fails naming the command with its output when the status is not 0. */
  async ok(argv: string[], options: { env?: Record<string, string>; cwd?: string; timeoutMs?: number; input?: Buffer | string } = {}): Promise<string> {
    const result = await this.exec(argv, options);
    if (result.status !== 0)
      throw new Error(`in the test node, ${argv.join(' ')} ended with ${result.status ?? result.signal}:\n${result.stderr}${result.stdout}`);
    return result.stdout;
  }

  /** A bash script, as `ok`. */
  sh(script: string, options: { timeoutMs?: number; env?: Record<string, string> } = {}): Promise<string> {
    // --norc: bash reads ~/.bashrc when its standard input is a socket (it takes it for rshd), and the agent's pipes are sockets.
    return this.ok(['bash', '--norc', '-euo', 'pipefail', '-c', script], options);
  }

  async spawn(argv: string[], options: { env?: Record<string, string>; cwd?: string } = {}): Promise<GuestProcess> {
    const { pid } = (await this.call({ op: 'spawn', argv, env: options.env, cwd: options.cwd })) as { pid: number };
    const output = async () => ((await this.call({ op: 'output', pid })) as { output: string }).output;
    const wait = async (timeoutMs: number) => {
      const result = (await this.call({ op: 'wait', pid, timeoutMs }, timeoutMs + 10_000)) as
        { status: number | null; signal: string | null } | { running: true };
      return 'running' in result ? undefined : result;
    };
    return {
      pid,
      output,
      wait,
      signal: async (signal) => void (await this.call({ op: 'kill', pid, signal })),
      async waitForOutput(pattern, timeoutMs) {
        const deadline = Date.now() + timeoutMs;
        for (;;) {
          const text = await output();
          if (typeof pattern === 'string' ? text.includes(pattern) : pattern.test(text)) return;
          const ended = await wait(0);
          if (ended) throw new Error(`${argv.join(' ')} ended (${ended.status ?? ended.signal}) before printing ${pattern}:\n${text.slice(-4000)}`);
          if (Date.now() > deadline) throw new Error(`${argv.join(' ')} did not print ${pattern} within ${timeoutMs / 1000} s:\n${text.slice(-4000)}`);
          await sleep(250);
        }
      },
    };
  }

  /** A CSI client for a plugin's socket in the guest: each service's methods as promises, as `csiClient` gives locally. */
  csi(socketPath: string): Record<CsiService, Record<string, Call>> {
    const service = (name: CsiService) =>
      new Proxy(
        {},
        {
          get:
            (_target, method: string) =>
            async (request: object = {}) => {
              try {
                return (await this.call({ op: 'csi', socketPath, service: name, method, request })) as Record<string, unknown>;
              } catch (err) {
                const agentError = (err as { agentError?: AgentError }).agentError;
                if (agentError?.code !== undefined) throw new GuestCsiError(agentError.code, agentError.details ?? agentError.message);
                throw err;
              }
            },
        },
      );
    return { identity: service('identity'), controller: service('controller'), group: service('group'), node: service('node') };
  }

  async readFile(file: string): Promise<Buffer> {
    return Buffer.from(((await this.call({ op: 'readFile', path: file })) as { data: string }).data, 'base64');
  }

  async writeFile(file: string, data: Buffer | string, mode?: number): Promise<void> {
    await this.call({ op: 'writeFile', path: file, data: Buffer.from(data).toString('base64'), mode });
  }

  /** What the guest printed on its console (the kernel's messages, /init's progress). */
  console(): string {
    return this.qemu.logTail(200);
  }

  /** Powers the guest off and waits for QEMU to exit (SIGKILL by PID if it does not). */
  async shutdown(): Promise<void> {
    try {
      if (!this.closed) await this.call({ op: 'poweroff' }, 5_000).catch(() => undefined);
      const timer = setTimeout(() => this.qemu.signal('SIGKILL'), shutdownTimeoutMs);
      await this.qemu.exited;
      clearTimeout(timer);
    } finally {
      this.agent.destroy();
      this.dir.cleanup();
    }
  }

  private call(request: DistributiveOmit<AgentRequest, 'id'>, timeoutMs = defaultCallTimeoutMs): Promise<unknown> {
    if (this.closed) return Promise.reject(this.closed);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`the test node's agent did not answer ${request.op} within ${timeoutMs / 1000} s`));
      }, timeoutMs);
      this.pending.set(id, {
        resolve: (value) => (clearTimeout(timer), resolve(value)),
        reject: (err) => (clearTimeout(timer), reject(err)),
      });
      this.agent.write(JSON.stringify({ ...request, id }) + '\n');
    });
  }

  private listen(initial: string): void {
    let buffered = initial;
    const take = () => {
      let newline: number;
      while ((newline = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, newline);
        buffered = buffered.slice(newline + 1);
        if (line.trim() === '') continue;
        const message = JSON.parse(line) as AgentMessage;
        if (!('id' in message)) continue;
        const waiter = this.pending.get(message.id);
        if (!waiter) continue;
        this.pending.delete(message.id);
        if (message.error) waiter.reject(Object.assign(new Error(`in the test node: ${message.error.message}`), { agentError: message.error }));
        else waiter.resolve(message.result);
      }
    };
    this.agent.on('data', (chunk: Buffer) => {
      buffered += chunk.toString('utf8');
      take();
    });
    const end = () => {
      this.closed ??= new Error(`the test node went away\n${this.qemu.logTail(40)}`);
      for (const waiter of this.pending.values()) waiter.reject(this.closed);
      this.pending.clear();
    };
    this.agent.on('close', end);
    this.agent.on('error', end);
    take();
  }
}

type DistributiveOmit<T, K extends keyof T> = T extends unknown ? Omit<T, K> : never;

function missingPackages(what: string): string {
  return `${what}: the test node needs Debian's qemu-system-x86, linux-image-amd64, busybox-static and kmod (apt-get install -y --no-install-recommends qemu-system-x86 linux-image-amd64 busybox-static kmod, as .ci/run does)`;
}

/** The newest kernel in /boot with its modules (and an nbd module among them). */
export function findKernel(): KernelFiles {
  const versions = fs.existsSync('/lib/modules') ? fs.readdirSync('/lib/modules') : [];
  const usable = versions
    .filter((version) => fs.existsSync(`/boot/vmlinuz-${version}`) && fs.existsSync(path.join('/lib/modules', version, 'modules.dep')))
    .sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
  const version = usable[usable.length - 1];
  if (!version) throw new Error(missingPackages('no kernel in /boot has its modules in /lib/modules'));
  const modulesDir = path.join('/lib/modules', version);
  if (!/kernel\/drivers\/block\/nbd\.ko/.test(fs.readFileSync(path.join(modulesDir, 'modules.dep'), 'utf8'))) {
    throw new Error(`kernel ${version} has no nbd module (${modulesDir}/kernel/drivers/block/nbd.ko); Debian's linux-image-amd64 has one`);
  }
  return { version, vmlinuz: `/boot/vmlinuz-${version}`, modulesDir };
}

/** /bin/busybox when it is statically linked (busybox-static); Debian's plain busybox needs libraries the initramfs lacks. */
export function findStaticBusybox(): string {
  const busybox = '/bin/busybox';
  if (!fs.existsSync(busybox)) throw new Error(missingPackages(`${busybox} is not installed`));
  if (hasInterpreter(fs.readFileSync(busybox))) throw new Error(missingPackages(`${busybox} is dynamically linked (Debian's busybox); install busybox-static`));
  return busybox;
}

/** Whether an ELF64 executable names a program interpreter (PT_INTERP): it is dynamically linked. */
function hasInterpreter(elf: Buffer): boolean {
  const headersAt = Number(elf.readBigUInt64LE(0x20));
  const entrySize = elf.readUInt16LE(0x36);
  const count = elf.readUInt16LE(0x38);
  for (let i = 0; i < count; i++) if (elf.readUInt32LE(headersAt + i * entrySize) === 3) return true;
  return false;
}

async function connectWhenListening(socketPath: string, qemu: Daemon, timeoutMs: number): Promise<net.Socket> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (!qemu.running()) throw new Error(`QEMU ended (${await qemu.exited}) before opening ${socketPath}`);
    if (fs.existsSync(socketPath)) {
      const socket = net.connect(socketPath);
      const connected = await new Promise<boolean>((resolve) => {
        socket.once('connect', () => resolve(true));
        socket.once('error', () => resolve(false));
      });
      if (connected) return socket;
      socket.destroy();
    }
    if (Date.now() > deadline) throw new Error(`QEMU did not open ${socketPath} within ${timeoutMs / 1000} s`);
    await sleep(50);
  }
}

/** Waits for the agent's "ready"; returns it with whatever arrived after it. */
function firstMessage(agent: net.Socket, qemu: Daemon, timeoutMs: number): Promise<{ uptimeSeconds: number; kernel: string; rest: string }> {
  return new Promise((resolve, reject) => {
    let text = '';
    const done = (err?: Error, value?: { uptimeSeconds: number; kernel: string; rest: string }) => {
      clearTimeout(timer);
      agent.off('data', onData);
      if (err) reject(err);
      else resolve(value!);
    };
    const timer = setTimeout(() => done(new Error(`the agent did not start within ${timeoutMs / 1000} s`)), timeoutMs);
    const onData = (chunk: Buffer) => {
      text += chunk.toString('utf8');
      const newline = text.indexOf('\n');
      if (newline < 0) return;
      try {
        const message = JSON.parse(text.slice(0, newline)) as AgentMessage;
        if ('event' in message) return done(undefined, { uptimeSeconds: message.uptimeSeconds, kernel: message.kernel, rest: text.slice(newline + 1) });
      } catch {
        // not JSON: fall through
      }
      done(new Error(`the agent's first line was not "ready": ${text.slice(0, newline)}`));
    };
    agent.on('data', onData);
    void qemu.exited.then((how) => done(new Error(`QEMU ended (${how}) before the agent started`)));
  });
}

/** The guest's own account of a failed boot: the lines /init marked, and a kernel panic if there was one. */
function bootHint(consoleLog: string): string {
  let text = '';
  try {
    text = fs.readFileSync(consoleLog, 'utf8');
  } catch {
    return '';
  }
  const lines = text.split('\n').filter((line) => line.includes(consoleMarker) || /Kernel panic|Oops|BUG:/.test(line));
  return lines.length > 0 ? `\nthe guest said:\n${lines.join('\n')}` : '';
}
