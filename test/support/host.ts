import fs from 'node:fs';
import path from 'node:path';
import { CommandResult, CommandRunner } from '../../node-plugin/host/commands';
import { run } from './run';

/**
 * A CommandRunner that runs nothing: it records each argv and answers from
 * `respond` (status 0 and no output by default), for the paths this machine cannot
 * run (the kernel NBD driver) and for checking exact argv.
 */
export class RecordingRunner implements CommandRunner {
  readonly commands: string[][] = [];

  constructor(private readonly respond: (argv: string[]) => Partial<CommandResult> | void = () => undefined) {}

  async run(command: string, args: string[], options: { allowFailure?: boolean } = {}): Promise<CommandResult> {
    const argv = [command, ...args];
    this.commands.push(argv);
    const result = { stdout: '', stderr: '', status: 0, ...(this.respond(argv) ?? {}) };
    if (result.status !== 0 && !options.allowFailure) throw new Error(`${argv.join(' ')} exited with status ${result.status}: ${result.stderr}`);
    return result;
  }

  async spawnDetached(command: string, args: string[]): Promise<number> {
    this.commands.push([command, ...args]);
    return 999_999;
  }
}

/** A private work directory for one volume, as the node service makes it. */
export function workDirFor(dir: string, name: string): string {
  const workDir = path.join(dir, 'work', name);
  fs.mkdirSync(workDir, { recursive: true, mode: 0o700 });
  return workDir;
}

export interface Leftovers {
  loopDevices: string[];
  mounts: string[];
  nbdfuse: string[];
}

/** Loop devices backed by files under `dir`, mounts under `dir`, nbdfuse processes naming `dir`. */
export function leftoversUnder(dir: string): Leftovers {
  const loopDevices = fs
    .readdirSync('/sys/block')
    .filter((name) => /^loop\d+$/.test(name))
    .filter((name) => {
      try {
        return fs.readFileSync(`/sys/block/${name}/loop/backing_file`, 'utf8').startsWith(dir + '/');
      } catch {
        return false;
      }
    })
    .map((name) => `/dev/${name}`);
  const mounts = fs
    .readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .map((line) => line.split(' ')[4])
    .filter((mountPoint) => mountPoint?.startsWith(dir + '/'));
  const nbdfuse: string[] = [];
  for (const pid of fs.readdirSync('/proc').filter((entry) => /^\d+$/.test(entry))) {
    try {
      const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
      if (stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z')) continue; // exited, not yet reaped
      const argv = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      if (path.basename(argv[0]) === 'nbdfuse' && argv.some((word) => word.startsWith(dir + '/'))) nbdfuse.push(`${pid} ${argv.join(' ').trim()}`);
    } catch {
      // gone while we looked
    }
  }
  return { loopDevices, mounts, nbdfuse };
}

/**
 * The safety net after a failed test: removes whatever `leftoversUnder` finds. No
 * lazy unmounts: a FUSE mount detached lazily under a loop device leaves that loop
 * device bound to an unreachable file ("/disk") that nothing can find again.
 */
export async function removeLeftoversUnder(dir: string): Promise<void> {
  const { mounts, loopDevices } = leftoversUnder(dir);
  // Deepest first, and the filesystems on loop devices before the FUSE mounts behind them.
  for (const mountPoint of mounts
    .filter((m) => !m.endsWith('/fuse'))
    .sort()
    .reverse())
    await run('umount', [mountPoint]);
  for (const device of loopDevices) await run('losetup', ['-d', device]);
  for (const mountPoint of leftoversUnder(dir).mounts.sort().reverse()) await run('fusermount3', ['-u', mountPoint]);
  for (const line of leftoversUnder(dir).nbdfuse) {
    try {
      process.kill(Number(line.split(' ')[0]), 'SIGKILL');
    } catch {
      // already gone
    }
  }
}
