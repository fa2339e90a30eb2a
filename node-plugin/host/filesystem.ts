/**
 * Filesystems on attached devices: probe, format, check, mount, bind-mount, grow,
 * and report usage. Every device, path, mkfs option and mount flag is checked before
 * it reaches argv, because they come from StorageClass parameters and CSI requests.
 *
 * Each function takes the `CommandRunner` last, defaulting to the real host.
 */
import fs from 'node:fs';
import path from 'node:path';
import { ArborError } from '../../store/errors';
import { CommandRunner, commandFailed, hostCommands } from './commands';

export type FilesystemType = 'ext4' | 'xfs';
export const supportedFilesystems: readonly FilesystemType[] = ['ext4', 'xfs'];

/** blkid, findmnt, blockdev: they read a few sectors or a table. */
export const probeTimeoutMs = 30_000;
/** mkfs on a thin volume writes little, but discards the whole device first. */
export const mkfsTimeoutMs = 10 * 60_000;
/** e2fsck -p reads every inode table: minutes on a large, full filesystem. */
export const fsckTimeoutMs = 60 * 60_000;
/** mount replays the ext4 journal or the xfs log. */
export const mountTimeoutMs = 5 * 60_000;
/** resize2fs and xfs_growfs write new group descriptors or allocation groups. */
export const growTimeoutMs = 30 * 60_000;
/** Mounts stacked on one target that `unmount` removes before it gives up. */
export const maxStackedMounts = 8;

// ---- Probing ----

/**
 * What a device holds: a filesystem type ('ext4', 'xfs', ...), 'partition-table:TYPE'
 * (never formatted over, though it holds no filesystem), 'several-signatures' when
 * blkid finds more than one and will not pick, or undefined when it is blank.
 */
export async function detectFilesystem(device: string, runner: CommandRunner = hostCommands): Promise<string | undefined> {
  assertAbsolutePath(device, 'device');
  // -p probes the device itself, not blkid's cache, which may predate the attach.
  const args = ['-p', '-o', 'export', '-s', 'TYPE', '-s', 'PTTYPE', device];
  const result = await runner.run('blkid', args, { timeoutMs: probeTimeoutMs, allowFailure: true });
  if (result.status === 2) return undefined; // nothing found: blank
  if (result.status === 8) return 'several-signatures'; // "ambivalent probing result"
  if (result.status !== 0) throw commandFailed('blkid', args, result);
  const found = new Map(result.stdout.split('\n').map((line) => [line.slice(0, line.indexOf('=')), line.slice(line.indexOf('=') + 1)]));
  if (found.get('TYPE')) return found.get('TYPE');
  if (found.get('PTTYPE')) return `partition-table:${found.get('PTTYPE')}`;
  return undefined;
}

/** The device's size in bytes. */
export async function blockDeviceSize(device: string, runner: CommandRunner = hostCommands): Promise<number> {
  assertAbsolutePath(device, 'device');
  const stdout = (await runner.run('blockdev', ['--getsize64', device], { timeoutMs: probeTimeoutMs })).stdout.trim();
  const size = Number(stdout);
  if (!/^\d+$/.test(stdout) || !Number.isSafeInteger(size))
    throw new ArborError('internal', `blockdev --getsize64 ${device} printed '${stdout}', not a size in bytes`);
  return size;
}

// ---- Formatting ----

/** Which mkfs options a StorageClass may pass, per filesystem: everything else is refused. */
interface MkfsOptionRules {
  command: string;
  /** What Arbor passes itself: quiet, and force (the device is known to be blank). */
  fixedArgs: string[];
  /** Letters of options that take no value. */
  flags: string;
  /** Letters of options that take a value, attached (-Lname) or as the next word (-L name). */
  withValue: string;
  /** Values that would put part of the filesystem on another device or read a host file. */
  refusedValue: RegExp;
}

