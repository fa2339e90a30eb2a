/**
 * The kernel attach path: the nbd driver, configured over netlink (nbd-netlink.ts).
 * The kernel never handshakes: this process negotiates each connection itself (the
 * export, simple replies), then hands the connected sockets to the kernel, which
 * sends the device's requests over them.
 *
 * Each device carries the volume's id as its backend identifier
 * (/sys/block/nbdN/backend), so a device is found again after a restart and a device
 * can never be taken for another volume's. What was attached is also kept in
 * WORKDIR/kernel-attachment.json, written before the attach reports success.
 *
 * Where the server is this process's own (the node plugin serves its volumes
 * itself), each connection is made through `LocalNbdServer.connectLocal`, so the
 * server's end of every connection is known: a device is healthy while at least one
 * of them is open. After a restart none are, until the device is attached again.
 */
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { ArborError } from '../../store/errors';
import { waitUntil } from '../host/commands';
import { blockDeviceName, mountPointsOfDevice, sysBlockDir, sysfsSizeBytes } from '../host/mounts';
import { NbdClient, NbdOptionError } from '../nbd/client';
import { REP, TFLAG } from '../nbd/protocol';
import { accessOf, Attacher, AttachRequest, Attachment, detailNumber, detailString, OneAtATime, validateAttachRequest } from './attacher';
import { connectDevice, disconnectDevice } from './nbd-netlink';

/** The block size the device presents: the page size, what filesystems use anyway. */
export const nbdBlockSizeBytes = 4096;
/** Connections per device when the server allows several (CAN_MULTI_CONN) and the host has the CPUs: the kernel spreads requests over them. */
export const nbdConnections = 4;
/** How long a device may take to drop its configuration after NBD_CMD_DISCONNECT (its receive threads end). */
export const nbdReleaseTimeoutMs = 5_000;
/** How long connecting and negotiating one connection may take. */
export const negotiateTimeoutMs = 30_000;

/** The node plugin's own NBD server, reached without going through its public socket. */
export interface LocalNbdServer {
  /** The public socket path: requests naming it are served by connectLocal. */
  socketPath: string;
  connectLocal(onread: net.OnReadOpts): Promise<{ socket: net.Socket; serverClosed: Promise<void> }>;
}

export interface KernelAttacherOptions {
  localServer?: LocalNbdServer;
}

const recordFileName = 'kernel-attachment.json';

interface Negotiated {
  socket: net.Socket;
  sizeBytes: number;
  transmissionFlags: number;
  serverClosed?: Promise<void>;
}

export class KernelAttacher implements Attacher {
  readonly kind = 'kernel' as const;
  private readonly serial = new OneAtATime();
  /** Devices this process connected to its own server: how many of their connections the server still holds open. */
  private readonly openConnections = new Map<string, { volumeId: string; open: number }>();

  constructor(private readonly options: KernelAttacherOptions = {}) {}

  async attach(request: AttachRequest): Promise<Attachment> {
    validateAttachRequest(request);
    return this.serial.run(request.workDir, async () => {
      const recorded = readRecord(request.workDir);
      const current = recorded && this.stillOurs(recorded) ? recorded : undefined;
      if (current) {
        if (!sameRequest(current, request)) {
          throw new ArborError(
            'failed-precondition',
            `export ${request.exportName}: work directory ${request.workDir} already holds ${detailString(current, 'exportName')} (${detailString(current, 'access')}) on ${current.device}; detach it before attaching ${accessOf(request.readOnly)}`,
          );
        }
        if (this.connectionsAlive(current)) return { ...current, sizeBytes: sysfsSizeBytes(deviceName(current.device)) };
        await this.disconnect(current);
      }
      // A device of this volume that no record names: a crash between connecting it and writing the record.
      for (const orphan of devicesWithIdentifier(request.volumeId)) await this.disconnect(orphanAttachment(orphan, request));
      fs.rmSync(path.join(request.workDir, recordFileName), { force: true });
      return this.attachFresh(request);
    });
  }

  detach(attachment: Attachment): Promise<void> {
    const workDir = detailString(attachment, 'workDir');
    return this.serial.run(workDir, async () => {
      // A device whose configuration is not ours any more was detached already (and may serve another volume now).
      if (this.stillOurs(attachment)) await this.disconnect(attachment);
      const recorded = readRecord(workDir);
      if (recorded && recorded.device === attachment.device) fs.rmSync(path.join(workDir, recordFileName), { force: true });
    });
  }

