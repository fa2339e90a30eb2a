import { ChildProcess, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { have } from './run';
import { memoryTempDir } from './tmp';

/*
 * Real etcd (Debian etcd-server 3.4) on loopback for tests, and the small process
 * toolkit the Ceph RGW helper (rgw.ts) shares: free ports, daemons signalled by PID,
 * waiting with a deadline that reports the tail of the daemon's log.
 */

const etcdHealthyWithinMs = 30_000;
const daemonStopWithinMs = 10_000;
const pollEveryMs = 100;
const probeTimeoutMs = 1_000;
const portAttempts = 3;

// ---------------------------------------------------------------------------
// Daemons

/** A long-running process a test started: output to a log file, signalled by PID while it is our unreaped child. */
export interface Daemon {
  readonly name: string;
  readonly pid: number;
  /** Files worth reading when it misbehaves: its stdout/stderr, then any log it writes itself. */
  readonly logFiles: string[];
  /** Resolves with how it ended: 'exit 0', 'SIGKILL'. */
  readonly exited: Promise<string>;
  running(): boolean;
  /** Sends a signal if it is still running (never to a PID that may have been reused). */
  signal(signal: NodeJS.Signals): void;
  /** SIGTERM (and SIGCONT, in case it is paused); SIGKILL if it has not exited within 10 s. */
  stop(): Promise<void>;
  /** SIGKILL, then waits for the exit. */
  kill(): Promise<void>;
  /** The last lines of each log file, labelled. */
  logTail(lines?: number): string;
}

// Safety net for a test run that ends without its after hooks (uncaught error, mocha --exit):
// nothing started here may outlive the test process, nor its directories.
const live = new Set<ChildProcess>();
const dirs = new Set<string>();
let exitHookInstalled = false;
function cleanUpOnExit(): void {
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
    for (const dir of dirs) fs.rmSync(dir, { recursive: true, force: true });
  });
}

/** A temporary directory in memory (see tmp.ts) that is removed by `cleanup`, or at the latest when the process exits. */
export function daemonTempDir(prefix: string): { dir: string; cleanup: () => void } {
  const temp = memoryTempDir(prefix);
  cleanUpOnExit();
  dirs.add(temp.dir);
  return {
    dir: temp.dir,
    cleanup: () => {
      temp.cleanup();
      dirs.delete(temp.dir);
    },
  };
}

/** Starts `command` with stdout and stderr appended to `outFile`. */
export function spawnDaemon(name: string, command: string, args: string[], outFile: string, ownLogs: string[] = []): Daemon {
  const fd = fs.openSync(outFile, 'a');
  let child: ChildProcess;
  try {
    child = spawn(command, args, { stdio: ['ignore', fd, fd] });
  } finally {
    fs.closeSync(fd);
  }
  if (child.pid === undefined) throw new Error(`${name}: could not start ${command}`);
  const pid = child.pid;
  cleanUpOnExit();
  live.add(child);
  let ended: string | undefined;
  const exited = new Promise<string>((resolve) =>
    child.once('exit', (code, signal) => {
      live.delete(child);
      ended = signal ?? `exit ${code}`;
      resolve(ended);
    }),
  );
  const daemon: Daemon = {
    name,
    pid,
    logFiles: [outFile, ...ownLogs],
    exited,
    running: () => ended === undefined,
    signal(signal) {
      if (ended === undefined) process.kill(pid, signal);
    },
    async stop() {
      daemon.signal('SIGTERM');
      daemon.signal('SIGCONT');
      const timer = setTimeout(() => daemon.signal('SIGKILL'), daemonStopWithinMs);
      await exited;
      clearTimeout(timer);
    },
    async kill() {
      daemon.signal('SIGKILL');
      await exited;
    },
    logTail: (lines = 30) => daemon.logFiles.map((file) => `--- last lines of ${file}:\n${tail(file, lines)}`).join('\n'),
  };
  return daemon;
}

function tail(file: string, lines: number): string {
  try {
    const text = fs.readFileSync(file, 'utf8');
    return (
      text
        .slice(-64 * 1024)
        .trimEnd()
        .split('\n')
        .slice(-lines)
        .join('\n') || '(empty)'
    );
  } catch {
    return '(no such file)';
  }
}

/**
 * Polls `ready` every 100 ms until it says yes. Fails with the tail of `subject`'s logs
 * when it does not within `timeoutMs`, or when any of `watched` exits first.
 */
export async function waitFor(what: string, timeoutMs: number, subject: Daemon, ready: () => Promise<boolean>, watched: Daemon[] = [subject]): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const dead = watched.find((d) => !d.running());
    if (dead) throw new Error(`${what}: ${dead.name} (pid ${dead.pid}) ended (${await dead.exited}) first\n${dead.logTail()}`);
    if (await ready()) return;
    if (Date.now() > deadline) throw new Error(`${what}: not within ${timeoutMs / 1000} s\n${subject.logTail()}`);
    await sleep(pollEveryMs);
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export function requireCommands(commands: string[], packages: string): void {
  const missing = commands.filter((command) => !have(command));
  if (missing.length > 0) throw new Error(`${missing.join(', ')} not found: apt-get install -y --no-install-recommends ${packages}`);
}

