/**
 * The kernel attach path: the nbd driver, configured by nbd-client (Debian
 * nbd-client 3.24), talks NBD to `arbor serve` over its unix socket.
 *
 * The kernel records who configured a device: /sys/block/nbdN/pid appears when the
 * device is connected and holds the pid of the process that connected it (with
 * netlink, nbd-client, which then exits; with the ioctl interface, the nbd-client
 * that stays to serve it). That pid is unique to one connection, so it tells our
 * attachment from a later one on the same device. It is kept, with the request, in
 * WORKDIR/kernel-attachment.json, so an attach repeated after a plugin restart finds
 * the device again.
 */
import fs from 'node:fs';
import path from 'node:path';
import { ArborError } from '../../store/errors';
import { CommandRunner, processAlive, waitUntil } from '../host/commands';
import { accessOf, Attacher, AttachRequest, Attachment, detailNumber, detailString, OneAtATime, validateAttachRequest } from './attacher';

/** The block size the device presents: the page size, what filesystems use anyway. */
export const nbdBlockSizeBytes = 4096;
/** Connections per device: the server advertises multi-conn, so the kernel spreads requests over them. */
export const nbdConnections = 4;
/** A request the server has not answered in this long fails with EIO instead of hanging the filesystem forever. */
export const nbdRequestTimeoutSeconds = 60;
/** How long nbd-client may take to connect and configure the device. */
export const nbdClientTimeoutMs = 60_000;
/** How long the device may take to show its size after nbd-client returns (the ioctl interface configures it from a child). */
export const nbdDeviceReadyTimeoutMs = 5_000;
/** How long the device may take to drop its connection after `nbd-client -d`. */
export const nbdReleaseTimeoutMs = 5_000;

export interface KernelAttacherOptions {
  /** Where the nbd devices appear in sysfs; /sys/block by default. */
  sysBlockDir?: string;
  /** Where their device nodes are; /dev by default. */
  devDir?: string;
  /** Where to look for processes; /proc by default. */
  procDir?: string;
}

const recordFileName = 'kernel-attachment.json';
/** Free devices are picked from the shared pool of the host: one attach at a time. */
const poolKey = 'nbd-devices';

export class KernelAttacher implements Attacher {
  readonly kind = 'kernel' as const;
  private readonly sysBlockDir: string;
  private readonly devDir: string;
  private readonly procDir: string;
  private readonly serial = new OneAtATime();

  constructor(
    private readonly runner: CommandRunner,
    options: KernelAttacherOptions = {},
  ) {
    this.sysBlockDir = options.sysBlockDir ?? '/sys/block';
    this.devDir = options.devDir ?? '/dev';
    this.procDir = options.procDir ?? '/proc';
  }

  async attach(request: AttachRequest): Promise<Attachment> {
    validateAttachRequest(request);
    return this.serial.run(poolKey, async () => {
      const recorded = readRecord(request.workDir);
      if (recorded && this.connectionPid(recorded) !== undefined) {
        if (!sameRequest(recorded, request)) {
          throw new ArborError(
            'failed-precondition',
            `export ${request.exportName}: work directory ${request.workDir} already holds ${detailString(recorded, 'exportName')} (${detailString(recorded, 'access')}) on ${recorded.device}; detach it before attaching ${accessOf(request.readOnly)}`,
          );
        }
        if (this.healthy(recorded)) return { ...recorded, sizeBytes: this.sizeBytes(deviceName(recorded.device)) };
        await this.disconnect(recorded);
      }
      fs.rmSync(path.join(request.workDir, recordFileName), { force: true });
      return this.attachFresh(request);
    });
  }

  detach(attachment: Attachment): Promise<void> {
    return this.serial.run(poolKey, async () => {
      // A device whose connection is not ours any more was detached already (and may serve another volume now).
      if (this.connectionPid(attachment) !== undefined) await this.disconnect(attachment);
      const workDir = detailString(attachment, 'workDir');
      const recorded = readRecord(workDir);
      if (recorded && recorded.device === attachment.device && recorded.details.connectionPid === attachment.details.connectionPid) {
        fs.rmSync(path.join(workDir, recordFileName), { force: true });
      }
    });
  }

  async isHealthy(attachment: Attachment): Promise<boolean> {
    return this.connectionPid(attachment) !== undefined && this.healthy(attachment);
  }

  /** nbd-client -unix SOCKET /dev/nbdN -name EXPORT -block-size 4096 -connections 4 -timeout 60 [-readonly] */
  nbdClientArgs(request: AttachRequest, device: string): string[] {
    return [
      '-unix', request.socketPath, device,
      '-name', request.exportName,
      '-block-size', String(nbdBlockSizeBytes),
      '-connections', String(nbdConnections),
      '-timeout', String(nbdRequestTimeoutSeconds),
      ...(request.readOnly ? ['-readonly'] : []),
    ]; // prettier-ignore
  }

