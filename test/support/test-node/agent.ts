/**
 * The agent inside the test node: started by the guest's /init (chrooted into the
 * host's root, shared read-only), it runs what the host's tests ask over the
 * virtio-serial port and answers. One Node.js process for the whole boot: Node takes
 * seconds to start under TCG, so the tests never start it per command.
 */
import { ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import type { CsiClient } from '../../../csi/client';
import { AgentError, AgentMessage, AgentRequest, agentPortName, ExecResult } from './protocol';

/** Output kept per spawned program, and per stream of an exec. */
const keptOutputBytes = 1024 * 1024;

interface Spawned {
  child: ChildProcess;
  output: string;
  exited: Promise<{ status: number | null; signal: string | null }>;
}

const read = promisify(fs.read);
const write = promisify(fs.write);
const spawned = new Map<number, Spawned>();
const csiClients = new Map<string, CsiClient>();

function findPort(): string {
  const dir = '/sys/class/virtio-ports';
  for (const port of fs.existsSync(dir) ? fs.readdirSync(dir) : []) {
    if (fs.readFileSync(path.join(dir, port, 'name'), 'utf8').trim() === agentPortName) return `/dev/${port}`;
  }
  throw new Error(`no virtio-serial port named ${agentPortName} in ${dir}`);
}

function keep(text: string, more: string): string {
  const joined = text + more;
  return joined.length > keptOutputBytes ? joined.slice(-keptOutputBytes) : joined;
}

function exec(request: Extract<AgentRequest, { op: 'exec' }>): Promise<ExecResult> {
  return new Promise((resolve) => {
    const child = spawn(request.argv[0], request.argv.slice(1), { cwd: request.cwd, env: { ...process.env, ...request.env } });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => (stdout = keep(stdout, chunk.toString())));
    child.stderr.on('data', (chunk: Buffer) => (stderr = keep(stderr, chunk.toString())));
    const timer = request.timeoutMs ? setTimeout(() => child.kill('SIGKILL'), request.timeoutMs) : undefined;
    child.on('error', (err) => (stderr += String(err)));
    child.on('close', (status, signal) => {
      clearTimeout(timer);
      resolve({ status, signal, stdout, stderr });
    });
    child.stdin.end(request.input === undefined ? undefined : Buffer.from(request.input, 'base64'));
  });
}

function start(request: Extract<AgentRequest, { op: 'spawn' }>): number {
  const child = spawn(request.argv[0], request.argv.slice(1), { cwd: request.cwd, env: { ...process.env, ...request.env }, stdio: ['ignore', 'pipe', 'pipe'] });
  if (child.pid === undefined) throw new Error(`cannot start ${request.argv[0]}`);
  const entry: Spawned = {
    child,
    output: '',
    exited: new Promise((resolve) => child.once('close', (status, signal) => resolve({ status, signal }))),
  };
  child.stdout.on('data', (chunk: Buffer) => (entry.output = keep(entry.output, chunk.toString())));
  child.stderr.on('data', (chunk: Buffer) => (entry.output = keep(entry.output, chunk.toString())));
  child.on('error', (err) => (entry.output += String(err)));
  spawned.set(child.pid, entry);
  return child.pid;
}

function spawnedProcess(pid: number): Spawned {
  const entry = spawned.get(pid);
  if (!entry) throw new Error(`the agent started no process ${pid}`);
  return entry;
}

async function csiCall(request: Extract<AgentRequest, { op: 'csi' }>): Promise<unknown> {
  let client = csiClients.get(request.socketPath);
  if (!client) {
    // Loaded on first use: gRPC and the proto take seconds to load under TCG, and many boots need no CSI.
    const { csiClient } = await import('../../../csi/client');
    client = csiClient(request.socketPath);
    csiClients.set(request.socketPath, client);
  }
  return client[request.service][request.method](request.request);
}

async function handle(request: AgentRequest): Promise<unknown> {
  switch (request.op) {
    case 'exec':
      return exec(request);
    case 'spawn':
      return { pid: start(request) };
    case 'output':
      return { output: spawnedProcess(request.pid).output };
    case 'wait': {
      const entry = spawnedProcess(request.pid);
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<{ running: true }>((resolve) => (timer = setTimeout(() => resolve({ running: true }), request.timeoutMs)));
      const result = await Promise.race([entry.exited, timeout]);
      clearTimeout(timer);
      return result;
    }
    case 'kill':
      spawnedProcess(request.pid).child.kill(request.signal);
      return {};
    case 'csi':
      return csiCall(request);
    case 'readFile':
      return { data: fs.readFileSync(request.path).toString('base64') };
    case 'writeFile':
      fs.writeFileSync(request.path, Buffer.from(request.data, 'base64'), { mode: request.mode });
      return {};
    case 'poweroff':
      // Not process.exit: at exit libuv joins its thread pool, where a read of the port never returns.
      setTimeout(() => process.kill(process.pid, 'SIGKILL'), 50);
      return {};
  }
}

function errorOf(err: unknown): AgentError {
  const e = err as { message?: string; code?: unknown; details?: string };
  return { message: e.message ?? String(err), code: typeof e.code === 'number' ? e.code : undefined, details: e.details };
}

/**
 * The port is one file descriptor for both directions: a virtio console port can be
 * open once at a time. Reads and writes go through the thread pool (the port is a
 * character device, which libuv cannot poll); the port takes at most 32 KiB a write.
 */
class Port {
  private writing: Promise<void> = Promise.resolve();

  constructor(private readonly fd: number) {}

  send(message: AgentMessage): void {
    const bytes = Buffer.from(JSON.stringify(message) + '\n');
    this.writing = this.writing
      .then(async () => {
        for (let at = 0; at < bytes.length;) at += (await write(this.fd, bytes, at, bytes.length - at)).bytesWritten;
      })
      .catch((err) => console.error(`arbor-test-node agent: cannot answer the host: ${(err as Error).message}`));
  }

  async *lines(): AsyncGenerator<string> {
    const buffer = Buffer.alloc(64 * 1024);
    let pending = '';
    for (;;) {
      const { bytesRead } = await read(this.fd, buffer, 0, buffer.length, null);
      if (bytesRead === 0) {
        // The host is not connected yet (or went away): a virtio port reads end-of-file then.
        await new Promise((resolve) => setTimeout(resolve, 100));
        continue;
      }
      pending += buffer.toString('utf8', 0, bytesRead);
      let newline: number;
      while ((newline = pending.indexOf('\n')) >= 0) {
        yield pending.slice(0, newline);
        pending = pending.slice(newline + 1);
      }
    }
  }
}

async function main(): Promise<void> {
  const port = new Port(fs.openSync(findPort(), 'r+'));
  port.send({ event: 'ready', uptimeSeconds: Number(fs.readFileSync('/proc/uptime', 'utf8').split(' ')[0]), kernel: os.release() });
  for await (const line of port.lines()) {
    if (line.trim() === '') continue;
    let request: AgentRequest;
    try {
      request = JSON.parse(line) as AgentRequest;
    } catch {
      continue;
    }
    handle(request).then(
      (result) => port.send({ id: request.id, result }),
      (err) => port.send({ id: request.id, error: errorOf(err) }),
    );
  }
}

main().catch((err) => {
  console.error(`arbor-test-node agent: ${(err as Error).stack ?? String(err)}`);
  process.exit(1);
});