const mkfsRules: Record<FilesystemType, MkfsOptionRules> = {
  // Left out on purpose: -F (a second one formats mounted devices), -t (the type is fsType),
  // -d and -l (read host paths), -S and -n (write no filesystem), -V.
  ext4: { command: 'mkfs.ext4', fixedArgs: ['-q', '-F'], flags: 'cjqvD', withValue: 'bCEGgIiJLMmNOorTUe', refusedValue: /(^|,)device=/ },
  // Left out on purpose: -f (Arbor's), -p (reads a host file), -N (writes nothing), -V.
  xfs: { command: 'mkfs.xfs', fixedArgs: ['-f', '-q'], flags: 'Kq', withValue: 'bmdilnrsL', refusedValue: /(^|,)(name|file|logdev|rtdev)(=|,|$)/ },
};

/**
 * Formats a blank device. Refuses a device that holds anything (a filesystem, a
 * partition table, unknown signatures): the caller checks with detectFilesystem
 * first, and this checks again, because formatting is the one thing that cannot be
 * undone.
 */
export async function formatFilesystem(device: string, fsType: FilesystemType, mkfsOptions: string[], runner: CommandRunner = hostCommands): Promise<void> {
  assertAbsolutePath(device, 'device');
  const rules = mkfsRules[assertFilesystemType(fsType)];
  const options = validateMkfsOptions(fsType, mkfsOptions);
  const existing = await detectFilesystem(device, runner);
  if (existing !== undefined) {
    throw new ArborError(
      'failed-precondition',
      `${device} already holds ${existing}; refusing to format it as ${fsType} (wipe it by hand with 'wipefs -a ${device}' if it really is unused)`,
    );
  }
  await runner.run(rules.command, [...rules.fixedArgs, ...options, device], { timeoutMs: mkfsTimeoutMs });
}

/** Returns the options as argv words, or throws naming the first one refused. */
export function validateMkfsOptions(fsType: FilesystemType, mkfsOptions: string[]): string[] {
  const rules = mkfsRules[assertFilesystemType(fsType)];
  const accepted = `${[...rules.flags].map((letter) => `-${letter}`).join(' ')} ${[...rules.withValue].map((letter) => `-${letter} VALUE`).join(' ')}`;
  const refuse = (why: string) => new ArborError('invalid-argument', `mkfs option ${why}; ${rules.command} accepts only ${accepted}`);
  for (let i = 0; i < mkfsOptions.length; i++) {
    const word = mkfsOptions[i];
    // One letter per word: in "-jJdevice=/dev/sdb" getopt would find a -J we did not check.
    const match = /^-([A-Za-z])(.*)$/s.exec(word);
    if (!match) throw refuse(`'${word}' is not an option (options start with '-'; a value follows the option it belongs to)`);
    const [, letter, attached] = match;
    if (rules.withValue.includes(letter)) {
      const value = attached !== '' ? attached : mkfsOptions[++i];
      if (value === undefined) throw refuse(`-${letter} needs a value`);
      if (rules.refusedValue.test(value)) throw refuse(`-${letter} ${value} would place part of the filesystem on another device or file`);
    } else if (!rules.flags.includes(letter) || attached !== '') {
      throw refuse(`'${word}' is not accepted`);
    }
  }
  return [...mkfsOptions];
}

// ---- Checking ----

/**
 * Checks a filesystem before it is mounted. ext4: `e2fsck -p` repairs what is safe
 * to repair without asking; exit status 1 (errors fixed) and 2 (fixed, reboot
 * needed: that is about a mounted root filesystem, and ours is not mounted) are
 * fine, 4 and above mean it could not, and the volume must not be mounted. xfs:
 * nothing, by design: xfs replays its log at mount, and xfs_repair refuses a
 * filesystem whose log is dirty, so a check before mount would fail exactly when the
 * node crashed with the volume mounted (fsck.xfs is a no-op for the same reason).
 */
export async function checkFilesystem(device: string, fsType: FilesystemType, runner: CommandRunner = hostCommands): Promise<void> {
  assertAbsolutePath(device, 'device');
  if (assertFilesystemType(fsType) === 'xfs') return;
  await e2fsck(device, ['-p'], runner);
}