  private async attachFresh(request: AttachRequest): Promise<Attachment> {
    const name = this.freeDevice(request.exportName);
    const device = path.join(this.devDir, name);
    await this.runner.run('nbd-client', this.nbdClientArgs(request, device), { timeoutMs: nbdClientTimeoutMs });
    const ready = await waitUntil(() => this.sizeBytes(name) > 0 && this.sysfsPid(name) !== undefined, nbdDeviceReadyTimeoutMs);
    if (!ready) {
      await this.runner.run('nbd-client', ['-d', device], { timeoutMs: nbdClientTimeoutMs, allowFailure: true });
      throw new ArborError('internal', `export ${request.exportName}: nbd-client connected ${device} but the device shows no size after ${nbdDeviceReadyTimeoutMs} ms; see the kernel log (dmesg)`);
    }
    const attachment: Attachment = {
      kind: 'kernel',
      device,
      sizeBytes: this.sizeBytes(name),
      details: {
        workDir: request.workDir,
        exportName: request.exportName,
        socketPath: request.socketPath,
        access: accessOf(request.readOnly),
        connectionPid: this.sysfsPid(name)!,
      },
    };
    writeRecord(request.workDir, attachment);
    return attachment;
  }

  /** The lowest-numbered device with no connection: no pid file and a size of 0. */
  private freeDevice(exportName: string): string {
    const names = fs
      .readdirSync(this.sysBlockDir)
      .filter((name) => /^nbd\d+$/.test(name))
      .sort((a, b) => Number(a.slice(3)) - Number(b.slice(3)));
    if (names.length === 0) throw new ArborError('failed-precondition', `export ${exportName}: this host has no nbd devices in ${this.sysBlockDir}; load the nbd kernel module (modprobe nbd)`);
    const free = names.find((name) => this.sysfsPid(name) === undefined && this.sizeBytes(name) === 0 && fs.existsSync(path.join(this.devDir, name)));
    if (!free) {
      throw new ArborError(
        'resource-exhausted',
        `export ${exportName}: all ${names.length} nbd devices of this host are in use (${names[0]} to ${names[names.length - 1]}); detach unused volumes, or reload the nbd module with more devices (modprobe nbd nbds_max=${names.length * 2})`,
      );
    }
    return free;
  }

  private async disconnect(attachment: Attachment): Promise<void> {
    const name = deviceName(attachment.device);
    await this.runner.run('nbd-client', ['-d', attachment.device], { timeoutMs: nbdClientTimeoutMs });
    if (!(await waitUntil(() => this.sysfsPid(name) === undefined, nbdReleaseTimeoutMs))) {
      throw new ArborError('internal', `${attachment.device} (export ${detailString(attachment, 'exportName')}) is still connected ${nbdReleaseTimeoutMs} ms after 'nbd-client -d'; see the kernel log (dmesg)`);
    }
  }

  /** The connection's pid when the device is still connected by the attach that made `attachment`, else undefined. */
  private connectionPid(attachment: Attachment): number | undefined {
    const pid = this.sysfsPid(deviceName(attachment.device));
    return pid !== undefined && pid === detailNumber(attachment, 'connectionPid') ? pid : undefined;
  }

  /**
   * Connected and serving: the process that connected it is still alive (the ioctl
   * interface: nbd-client serves the device) or the device still has its size (netlink:
   * nbd-client has exited and the kernel holds the sockets).
   */
  private healthy(attachment: Attachment): boolean {
    const name = deviceName(attachment.device);
    return processAlive(detailNumber(attachment, 'connectionPid'), undefined, this.procDir) || this.sizeBytes(name) > 0;
  }

  private sysfsPid(name: string): number | undefined {
    try {
      const pid = Number(fs.readFileSync(path.join(this.sysBlockDir, name, 'pid'), 'utf8').trim());
      return Number.isSafeInteger(pid) && pid > 0 ? pid : undefined;
    } catch {
      return undefined;
    }
  }

  /** sysfs gives every block device's size in 512-byte sectors, whatever its block size. */
  private sizeBytes(name: string): number {
    try {
      return Number(fs.readFileSync(path.join(this.sysBlockDir, name, 'size'), 'utf8').trim()) * 512;
    } catch {
      return 0;
    }
  }
}

function deviceName(device: string): string {
  const name = path.basename(device);
  if (!/^nbd\d+$/.test(name)) throw new ArborError('invalid-argument', `${device} is not an nbd device; this attachment was not made by the kernel attacher`);
  return name;
}

function sameRequest(attachment: Attachment, request: AttachRequest): boolean {
  return attachment.details.exportName === request.exportName && attachment.details.socketPath === request.socketPath && attachment.details.access === accessOf(request.readOnly);
}

function readRecord(workDir: string): Attachment | undefined {
  let parsed: unknown;
  try {
    parsed = JSON.parse(fs.readFileSync(path.join(workDir, recordFileName), 'utf8'));
  } catch {
    return undefined; // none, or torn by a crash mid-write (writeRecord renames, so it should not be)
  }
  const record = parsed as Partial<Attachment> | null;
  if (record?.kind !== 'kernel' || typeof record.device !== 'string' || typeof record.details !== 'object' || record.details === null) return undefined;
  if (typeof record.details.connectionPid !== 'number' || typeof record.details.exportName !== 'string') return undefined;
  return { kind: 'kernel', device: record.device, sizeBytes: Number(record.sizeBytes), details: record.details };
}

function writeRecord(workDir: string, attachment: Attachment): void {
  const file = path.join(workDir, recordFileName);
  fs.writeFileSync(`${file}.tmp`, JSON.stringify(attachment), { mode: 0o600 });
  fs.renameSync(`${file}.tmp`, file);
}