/** Seconds since `t0` (a Date.now()), for progress lines. */
export function secondsSince(t0: number): string {
  return ((Date.now() - t0) / 1000).toFixed(1);
}

// ---------------------------------------------------------------------------
// Ports

/**
 * `count` distinct ports that are free on 127.0.0.1 now. They are drawn at random
 * below the kernel's ephemeral range, where no outgoing connection is ever given a
 * port, so the only collision left is another test picking the same port in the
 * moment before its daemon binds it: `withFreshPorts` retries that.
 */
export async function freePorts(count: number): Promise<number[]> {
  const low = 20_000;
  const high = ephemeralLow() - 1;
  const held: net.Server[] = [];
  try {
    for (let tries = 0; held.length < count; tries++) {
      if (tries > 1000) throw new Error(`no ${count} free ports in ${low}..${high}`);
      const port = high > low + 1000 ? crypto.randomInt(low, high) : 0;
      const server = await listen(port);
      if (server) held.push(server);
    }
    return held.map((s) => (s.address() as net.AddressInfo).port);
  } finally {
    await Promise.all(held.map((s) => new Promise((resolve) => s.close(resolve))));
  }
}

function ephemeralLow(): number {
  try {
    return Number(fs.readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]) || 32768;
  } catch {
    return 32768;
  }
}

function listen(port: number): Promise<net.Server | undefined> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(undefined));
    server.listen({ host: '127.0.0.1', port, exclusive: true }, () => resolve(server));
  });
}

/** Runs a bring-up again (with new ports) when it failed because a port was taken after all. */
export async function withFreshPorts<T>(bringUp: () => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await bringUp();
    } catch (error) {
      if (attempt >= portAttempts || !/address already in use/i.test(String(error))) throw error;
    }
  }
}

/** GET on loopback: the status code, or undefined when nothing answers within a second. */
export function httpStatus(url: string, method = 'GET', body?: string): Promise<{ status: number; body: string } | undefined> {
  return new Promise((resolve) => {
    const request = http.request(url, { method, agent: false, timeout: probeTimeoutMs }, (response) => {
      let text = '';
      response.setEncoding('utf8');
      response.on('data', (chunk: string) => (text += chunk));
      response.on('end', () => resolve({ status: response.statusCode ?? 0, body: text }));
      response.on('error', () => resolve(undefined));
    });
    request.on('timeout', () => request.destroy());
    request.on('error', () => resolve(undefined));
    request.end(body);
  });
}

// ---------------------------------------------------------------------------
// etcd

export interface EtcdMember {
  readonly name: string;
  /** The PID of the current process (a new one after `start`). */
  readonly pid: number;
  readonly clientUrl: string;
  readonly peerUrl: string;
  readonly dataDir: string;
  /** SIGTERM by PID; waits for the exit. */
  stop(): Promise<void>;
  /** SIGKILL by PID; waits for the exit. */
  kill(): Promise<void>;
  /** SIGSTOP: the member stops answering without its connections closing. */
  pause(): void;
  /** SIGCONT. */
  resume(): void;
  /**
   * Starts the member again on its data directory and ports; resolves once it serves
   * clients, which takes a quorum: restart members together (Promise.all) when fewer
   * than a quorum are running.
   */
  start(): Promise<void>;
  running(): boolean;
  logTail(lines?: number): string;
}

export interface EtcdCluster {
  /** Client URLs of all members, e.g. 'http://127.0.0.1:24117'. */
  endpoints: string[];
  members: EtcdMember[];
  /** The member that is leader now, as the running members see it. */
  leader(): Promise<EtcdMember | undefined>;
  /** Waits until every running member reports healthy (has a leader and serves reads). */
  waitHealthy(timeoutMs?: number): Promise<void>;
  /** Stops every member by PID, waits for the exits, removes the data directories. */
  stop(): Promise<void>;
}

/** Starts an etcd cluster of 1 or 3 members on free loopback ports, data in memory, and waits until it is healthy. */
export function startEtcd(options: { members: 1 | 3 }): Promise<EtcdCluster> {
  requireCommands(['etcd'], 'etcd-server');
  return withFreshPorts(() => bringUpEtcd(options.members));
}

