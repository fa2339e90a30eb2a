import assert from 'node:assert/strict';
import { ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ok, run, RunResult } from './run';
import { tempDir } from './tmp';

/** package.json's bin, dist/arbor.js: it runs the bundled `arbor` program from its code cache; tests and benchmarks run it. */
export const cliPath = path.join(__dirname, '../../arbor.js');

export interface ArborServer {
  pid: number;
  dataDir: string;
  nbdSocket: string;
  /** nbd+unix URI of an export. */
  uri(exportName: string): string;
  /** The arbor CLI on this server's data directory. */
  cli(...args: string[]): Promise<RunResult>;
  cliOk(...args: string[]): Promise<string>;
  /** Everything the server logged so far. */
  log(): string;
  /** SIGTERM by PID; resolves with the exit status. */
  stop(): Promise<number | null>;
  /** SIGKILL by PID. */
  kill(): Promise<void>;
}

/** Starts `arbor serve` on a data directory (created in `dir`) and waits until it serves. */
export async function startServer(dir: string, extraArgs: string[] = [], command: 'serve' | 'node' = 'serve'): Promise<ArborServer> {
  const dataDir = path.join(dir, 'data');
  const nbdSocket = path.join(dir, 'nbd.sock');
  fs.mkdirSync(dataDir, { recursive: true });
  const child: ChildProcess = spawn(process.execPath, [cliPath, '--data-dir', dataDir, command, '--nbd-socket', nbdSocket, ...extraArgs], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, ARBOR_LOG_LEVEL: 'info' },
  });
  let log = '';
  child.stderr!.on('data', (chunk) => (log += chunk));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  await new Promise<void>((resolve, reject) => {
    const check = setInterval(() => {
      // `arbor node --relay-to` holds no data and says so.
      if (/"message":"arbor (relay node )?serving"/.test(log)) {
        clearInterval(check);
        resolve();
      }
    }, 20);
    void exited.then((code) => {
      clearInterval(check);
      reject(new Error(`arbor serve exited ${code} before serving:\n${log}`));
    });
  });
  const cli = (...args: string[]) => run(process.execPath, [cliPath, '--data-dir', dataDir, ...args]);
  return {
    pid: child.pid!,
    dataDir,
    nbdSocket,
    uri: (name) => `nbd+unix:///${name}?socket=${nbdSocket}`,
    cli,
    cliOk: (...args) => ok(process.execPath, [cliPath, '--data-dir', dataDir, ...args]),
    log: () => log,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return child.exitCode;
      process.kill(child.pid!, 'SIGTERM');
      return exited;
    },
    async kill() {
      if (child.exitCode === null && child.signalCode === null) process.kill(child.pid!, 'SIGKILL');
      await exited;
    },
  };
}

/**
 * One `arbor serve` for a whole mocha suite, in a temporary directory: started in
 * `before`, stopped by PID in `after`. Read `server` and `dir` inside tests.
 */
export function serverForSuite(extraArgs: (dir: string) => Promise<string[]> = async () => []): { server: ArborServer; dir: string } {
  const suite = {} as { server: ArborServer; dir: string; cleanup?: () => void };
  before(async () => {
    const temp = tempDir();
    suite.dir = temp.dir;
    suite.cleanup = temp.cleanup;
    suite.server = await startServer(temp.dir, await extraArgs(temp.dir));
  });
  after(async () => {
    try {
      if (suite.server) assert.equal(await suite.server.stop(), 0, 'arbor serve stops cleanly on SIGTERM');
    } finally {
      suite.cleanup?.();
    }
  });
  return suite;
}