/** Runs e2fsck with `options`; exit statuses below 4 are fine (see checkFilesystem), 4 and above refuse the filesystem. */
async function e2fsck(device: string, options: string[], runner: CommandRunner): Promise<void> {
  const args = [...options, device];
  const result = await runner.run('e2fsck', args, { timeoutMs: fsckTimeoutMs, allowFailure: true });
  if (result.status < 4) return;
  const meanings: Array<[number, string]> = [
    [4, 'errors left uncorrected'],
    [8, 'operational error (is it mounted or in use?)'],
    [16, 'usage error'],
    [32, 'cancelled'],
    [128, 'shared library error'],
  ];
  const meaning = meanings
    .filter(([bit]) => result.status & bit)
    .map(([, what]) => what)
    .join(', ');
  const said = (result.stdout + result.stderr).trim().slice(-1000);
  throw new ArborError(
    'failed-precondition',
    `the ext4 filesystem on ${device} failed its check and will not be mounted: e2fsck ${options.join(' ')} exited with status ${result.status} (${meaning}): ${said}; repair it by hand with 'e2fsck -f ${device}' while it is attached and not mounted`,
  );
}

// ---- Mounting ----

/** Options that change what mount does rather than how the filesystem behaves. */
const refusedMountFlags = new Set(['bind', 'rbind', 'move', 'remount', 'loop']);

/** Mount flags must each be one option: `mount -o` takes a comma-separated list. */
export function validateMountFlags(flags: string[]): void {
  for (const flag of flags) {
    if (!/^[A-Za-z0-9_][^,\s]*$/.test(flag)) {
      throw new ArborError(
        'invalid-argument',
        `mount flag '${flag}' must be one option, a word or word=value without commas or spaces (pass each option as its own flag)`,
      );
    }
    if (refusedMountFlags.has(flag.toLowerCase()) || /^x-mount\./i.test(flag)) {
      throw new ArborError('invalid-argument', `mount flag '${flag}' changes what mount does, not how the filesystem behaves; it is not accepted`);
    }
  }
}

/**
 * Mounts a filesystem at `target` (created when missing). Idempotent: succeeds when
 * the device's filesystem is already mounted there; refuses when something else is.
 * xfs always gets `nouuid`: a clone carries its source's filesystem UUID, and xfs
 * refuses to mount a second filesystem with a UUID already mounted on this host.
 */
export async function mountFilesystem(
  device: string,
  target: string,
  fsType: FilesystemType,
  flags: string[],
  readOnly: boolean,
  runner: CommandRunner = hostCommands,
): Promise<void> {
  assertAbsolutePath(device, 'device');
  assertAbsolutePath(target, 'mount target');
  assertFilesystemType(fsType);
  validateMountFlags(flags);
  if (readOnly && flags.includes('rw')) throw new ArborError('invalid-argument', `mount of ${device} at ${target}: flag 'rw' contradicts a read-only mount`);
  fs.mkdirSync(target, { recursive: true });
  if (await isMounted(target, runner)) {
    if (holdsFilesystemOf(target, device)) return;
    throw new ArborError(
      'failed-precondition',
      `cannot mount ${device} at ${target}: ${(await mountedDevice(target, runner)) ?? 'another filesystem'} is mounted there; unmount it first`,
    );
  }
  const options = [...flags, ...(readOnly ? ['ro'] : []), ...(fsType === 'xfs' && !flags.includes('nouuid') ? ['nouuid'] : [])];
  await runner.run('mount', ['-t', fsType, ...(options.length > 0 ? ['-o', options.join(',')] : []), device, target], { timeoutMs: mountTimeoutMs });
}

/**
 * Bind-mounts `source` (a directory, or a block device for raw block volumes) at
 * `target`, creating the target as a directory or an empty file to match. Read-only
 * takes a second step: the kernel ignores `ro` on the bind itself, so the new mount
 * is remounted read-only. Idempotent: an existing bind of the same source is made
 * read-only if it must be.
 */
