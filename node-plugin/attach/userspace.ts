/**
 * The userspace attach path, for hosts without the kernel NBD driver: nbdfuse
 * exposes the export as a file in a FUSE mount inside the volume's work directory,
 * and a loop device (direct I/O, so pages are not cached twice) makes that file a
 * block device.
 *
 *   WORKDIR/nbdfuse.pid   the nbdfuse pid, written by nbdfuse once it serves
 *   WORKDIR/fuse/         nbdfuse's FUSE mount point
 *   WORKDIR/fuse/disk     the export as a file: the loop device's backing file
 *
 * Nothing else is recorded: what is attached is read back from the host (the pid
 * file, the process's argv, the loop devices' backing files in sysfs), so a plugin
 * restart or a crash half-way through an attach leaves nothing we cannot find.
 */
import fs from 'node:fs';
import path from 'node:path';
import { ArborError } from '../../store/errors';
import { CommandRunner, processAlive, processArgv, stopProcess, waitUntil } from '../host/commands';
import { isMountPoint, mountPointsOfDevice, sysBlockDir, sysfsSizeBytes } from '../host/mounts';
import { accessOf, Attacher, AttachRequest, Attachment, detailNumber, detailString, OneAtATime, validateAttachRequest } from './attacher';

/** How long nbdfuse may take to connect and mount before the attach fails. */
export const nbdfuseStartTimeoutMs = 10_000;
/** How long nbdfuse gets to exit after its FUSE mount goes, and again after each signal. */
export const nbdfuseExitGraceMs = 5_000;
/** How long a detached loop device may take to let go of its backing file. */
export const loopReleaseTimeoutMs = 5_000;
/** Timeout of one losetup or fusermount3 run. */
export const hostToolTimeoutMs = 30_000;
/** A health probe's read that takes longer than this counts as a dead connection. */
export const healthProbeTimeoutMs = 10_000;

interface Paths {
  workDir: string;
  pidFile: string;
  fuseDir: string;
  diskFile: string;
}

/** What the host holds for one work directory, whatever state it is in. */
interface Found {
  /** The live nbdfuse named by the pid file, when it is ours (its argv names this directory's pid file and disk file). */
  nbdfuse?: { pid: number; argv: string[] };
  loopDevices: string[];
  fuseMounted: boolean;
}

export class UserspaceAttacher implements Attacher {
  readonly kind = 'userspace' as const;
  private readonly serial = new OneAtATime();

  constructor(private readonly runner: CommandRunner) {}

  async attach(request: AttachRequest): Promise<Attachment> {
    validateAttachRequest(request);
    const paths = pathsIn(fs.realpathSync(request.workDir));
    return this.serial.run(paths.workDir, async () => {
      const argv = nbdfuseArgv(request, paths);
      const found = findIn(paths);
      if (found.nbdfuse && !processAlive(found.nbdfuse.pid, argv)) {
        throw new ArborError(
          'failed-precondition',
          `export ${request.exportName}: work directory ${paths.workDir} already holds an attachment made with other options (${found.nbdfuse.argv.join(' ')}); detach it before attaching ${accessOf(request.readOnly)}`,
        );
      }
      if (found.nbdfuse && found.loopDevices.length === 1) return attachmentOf(request, paths, found.nbdfuse.pid, found.loopDevices[0]);
      // Nothing, or a half-made attachment (a crash between nbdfuse and losetup, a
      // dead nbdfuse, a loop device removed by hand): clear it and start again.
      await this.tearDown(paths, found, request.exportName);
      return this.attachFresh(request, paths, argv);
    });
  }

  detach(attachment: Attachment): Promise<void> {
    const paths = pathsIn(detailString(attachment, 'workDir'));
    const exportName = detailString(attachment, 'exportName');
    return this.serial.run(paths.workDir, async () => {
      const found = findIn(paths);
      // A newer attachment in the same directory is not this one's to remove.
      if (found.nbdfuse && found.nbdfuse.pid !== detailNumber(attachment, 'nbdfusePid')) return;
      await this.tearDown(paths, found, exportName);
    });
  }

