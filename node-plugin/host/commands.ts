/**
 * Every program the node plugin runs on the host goes through a `CommandRunner`, so
 * tests can record the exact argv (the kernel NBD path cannot run on a machine
 * without the nbd module) and every failure becomes an `ArborError` that names the
 * command. The helpers below watch the long-lived processes it leaves (nbdfuse).
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ArborError } from '../../store/errors';

export interface CommandResult {
  stdout: string;
  stderr: string;
  status: number;
}

export interface CommandRunner {
  /** Runs to completion; rejects with an ArborError('internal', ...) naming the command, its exit status and stderr when the status is not 0 unless `allowFailure` is set. */
  run(command: string, args: string[], options?: { timeoutMs?: number; allowFailure?: boolean }): Promise<CommandResult>;
  /** Starts a long-lived helper process detached from us (setsid, stdio ignored) so it survives a restart of the plugin; returns its pid. */
  spawnDetached(command: string, args: string[]): Promise<number>;
}

/** A host command that has not finished in this long is killed (mkfs and fsck pass longer ones). */
export const defaultCommandTimeoutMs = 2 * 60_000;
/** Output kept per stream: enough for any message we parse or quote, bounded against a runaway tool. */
export const maxCapturedOutputBytes = 1024 * 1024;
/** How much of a failed command's output an error message quotes. */
export const maxQuotedOutputChars = 2000;

/** The real host: child processes with the C locale, so the output we parse is never translated. */
export const hostCommands: CommandRunner = {
  run(command, args, options = {}) {
    const timeoutMs = options.timeoutMs ?? defaultCommandTimeoutMs;
    return new Promise<CommandResult>((resolve, reject) => {
      const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LC_ALL: 'C' } });
      const stdout = new BoundedText();
      const stderr = new BoundedText();
      child.stdout.on('data', (chunk: Buffer) => stdout.add(chunk));
      child.stderr.on('data', (chunk: Buffer) => stderr.add(chunk));
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        child.kill('SIGKILL');
      }, timeoutMs);
      child.once('error', (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        reject(err.code === 'ENOENT' ? notInstalled(command) : new ArborError('internal', `${describeCommand(command, args)} could not start: ${err.message}`));
      });
      child.once('close', (code, signal) => {
        clearTimeout(timer);
        if (timedOut) {
          reject(new ArborError('internal', `${describeCommand(command, args)} did not finish within ${timeoutMs} ms and was killed`));
          return;
        }
        // A process killed by a signal gets the shell's convention, 128 + the signal number.
        const status = code ?? 128 + (signal ? os.constants.signals[signal] : 0);
        const result = { stdout: stdout.text(), stderr: stderr.text(), status };
        if (status !== 0 && !options.allowFailure) reject(commandFailed(command, args, result));
        else resolve(result);
      });
    });
  },

  spawnDetached(command, args) {
    return new Promise<number>((resolve, reject) => {
      // detached: the child calls setsid(), so it has its own session and process group
      // and a signal to ours (or our exit) does not reach it.
      const child = spawn(command, args, { detached: true, stdio: 'ignore' });
      child.once('error', (err: NodeJS.ErrnoException) =>
        reject(err.code === 'ENOENT' ? notInstalled(command) : new ArborError('internal', `${describeCommand(command, args)} could not start: ${err.message}`)),
      );
      child.once('spawn', () => {
        child.unref();
        resolve(child.pid!);
      });
    });
  },
};

/** The error for a command that exited non-zero: the command, its status, and what it said. */
export function commandFailed(command: string, args: string[], result: CommandResult): ArborError {
  const said = (result.stderr.trim() || result.stdout.trim() || '(it printed nothing)').slice(-maxQuotedOutputChars);
  return new ArborError('internal', `${describeCommand(command, args)} exited with status ${result.status}: ${said}`);
}

export function describeCommand(command: string, args: string[]): string {
  return [command, ...args].map((word) => (/^[\w@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`)).join(' ');
}

function notInstalled(command: string): ArborError {
  return new ArborError('failed-precondition', `${command} is not installed on this host (not found in PATH); install it in the node plugin's image`);
}

class BoundedText {
  private chunks: Buffer[] = [];
  private bytes = 0;
  private dropped = 0;

  add(chunk: Buffer): void {
    const room = maxCapturedOutputBytes - this.bytes;
    if (room <= 0) {
      this.dropped += chunk.length;
      return;
    }
    const kept = chunk.length > room ? chunk.subarray(0, room) : chunk;
    this.chunks.push(kept);
    this.bytes += kept.length;
    this.dropped += chunk.length - kept.length;
  }

  text(): string {
    const text = Buffer.concat(this.chunks).toString();
    return this.dropped > 0 ? `${text}\n[${this.dropped} more bytes not kept]` : text;
  }
}

// ---- Processes we leave running ----

/** How often waits poll the host (a pid file appearing, a process exiting). */
export const hostPollIntervalMs = 25;

/**
 * Whether `pid` is a live process whose argv is exactly `expectedArgv` (when given).
 * A zombie counts as dead: after a plugin restart our helpers are not our children,
 * and whoever reaps them may be slow. Comparing the whole argv guards against pid
 * reuse: the argv of our helpers names paths private to one volume.
 */
export function processAlive(pid: number, expectedArgv?: string[], procDir = '/proc'): boolean {
  if (!Number.isSafeInteger(pid) || pid <= 0) return false;
  let stat: string;
  try {
    stat = fs.readFileSync(path.join(procDir, String(pid), 'stat'), 'utf8');
  } catch {
    return false;
  }
  // "pid (comm) S ...": comm may hold spaces and parentheses, so the state follows the last ')'.
  const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
  if (state === 'Z' || state === 'X' || state === '') return false;
  if (!expectedArgv) return true;
  return sameArgv(processArgv(pid, procDir), expectedArgv);
}

/** A process's argv from /proc (empty when it is gone or a kernel thread). */
export function processArgv(pid: number, procDir = '/proc'): string[] {
  try {
    const raw = fs.readFileSync(path.join(procDir, String(pid), 'cmdline'), 'utf8');
    return raw.split('\0').slice(0, raw.endsWith('\0') ? -1 : undefined);
  } catch {
    return [];
  }
}

function sameArgv(actual: string[], expected: string[]): boolean {
  // argv[0] is the program as it was invoked: compare its base name only.
  if (actual.length !== expected.length || actual.length === 0) return false;
  if (path.basename(actual[0]) !== path.basename(expected[0])) return false;
  return actual.every((word, i) => i === 0 || word === expected[i]);
}

/** Polls `condition` until it holds or `timeoutMs` passes; says which. */
export async function waitUntil(condition: () => boolean | Promise<boolean>, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await condition()) return true;
    if (Date.now() >= deadline) return false;
    await new Promise((resolve) => setTimeout(resolve, hostPollIntervalMs));
  }
}

/**
 * Waits up to `graceMs` for a process to exit on its own, then sends SIGTERM and
 * waits again, then SIGKILL. Rejects only if even SIGKILL did not end it in time.
 */
export async function stopProcess(pid: number, isAlive: () => boolean, graceMs: number, what: string): Promise<void> {
  for (const signal of [undefined, 'SIGTERM', 'SIGKILL'] as const) {
    if (signal && isAlive()) {
      try {
        process.kill(pid, signal);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
      }
    }
    if (await waitUntil(() => !isAlive(), graceMs)) return;
  }
  throw new ArborError(
    'internal',
    `${what} (pid ${pid}) is still running after SIGKILL; look at it with 'ps -o stat,wchan -p ${pid}' (a process stuck in the kernel cannot be killed)`,
  );
}