async function bringUpEtcd(count: number): Promise<EtcdCluster> {
  const t0 = Date.now();
  const temp = daemonTempDir('arbor-etcd-');
  const ports = await freePorts(2 * count);
  const names = Array.from({ length: count }, (_, i) => `e${i + 1}`);
  const peerUrls = names.map((_, i) => `http://127.0.0.1:${ports[count + i]}`);
  const initialCluster = names.map((name, i) => `${name}=${peerUrls[i]}`).join(',');
  // A token of its own, so members of two clusters can never join each other.
  const token = `arbor-test-${crypto.randomBytes(6).toString('hex')}`;
  const members = names.map((name, i) => {
    const clientUrl = `http://127.0.0.1:${ports[i]}`;
    const dataDir = path.join(temp.dir, name);
    const args = [
      ['--name', name],
      ['--data-dir', dataDir],
      ['--listen-client-urls', clientUrl],
      ['--advertise-client-urls', clientUrl],
      ['--listen-peer-urls', peerUrls[i]],
      ['--initial-advertise-peer-urls', peerUrls[i]],
      ['--initial-cluster', initialCluster],
      ['--initial-cluster-state', 'new'],
      ['--initial-cluster-token', token],
      ['--logger', 'zap'],
    ].flat();
    return new Member(name, clientUrl, peerUrls[i], dataDir, args, path.join(temp.dir, `${name}.log`));
  });
  const cluster: EtcdCluster = {
    endpoints: members.map((m) => m.clientUrl),
    members,
    async leader() {
      for (const member of members.filter((m) => m.running())) {
        const status = await memberStatus(member.clientUrl);
        if (status && status.memberId === status.leader) return member;
      }
      return undefined;
    },
    async waitHealthy(timeoutMs = etcdHealthyWithinMs) {
      const running = members.filter((m) => m.running());
      const healthy = async (m: Member) => /"health":\s*"true"/.test((await httpStatus(`${m.clientUrl}/health`))?.body ?? '');
      await Promise.all(running.map((m) => m.waitFor(`etcd member ${m.name} healthy at ${m.clientUrl}`, timeoutMs, () => healthy(m), running)));
    },
    async stop() {
      try {
        // Followers first: a leader told to stop hands leadership to a follower, and
        // waits 7 s for it if that follower is stopping too.
        const leader = await cluster.leader();
        await Promise.all(members.filter((m) => m !== leader).map((m) => m.stop()));
        await leader?.stop();
      } finally {
        temp.cleanup();
      }
    },
  };
  try {
    members.forEach((m) => m.launch());
    await cluster.waitHealthy();
  } catch (error) {
    await cluster.stop();
    throw error;
  }
  process.stderr.write(`etcd: ${count} member${count > 1 ? 's' : ''} healthy in ${secondsSince(t0)} s at ${cluster.endpoints.join(',')}\n`);
  return cluster;
}

class Member implements EtcdMember {
  private daemon?: Daemon;

  constructor(
    readonly name: string,
    readonly clientUrl: string,
    readonly peerUrl: string,
    readonly dataDir: string,
    private readonly args: string[],
    private readonly logFile: string,
  ) {}

  get pid(): number {
    if (!this.daemon) throw new Error(`etcd member ${this.name} was never started`);
    return this.daemon.pid;
  }

  launch(): void {
    if (this.running()) throw new Error(`etcd member ${this.name} is already running (pid ${this.pid})`);
    this.daemon = spawnDaemon(`etcd ${this.name}`, 'etcd', this.args, this.logFile);
  }

  async start(): Promise<void> {
    this.launch();
    // Before it is ready (has a quorum) etcd accepts connections but answers nothing.
    await this.waitFor(
      `etcd member ${this.name} serving at ${this.clientUrl} after restart`,
      etcdHealthyWithinMs,
      async () => (await httpStatus(`${this.clientUrl}/health`)) !== undefined,
    );
  }

  waitFor(what: string, timeoutMs: number, ready: () => Promise<boolean>, watched: EtcdMember[] = [this]): Promise<void> {
    const daemons = watched.map((m) => (m as Member).daemon).filter((d): d is Daemon => d !== undefined);
    return waitFor(what, timeoutMs, this.daemon!, ready, daemons);
  }

  running = (): boolean => this.daemon?.running() ?? false;
  stop = async (): Promise<void> => this.daemon?.stop();
  kill = async (): Promise<void> => this.daemon?.kill();
  pause = (): void => this.daemon?.signal('SIGSTOP');
  resume = (): void => this.daemon?.signal('SIGCONT');
  logTail = (lines?: number): string => this.daemon?.logTail(lines) ?? '';
}

/** The member's own id and the leader it follows (64-bit ids, as decimal strings), through etcd's JSON gateway. */
async function memberStatus(clientUrl: string): Promise<{ memberId: string; leader: string } | undefined> {
  const answer = await httpStatus(`${clientUrl}/v3/maintenance/status`, 'POST', '{}');
  if (answer?.status !== 200) return undefined;
  const status = parseJson(answer.body) as { header?: { member_id?: string }; leader?: string } | undefined;
  return status?.header?.member_id && status.leader ? { memberId: status.header.member_id, leader: status.leader } : undefined;
}

export function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/**
 * One etcd cluster for a whole mocha suite, in a temporary directory in memory:
 * started in `before`, stopped by PID in `after`. Read `cluster` inside tests.
 */
export function etcdForSuite(members: 1 | 3 = 1): { cluster: EtcdCluster } {
  const suite = {} as { cluster: EtcdCluster };
  before(async function () {
    this.timeout(etcdHealthyWithinMs * portAttempts + 10_000);
    suite.cluster = await startEtcd({ members });
  });
  after(async function () {
    this.timeout(daemonStopWithinMs + 10_000);
    await suite.cluster?.stop();
  });
  return suite;
}