export async function bindMount(source: string, target: string, readOnly: boolean, runner: CommandRunner = hostCommands): Promise<void> {
  assertAbsolutePath(source, 'bind source');
  assertAbsolutePath(target, 'bind target');
  let sourceStat: fs.Stats;
  try {
    sourceStat = fs.statSync(source);
  } catch {
    throw new ArborError('not-found', `cannot bind-mount ${source} at ${target}: ${source} does not exist`);
  }
  if (sourceStat.isDirectory()) {
    fs.mkdirSync(target, { recursive: true });
  } else {
    fs.mkdirSync(path.dirname(target), { recursive: true });
    fs.closeSync(fs.openSync(target, 'a'));
  }
  if (await isMounted(target, runner)) {
    const targetStat = fs.statSync(target);
    if (targetStat.dev !== sourceStat.dev || targetStat.ino !== sourceStat.ino) {
      throw new ArborError(
        'failed-precondition',
        `cannot bind-mount ${source} at ${target}: ${(await mountedDevice(target, runner)) ?? 'something else'} is mounted there; unmount it first`,
      );
    }
    if (readOnly && !(await mountOptions(target, runner)).includes('ro'))
      await runner.run('mount', ['-o', 'remount,bind,ro', target], { timeoutMs: mountTimeoutMs });
    return;
  }
  await runner.run('mount', ['--bind', source, target], { timeoutMs: mountTimeoutMs });
  if (!readOnly) return;
  try {
    await runner.run('mount', ['-o', 'remount,bind,ro', target], { timeoutMs: mountTimeoutMs });
  } catch (err) {
    // Never leave a writable view of a volume that was asked for read-only.
    await runner.run('umount', [target], { timeoutMs: mountTimeoutMs, allowFailure: true });
    throw err;
  }
}

/** Whether the filesystem mounted at `target` lives on `device`: its st_dev is the device's number. */
function holdsFilesystemOf(target: string, device: string): boolean {
  try {
    return fs.statSync(target).dev === fs.statSync(device).rdev;
  } catch {
    return false;
  }
}

/** Unmounts everything mounted at `target`. Succeeds when nothing is, or when the target does not exist. */
export async function unmount(target: string, runner: CommandRunner = hostCommands): Promise<void> {
  assertAbsolutePath(target, 'mount target');
  try {
    fs.lstatSync(target);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    // Anything else (ENOTCONN from a dead FUSE mount, EIO) still has a mount to remove.
  }
  for (let i = 0; i < maxStackedMounts; i++) {
    if (!(await isMounted(target, runner))) return;
    await runner.run('umount', [target], { timeoutMs: mountTimeoutMs });
  }
  throw new ArborError('internal', `${target} is still mounted after ${maxStackedMounts} unmounts; see 'findmnt ${target}'`);
}

/** Whether something is mounted exactly at `target` (not merely on a filesystem above it). */
export async function isMounted(target: string, runner: CommandRunner = hostCommands): Promise<boolean> {
  return (await findmnt(target, 'TARGET', runner)) !== undefined;
}

/**
 * The device mounted at `target`, or undefined when nothing is. For a bind mount of
 * a directory, findmnt writes "DEVICE[/path]"; the path is dropped.
 */
export async function mountedDevice(target: string, runner: CommandRunner = hostCommands): Promise<string | undefined> {
  const source = await findmnt(target, 'SOURCE', runner);
  return source?.replace(/\[.*\]$/, '');
}

async function mountOptions(target: string, runner: CommandRunner): Promise<string[]> {
  return ((await findmnt(target, 'VFS-OPTIONS', runner)) ?? '').split(',');
}

/** One column of the top-most mount at `target`; undefined when nothing is mounted there. */
async function findmnt(target: string, column: string, runner: CommandRunner): Promise<string | undefined> {
  assertAbsolutePath(target, 'mount target');
  const result = await runner.run('findmnt', ['--noheadings', '--output', column, '--mountpoint', target], { timeoutMs: probeTimeoutMs, allowFailure: true });
  if (result.status === 1) return undefined; // findmnt: "nothing found"
  if (result.status !== 0) throw commandFailed('findmnt', ['--noheadings', '--output', column, '--mountpoint', target], result);
  // Mounts stacked on one target are listed in mount order: the last one is the visible one.
  const lines = result.stdout.split('\n').filter((line) => line.trim() !== '');
  return lines.length > 0 ? lines[lines.length - 1].trim() : undefined;
}

// ---- Growing and usage ----

/**
 * Grows a filesystem to fill its device, which is larger after a resize and a new
 * attach (neither nbdfuse nor the kernel's NBD client sees a size change while
 * connected). ext4 grows online when mounted at `mountPoint`, through the kernel,
 * which requires CAP_SYS_RESOURCE; when not mounted it grows offline (after a full
 * check, when resize2fs insists on one), which needs no capability. xfs grows only
 * while mounted, through the mount point. A filesystem that already fills its
 * device is left as it is.
 */