  async isHealthy(attachment: Attachment): Promise<boolean> {
    return this.stillOurs(attachment) && this.connectionsAlive(attachment);
  }

  private async attachFresh(request: AttachRequest): Promise<Attachment> {
    const negotiated: Negotiated[] = [];
    try {
      negotiated.push(await this.negotiate(request));
      const { sizeBytes, transmissionFlags } = negotiated[0];
      // The kernel gives each connection a hardware queue, one per CPU at most: more connections than CPUs would sit idle.
      const wanted = transmissionFlags & TFLAG.CAN_MULTI_CONN ? Math.min(nbdConnections, os.availableParallelism()) : 1;
      while (negotiated.length < wanted) negotiated.push(await this.negotiate(request));
      const differing = negotiated.find((n) => n.sizeBytes !== sizeBytes || n.transmissionFlags !== transmissionFlags);
      if (differing) {
        throw new ArborError('unavailable', `export ${request.exportName} changed while it was being attached (${sizeBytes} bytes, flags ${transmissionFlags}, then ${differing.sizeBytes} bytes, flags ${differing.transmissionFlags}); try again`);
      }
      const index = await connectDevice({
        sockets: negotiated.map((n) => n.socket),
        sizeBytes,
        blockSizeBytes: nbdBlockSizeBytes,
        serverFlags: transmissionFlags | (request.readOnly ? TFLAG.READ_ONLY : 0),
        identifier: request.volumeId,
      });
      const device = `/dev/nbd${index}`;
      const attachment: Attachment = {
        kind: 'kernel',
        device,
        sizeBytes: sysfsSizeBytes(`nbd${index}`),
        details: {
          workDir: request.workDir,
          exportName: request.exportName,
          socketPath: request.socketPath,
          access: accessOf(request.readOnly),
          volumeId: request.volumeId,
          index,
          connections: negotiated.length,
        },
      };
      this.watchConnections(attachment, negotiated);
      writeRecord(request.workDir, attachment);
      if (attachment.sizeBytes !== sizeBytes || !this.stillOurs(attachment)) {
        const shown = `size ${attachment.sizeBytes}, backend '${readSysfs(`nbd${index}`, 'backend') ?? ''}'`;
        await this.disconnect(attachment);
        fs.rmSync(path.join(request.workDir, recordFileName), { force: true });
        throw new ArborError('internal', `export ${request.exportName}: the kernel connected ${device} but shows ${shown}, not ${sizeBytes} bytes for ${request.volumeId}; see the kernel log (dmesg)`);
      }
      return attachment;
    } finally {
      // The kernel holds its own reference to each socket it took: closing ours leaves the connection open.
      for (const n of negotiated) n.socket.destroy();
    }
  }

  /** One connection, negotiated and no longer read, ready for the kernel. */
  private async negotiate(request: AttachRequest): Promise<Negotiated> {
    const local = this.options.localServer?.socketPath === request.socketPath ? this.options.localServer : undefined;
    let serverClosed: Promise<void> | undefined;
    const open = async (onread: net.OnReadOpts): Promise<net.Socket> => {
      if (local) {
        const connection = await local.connectLocal(onread);
        serverClosed = connection.serverClosed;
        return connection.socket;
      }
      const socket = net.connect({ path: request.socketPath, onread });
      await once(socket, 'connect');
      return socket;
    };
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new ArborError('unavailable', `export ${request.exportName}: the NBD server at ${request.socketPath} did not finish the handshake within ${negotiateTimeoutMs} ms`)), negotiateTimeoutMs);
    });
    try {
      const negotiated = await Promise.race([NbdClient.negotiateForKernel(open, request.exportName), timeout]);
      return { ...negotiated, serverClosed };
    } catch (err) {
      throw negotiationError(request, err);
    } finally {
      clearTimeout(timer);
    }
  }

  private watchConnections(attachment: Attachment, negotiated: Negotiated[]): void {
    const closed = negotiated.map((n) => n.serverClosed).filter((p): p is Promise<void> => p !== undefined);
    if (closed.length === 0) return;
    const entry = { volumeId: detailString(attachment, 'volumeId'), open: closed.length };
    this.openConnections.set(attachment.device, entry);
    for (const promise of closed) void promise.then(() => entry.open--);
  }

  /**
   * Whether the device can still reach its server. For our own server we know each
   * connection's end; an outside server (a benchmark's nbdkit) is not ours to see, and
   * the kernel's configuration is all there is.
   */
  private connectionsAlive(attachment: Attachment): boolean {
    if (this.options.localServer?.socketPath !== detailString(attachment, 'socketPath')) return true;
    const entry = this.openConnections.get(attachment.device);
    return entry !== undefined && entry.volumeId === detailString(attachment, 'volumeId') && entry.open > 0;
  }

  /** The device is still configured, for this attachment's volume. */
  private stillOurs(attachment: Attachment): boolean {
    const name = deviceName(attachment.device);
    return readSysfs(name, 'pid') !== undefined && readSysfs(name, 'backend') === detailString(attachment, 'volumeId');
  }

  private async disconnect(attachment: Attachment): Promise<void> {
    const name = deviceName(attachment.device);
    const exportName = detailString(attachment, 'exportName');
    const mountedAt = mountPointsOfDevice(attachment.device);
    if (mountedAt.length > 0) {
      throw new ArborError('failed-precondition', `export ${exportName}: ${attachment.device} is still mounted at ${mountedAt.join(', ')}; unmount it before detaching`);
    }
    await disconnectDevice(detailNumber(attachment, 'index'));
    this.openConnections.delete(attachment.device);
    if (!(await waitUntil(() => readSysfs(name, 'pid') === undefined, nbdReleaseTimeoutMs))) {
      throw new ArborError(
        'failed-precondition',
        `${attachment.device} (export ${exportName}) is still configured ${nbdReleaseTimeoutMs} ms after NBD_CMD_DISCONNECT: some process holds it open (see 'fuser -v ${attachment.device}'); close it and detach again`,
      );
    }
  }
}