  /**
   * nbdfuse alive, the loop device still ours, and one sector readable through the
   * FUSE file. The read is needed: nbdfuse does not exit when its server goes away,
   * it answers every request with an error. It runs in dd, with O_DIRECT so the
   * page cache cannot answer, because a child can be killed when the read hangs.
   */
  async isHealthy(attachment: Attachment): Promise<boolean> {
    const paths = pathsIn(detailString(attachment, 'workDir'));
    if (!processAlive(detailNumber(attachment, 'nbdfusePid'), detailArgv(attachment)) || loopBackingFile(attachment.device) !== paths.diskFile) return false;
    const probe = ['if=' + paths.diskFile, 'of=/dev/null', 'bs=4096', 'count=1', 'iflag=direct', 'status=none'];
    try {
      return (await this.runner.run('dd', probe, { timeoutMs: healthProbeTimeoutMs, allowFailure: true })).status === 0;
    } catch {
      return false; // timed out
    }
  }

  private async attachFresh(request: AttachRequest, paths: Paths, argv: string[]): Promise<Attachment> {
    fs.mkdirSync(paths.fuseDir, { recursive: true, mode: 0o700 });
    fs.rmSync(paths.pidFile, { force: true });
    const spawnedPid = await this.runner.spawnDetached(argv[0], argv.slice(1));
    const serving = () => fs.existsSync(paths.pidFile) && fs.existsSync(paths.diskFile);
    // nbdfuse exits at once when it cannot connect or the export does not exist: no need to wait out the timeout.
    await waitUntil(() => serving() || !processAlive(spawnedPid), nbdfuseStartTimeoutMs);
    const ready = serving();
    const pid = readPidFile(paths.pidFile);
    if (!ready || pid !== spawnedPid || !processAlive(pid, argv)) {
      const what = processAlive(spawnedPid, argv) ? `did not serve it within ${nbdfuseStartTimeoutMs} ms` : 'exited without serving it';
      await this.tearDown(paths, findIn(paths), request.exportName);
      if (processAlive(spawnedPid, argv))
        await stopProcess(spawnedPid, () => processAlive(spawnedPid, argv), nbdfuseExitGraceMs, `nbdfuse for ${request.exportName}`);
      const hint = fs.existsSync(request.socketPath)
        ? "does the server have that export? see 'arbor volume list' and 'arbor snapshot list'"
        : 'the socket does not exist: is arbor serve running on this node?';
      throw new ArborError('unavailable', `export ${request.exportName}: nbdfuse ${what} from ${request.socketPath} (${hint})`);
    }
    try {
      const losetupArgs = ['-f', '--show', '--direct-io=on', ...(request.readOnly ? ['-r'] : []), paths.diskFile];
      const device = (await this.runner.run('losetup', losetupArgs, { timeoutMs: hostToolTimeoutMs })).stdout.trim();
      if (loopBackingFile(device) !== paths.diskFile) {
        throw new ArborError('internal', `export ${request.exportName}: losetup printed '${device}', which is not a loop device backed by ${paths.diskFile}`);
      }
      return attachmentOf(request, paths, pid, device);
    } catch (err) {
      await this.tearDown(paths, findIn(paths), request.exportName);
      throw err;
    }
  }

  /** Removes, in order, the loop devices, the FUSE mount and nbdfuse; succeeds when there is nothing to remove. */
  private async tearDown(paths: Paths, found: Found, exportName: string): Promise<void> {
    for (const device of found.loopDevices) {
      const mountedAt = mountPointsOfDevice(device);
      if (mountedAt.length > 0) {
        throw new ArborError('failed-precondition', `export ${exportName}: ${device} is still mounted at ${mountedAt.join(', ')}; unmount it before detaching`);
      }
      // Checked just before: losetup -d on a device since reused for another file would cut off someone else's volume.
      if (loopBackingFile(device) !== paths.diskFile) continue;
      await this.runner.run('losetup', ['-d', device], { timeoutMs: hostToolTimeoutMs });
      // A loop device still open elsewhere is only marked to clear itself on last close.
      if (!(await waitUntil(() => loopBackingFile(device) !== paths.diskFile, loopReleaseTimeoutMs))) {
        throw new ArborError(
          'failed-precondition',
          `export ${exportName}: ${device} is still in use after 'losetup -d' (held open by some process: see 'fuser -v ${device}'); close it and detach again`,
        );
      }
    }
    if (found.fuseMounted || isMountPoint(paths.fuseDir)) {
      await this.runner.run('fusermount3', ['-u', paths.fuseDir], { timeoutMs: hostToolTimeoutMs });
    }
    const nbdfuse = findIn(paths).nbdfuse ?? found.nbdfuse;
    if (nbdfuse) {
      // nbdfuse exits by itself once its mount is gone; the signals are for a stuck one.
      await stopProcess(nbdfuse.pid, () => processAlive(nbdfuse.pid, nbdfuse.argv), nbdfuseExitGraceMs, `nbdfuse for ${exportName}`);
    }
    fs.rmSync(paths.pidFile, { force: true });
  }
}