export async function growFilesystem(device: string, mountPoint: string, fsType: FilesystemType, runner: CommandRunner = hostCommands): Promise<void> {
  assertAbsolutePath(device, 'device');
  assertAbsolutePath(mountPoint, 'mount point');
  const mounted = (await isMounted(mountPoint, runner)) && (await mountedDevice(mountPoint, runner)) === device;
  if (assertFilesystemType(fsType) === 'xfs') {
    if (!mounted)
      throw new ArborError(
        'failed-precondition',
        `the xfs filesystem on ${device} can only grow while mounted, and it is not mounted at ${mountPoint}; mount it first`,
      );
    // -d: the data section, to the whole device.
    await runner.run('xfs_growfs', ['-d', mountPoint], { timeoutMs: growTimeoutMs });
    return;
  }
  if (!mounted) {
    const first = await runner.run('resize2fs', [device], { timeoutMs: growTimeoutMs, allowFailure: true });
    if (first.status === 0) return;
    // Offline, resize2fs may insist on a full check first ("Please run 'e2fsck -f DEVICE' first").
    if (!/Please run 'e2fsck -f/.test(first.stdout + first.stderr)) throw commandFailed('resize2fs', [device], first);
    await e2fsck(device, ['-f', '-p'], runner);
    await runner.run('resize2fs', [device], { timeoutMs: growTimeoutMs });
    return;
  }
  const result = await runner.run('resize2fs', [device], { timeoutMs: growTimeoutMs, allowFailure: true });
  if (result.status === 0) return;
  if (/Permission denied to resize/.test(result.stderr) && !hasCapability(capSysResource)) {
    throw new ArborError(
      'failed-precondition',
      `cannot grow the mounted ext4 filesystem on ${device} at ${mountPoint}: the kernel resizes a mounted ext4 only for a process with CAP_SYS_RESOURCE, and this one lacks it; run the node plugin privileged, or grow it while unmounted`,
    );
  }
  throw commandFailed('resize2fs', [device], result);
}

/** The capability ext4's online resize checks (linux/capability.h). */
const capSysResource = 24;

function hasCapability(bit: number): boolean {
  const effective = /^CapEff:\s*([0-9a-f]+)$/m.exec(fs.readFileSync('/proc/self/status', 'utf8'));
  return effective !== null && (BigInt(`0x${effective[1]}`) & (1n << BigInt(bit))) !== 0n;
}

export interface FilesystemStats {
  totalBytes: number;
  usedBytes: number;
  /** What an unprivileged writer can still use: ext4 reserves blocks for root. */
  availableBytes: number;
  totalInodes: number;
  usedInodes: number;
  freeInodes: number;
}

export async function filesystemStats(mountPath: string): Promise<FilesystemStats> {
  assertAbsolutePath(mountPath, 'path');
  let stats: fs.StatsFs;
  try {
    stats = await fs.promises.statfs(mountPath);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new ArborError(code === 'ENOENT' ? 'not-found' : 'internal', `cannot read filesystem usage of ${mountPath}: ${(err as Error).message}`);
  }
  return {
    totalBytes: stats.blocks * stats.bsize,
    usedBytes: (stats.blocks - stats.bfree) * stats.bsize,
    availableBytes: stats.bavail * stats.bsize,
    totalInodes: stats.files,
    usedInodes: stats.files - stats.ffree,
    freeInodes: stats.ffree,
  };
}

// ---- Checks ----

function assertFilesystemType(fsType: string): FilesystemType {
  if (!(supportedFilesystems as readonly string[]).includes(fsType)) {
    throw new ArborError('invalid-argument', `filesystem type '${fsType}' is not supported; use one of ${supportedFilesystems.join(', ')}`);
  }
  return fsType as FilesystemType;
}

/** Paths reach argv: an absolute, normalized path can be neither an option nor a relative surprise. */
function assertAbsolutePath(value: string, what: string): void {
  if (!path.isAbsolute(value) || path.resolve(value) !== value || /[\0\n]/.test(value)) {
    throw new ArborError('invalid-argument', `${what} '${value}' must be an absolute, normalized path`);
  }
}