function negotiationError(request: AttachRequest, err: unknown): Error {
  if (err instanceof ArborError) return err;
  if (err instanceof NbdOptionError && err.replyType === REP.ERR_UNKNOWN) {
    return new ArborError('not-found', `export ${request.exportName}: the NBD server at ${request.socketPath} has no such export; see 'arbor volume list' and 'arbor snapshot list'`);
  }
  const code = (err as NodeJS.ErrnoException).code;
  if (code === 'ENOENT' || code === 'ECONNREFUSED') {
    return new ArborError('unavailable', `export ${request.exportName}: no NBD server listens on ${request.socketPath}: is arbor serve running on this node?`);
  }
  return new ArborError('unavailable', `export ${request.exportName}: negotiating with the NBD server at ${request.socketPath} failed: ${(err as Error).message}`);
}

function deviceName(device: string): string {
  const name = path.basename(device);
  if (!/^nbd\d+$/.test(name) || device !== `/dev/${name}`) throw new ArborError('invalid-argument', `${device} is not an nbd device; this attachment was not made by the kernel attacher`);
  return name;
}

function readSysfs(name: string, file: string): string | undefined {
  try {
    const value = fs.readFileSync(path.join(sysBlockDir, name, file), 'utf8').trim();
    return value === '' ? undefined : value;
  } catch {
    return undefined;
  }
}

/** Connected nbd devices whose backend identifier is `identifier`. */
function devicesWithIdentifier(identifier: string): string[] {
  let names: string[];
  try {
    names = fs.readdirSync(sysBlockDir);
  } catch {
    return [];
  }
  return names.filter((name) => /^nbd\d+$/.test(name) && readSysfs(name, 'pid') !== undefined && readSysfs(name, 'backend') === identifier).map((name) => `/dev/${name}`);
}

function orphanAttachment(device: string, request: AttachRequest): Attachment {
  const name = blockDeviceName(device) ?? deviceName(device);
  return {
    kind: 'kernel',
    device,
    sizeBytes: sysfsSizeBytes(name),
    details: { workDir: request.workDir, exportName: request.exportName, socketPath: request.socketPath, access: 'unknown', volumeId: request.volumeId, index: Number(name.slice(3)), connections: 0 },
  };
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
  const { details } = record;
  if (typeof details.index !== 'number' || typeof details.volumeId !== 'string' || typeof details.exportName !== 'string' || typeof details.socketPath !== 'string') return undefined;
  return { kind: 'kernel', device: record.device, sizeBytes: Number(record.sizeBytes), details };
}

function writeRecord(workDir: string, attachment: Attachment): void {
  const file = path.join(workDir, recordFileName);
  fs.writeFileSync(`${file}.tmp`, JSON.stringify(attachment), { mode: 0o600 });
  fs.renameSync(`${file}.tmp`, file);
}