function pathsIn(workDir: string): Paths {
  const fuseDir = path.join(workDir, 'fuse');
  return { workDir, pidFile: path.join(workDir, 'nbdfuse.pid'), fuseDir, diskFile: path.join(fuseDir, 'disk') };
}

type ArgvRequest = Pick<AttachRequest, 'exportName' | 'socketPath' | 'readOnly' | 'workDir'>;

/** nbdfuse [-r] -P PIDFILE WORKDIR/fuse/disk nbd+unix:///EXPORT?socket=SOCKET */
function nbdfuseArgv(request: ArgvRequest, paths: Paths): string[] {
  return ['nbdfuse', ...(request.readOnly ? ['-r'] : []), '-P', paths.pidFile, paths.diskFile, nbdUri(request)];
}

/**
 * The export name and socket path segments are percent-encoded (libnbd decodes them):
 * a name may hold spaces, '/', '%' or '?', a path spaces or '+'. The '@' of NAME@SNAP
 * stays as it is (a URI path may hold one), so the URI of every export name Arbor
 * allowed before is unchanged and a running nbdfuse is still recognised by its argv.
 */
export function nbdUri(request: Pick<AttachRequest, 'exportName' | 'socketPath'>): string {
  return `nbd+unix:///${encodeURIComponent(request.exportName).replace(/%40/g, '@')}?socket=${request.socketPath.split('/').map(encodeURIComponent).join('/')}`;
}

/** Reads the host's state for a work directory. */
function findIn(paths: Paths): Found {
  const found: Found = { loopDevices: loopDevicesBackedBy(paths.diskFile), fuseMounted: isMountPoint(paths.fuseDir) };
  const pid = readPidFile(paths.pidFile);
  if (pid !== undefined && processAlive(pid)) {
    const argv = processArgv(pid);
    // Otherwise the pid was reused by an unrelated process after our nbdfuse died.
    if (path.basename(argv[0] ?? '') === 'nbdfuse' && argv.includes(paths.pidFile) && argv.includes(paths.diskFile)) found.nbdfuse = { pid, argv };
  }
  return found;
}

function attachmentOf(request: AttachRequest, paths: Paths, nbdfusePid: number, device: string): Attachment {
  return {
    kind: 'userspace',
    device,
    sizeBytes: loopSizeBytes(device),
    details: {
      workDir: paths.workDir,
      exportName: request.exportName,
      socketPath: request.socketPath,
      access: accessOf(request.readOnly),
      nbdfusePid,
    },
  };
}

function detailArgv(attachment: Attachment): string[] {
  const request: ArgvRequest = {
    workDir: detailString(attachment, 'workDir'),
    exportName: detailString(attachment, 'exportName'),
    socketPath: detailString(attachment, 'socketPath'),
    readOnly: detailString(attachment, 'access') === 'read-only',
  };
  return nbdfuseArgv(request, pathsIn(request.workDir));
}

function readPidFile(pidFile: string): number | undefined {
  try {
    const pid = Number(fs.readFileSync(pidFile, 'utf8').trim());
    return Number.isSafeInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

// ---- Loop devices, read from sysfs (not losetup: see host/mounts.ts) ----

function loopName(device: string): string | undefined {
  const match = /^\/dev\/(loop\d+)$/.exec(device);
  return match?.[1];
}

/** The file behind a loop device, or undefined when it is not bound (or not a loop device). */
export function loopBackingFile(device: string): string | undefined {
  const name = loopName(device);
  if (!name) return undefined;
  try {
    // The kernel appends " (deleted)" when the file was unlinked; ours never is, but the path stays comparable.
    return fs
      .readFileSync(path.join(sysBlockDir, name, 'loop', 'backing_file'), 'utf8')
      .trim()
      .replace(/ \(deleted\)$/, '');
  } catch {
    return undefined;
  }
}

export function loopDevicesBackedBy(file: string): string[] {
  return fs
    .readdirSync(sysBlockDir)
    .filter((name) => /^loop\d+$/.test(name))
    .map((name) => `/dev/${name}`)
    .filter((device) => loopBackingFile(device) === file);
}

function loopSizeBytes(device: string): number {
  const name = loopName(device);
  return name ? sysfsSizeBytes(name) : 0;
}
