/**
 * The kernel attach path: the nbd driver, configured over netlink (nbd-netlink.ts).
 * The kernel never handshakes: this process negotiates each connection itself (the
 * export, simple replies), then hands the connected sockets to the kernel, which
 * sends the device's requests over them.
 *
 * Each device carries the volume's id as its backend identifier
 * (/sys/block/nbdN/backend), so a device is found again after a restart and a device
 * can never be given another volume's connections (the kernel refuses a RECONFIGURE
 * naming another identifier). What was attached is also kept in
 * WORKDIR/kernel-attachment.json, written before the attach reports success.
 *
 * Attachments outlive the process. A device is connected with no request timeout
 * and a dead-connection timeout: when its server goes away the kernel holds its I/O
 * that long for new connections. Where the server is this process's own (the node
 * plugin serves its volumes itself), every connection is made through
 * `LocalNbdServer.connectLocal`, so the server's end of each is known: a device is
 * healthy while one of them is open, and when one closes (the kernel gave up on it,
 * or the server dropped it) the attacher gives the device a fresh one. A restarted
 * process gives every device an earlier one attached fresh connections
 * (`reattach`); a stopping one first shortens the devices' request timeout
 * (`handOver`), so that requests it will never read are sent again within a second
 * to the next process instead of waiting out the kernel's default 30 s.
 */
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Log, silentLog } from '../../lib/logger';
import { nbdDeviceReconnects, nbdDevicesReattached, observeDeviceStall } from '../../lib/metrics';
import { ArborError } from '../../store/errors';
import { waitUntil } from '../host/commands';
import { mountPointsOfDevice, sysfsSizeBytes } from '../host/mounts';
import { NbdClient, NbdOptionError } from '../nbd/client';
import { REP, TFLAG } from '../nbd/protocol';
import { accessOf, Attacher, AttachRequest, Attachment, detailNumber, detailString, OneAtATime, validateAttachRequest } from './attacher';
import { configuredFor, devicesWithIdentifier, nbdIndex, nbdName, readSysfs } from './nbd-devices';
import { connectDevice, disconnectDevice, reconfigureDevice } from './nbd-netlink';

/** The block size the device presents: the page size, what filesystems use anyway. */
export const nbdBlockSizeBytes = 4096;
/** Connections per device when the server allows several (CAN_MULTI_CONN) and the host has the CPUs: the kernel spreads requests over them. */
export const nbdConnections = 4;
/** How long a device's I/O waits for a new connection when it has none (a plugin restart), before it fails with EIO. */
export const defaultDeadConnectionTimeoutSeconds = 300;
/**
 * The request timeout a stopping process gives its devices: a request it will never
 * read is sent again this soon (to a live connection, or held for the next process).
 * Linux requeues a timed-out request; it does not fail it.
 */
export const handOverRequestTimeoutSeconds = 1;
/** How long a device may take to drop its configuration after NBD_CMD_DISCONNECT (its receive threads end). */
export const nbdReleaseTimeoutMs = 5_000;
/** How long connecting and negotiating one connection may take. */
export const negotiateTimeoutMs = 30_000;
/** After a RECONFIGURE, how long the kernel gets to drop the sockets it found no dead slot for. */
const reconnectSettleMs = 200;
/** Between attempts to give a device its missing connections: from this, doubling up to the maximum. */
const healFirstDelayMs = 20;
const healMaxDelayMs = 5_000;

/** The node plugin's own NBD server, reached without going through its public socket. */
export interface LocalNbdServer {
  /** The public socket path: requests naming it are served by connectLocal. */
  socketPath: string;
  connectLocal(onread: net.OnReadOpts): Promise<{ socket: net.Socket; serverClosed: Promise<void> }>;
}

export interface KernelAttacherOptions {
  localServer?: LocalNbdServer;
  deadConnectionTimeoutSeconds?: number;
  log?: Log;
}

const recordFileName = 'kernel-attachment.json';

interface Negotiated {
  socket: net.Socket;
  sizeBytes: number;
  transmissionFlags: number;
  serverClosed?: Promise<void>;
}

/** A device connected to this process's own server: how many of its connections are open, and whether to keep them so. */
interface Link {
  attachment: Attachment;
  /** The device's connections (slots), fixed when it was connected. */
  slots: number;
  open: number;
  state: 'serving' | 'detaching' | 'stopping';
  /** Since when the device has had no open connection (ms since the epoch). */
  noServerSince?: number;
  healing?: Promise<void>;
}

export class KernelAttacher implements Attacher {
  readonly kind = 'kernel' as const;
  private readonly serial = new OneAtATime();
  private readonly links = new Map<string, Link>();
  private readonly deadConnectionTimeoutSeconds: number;
  private readonly log: Log;

  constructor(private readonly options: KernelAttacherOptions = {}) {
    this.deadConnectionTimeoutSeconds = options.deadConnectionTimeoutSeconds ?? defaultDeadConnectionTimeoutSeconds;
    this.log = options.log ?? silentLog;
  }

  async attach(request: AttachRequest): Promise<Attachment> {
    validateAttachRequest(request);
    return this.serial.run(request.workDir, async () => {
      const recorded = readRecord(request.workDir);
      // The device is the one carrying the volume's id, wherever the record says it is.
      const devices = devicesWithIdentifier(request.volumeId);
      if (recorded && devices.length === 1) {
        const current = onDevice(recorded, devices[0]);
        if (!sameRequest(current, request)) {
          throw new ArborError(
            'failed-precondition',
            `export ${request.exportName}: work directory ${request.workDir} already holds ${detailString(current, 'exportName')} (${detailString(current, 'access')}) on ${current.device}; detach it before attaching ${accessOf(request.readOnly)}`,
          );
        }
        // Alive, or given fresh connections in place: whatever uses the device (a mounted filesystem, a VM) never notices.
        if (!this.connectionsAlive(current)) return this.reconnectRecorded(current, Date.now());
        if (current.device !== recorded.device) writeRecord(request.workDir, current);
        return { ...current, sizeBytes: sysfsSizeBytes(nbdName(current.device)) };
      }
      // A device of this volume that no record names: a crash between connecting it and writing the record.
      for (const orphan of devices) await this.disconnect(orphanAttachment(orphan, request));
      fs.rmSync(path.join(request.workDir, recordFileName), { force: true });
      return this.attachFresh(request);
    });
  }

  /**
   * Gives a device an earlier process attached fresh connections to this process's
   * server (its I/O has waited since `lostSince`). The device is found by its backend
   * identifier, not the recorded index. Undefined when no device carries the volume's
   * id any more (the host restarted, or it was disconnected by hand).
   */
  reattach(attachment: Attachment, lostSince: number): Promise<Attachment | undefined> {
    const workDir = detailString(attachment, 'workDir');
    return this.serial.run(workDir, async () => {
      const volumeId = detailString(attachment, 'volumeId');
      const devices = devicesWithIdentifier(volumeId);
      if (devices.length === 0) return undefined;
      if (devices.length > 1)
        throw new ArborError(
          'internal',
          `devices ${devices.join(', ')} all carry volume ${volumeId}; detach all but one by hand (arbor-nbd-netlink disconnect --index N)`,
        );
      const reattached = await this.reconnectRecorded(onDevice(attachment, devices[0]), lostSince);
      nbdDevicesReattached.inc();
      return reattached;
    });
  }

  detach(attachment: Attachment): Promise<void> {
    const workDir = detailString(attachment, 'workDir');
    return this.serial.run(workDir, async () => {
      // A device whose configuration is not ours any more was detached already (and may serve another volume now).
      if (configuredFor(attachment.device, detailString(attachment, 'volumeId'))) await this.disconnect(attachment);
      const recorded = readRecord(workDir);
      if (recorded && recorded.device === attachment.device) fs.rmSync(path.join(workDir, recordFileName), { force: true });
    });
  }

  async isHealthy(attachment: Attachment): Promise<boolean> {
    return configuredFor(attachment.device, detailString(attachment, 'volumeId')) && this.connectionsAlive(attachment);
  }

  /** Grows (or shrinks) a connected device in place to the export's new size. */
  resize(attachment: Attachment, sizeBytes: number): Promise<Attachment> {
    return this.serial.run(detailString(attachment, 'workDir'), async () => {
      const volumeId = detailString(attachment, 'volumeId');
      if (!configuredFor(attachment.device, volumeId))
        throw new ArborError('failed-precondition', `${attachment.device} no longer carries volume ${volumeId}; stage the volume again`);
      await reconfigureDevice({ index: detailNumber(attachment, 'index'), identifier: volumeId, sizeBytes });
      const name = nbdName(attachment.device);
      if (!(await waitUntil(() => sysfsSizeBytes(name) === sizeBytes, nbdReleaseTimeoutMs))) {
        throw new ArborError(
          'internal',
          `${attachment.device} shows ${sysfsSizeBytes(name)} bytes after a RECONFIGURE to ${sizeBytes}; see the kernel log (dmesg)`,
        );
      }
      const resized = { ...attachment, sizeBytes };
      writeRecord(detailString(attachment, 'workDir'), resized);
      const link = this.links.get(attachment.device);
      if (link) link.attachment = resized;
      return resized;
    });
  }

  /**
   * The process is stopping (its NBD server is about to stop reading): gives each
   * device a short request timeout, so that what the kernel sends from now on and
   * this process never answers is sent again within a second, to the next process.
   * Devices stop healing. The next process sets the timeout back to none.
   */
  async handOver(): Promise<void> {
    const links = [...this.links.values()].filter((link) => link.state === 'serving');
    for (const link of links) link.state = 'stopping';
    await Promise.all(
      links.map((link) =>
        reconfigureDevice({
          index: detailNumber(link.attachment, 'index'),
          identifier: detailString(link.attachment, 'volumeId'),
          timeoutSeconds: handOverRequestTimeoutSeconds,
        }).catch((err) =>
          this.log.warn(
            'could not shorten the request timeout of a device before stopping; its requests in flight wait for the kernel default (30 s) instead',
            { device: link.attachment.device, error: (err as Error).message },
          ),
        ),
      ),
    );
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
        throw new ArborError(
          'unavailable',
          `export ${request.exportName} changed while it was being attached (${sizeBytes} bytes, flags ${transmissionFlags}, then ${differing.sizeBytes} bytes, flags ${differing.transmissionFlags}); try again`,
        );
      }
      const index = await connectDevice({
        sockets: negotiated.map((n) => n.socket),
        sizeBytes,
        blockSizeBytes: nbdBlockSizeBytes,
        serverFlags: transmissionFlags | (request.readOnly ? TFLAG.READ_ONLY : 0),
        // No request fails on a timer: a slow server is waited for, a dead one replaced.
        timeoutSeconds: 0,
        deadConnTimeoutSeconds: this.deadConnectionTimeoutSeconds,
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
      this.watch(this.linkFor(attachment), negotiated);
      writeRecord(request.workDir, attachment);
      if (attachment.sizeBytes !== sizeBytes || !configuredFor(device, request.volumeId)) {
        const shown = `size ${attachment.sizeBytes}, backend '${readSysfs(`nbd${index}`, 'backend') ?? ''}'`;
        await this.disconnect(attachment);
        fs.rmSync(path.join(request.workDir, recordFileName), { force: true });
        throw new ArborError(
          'internal',
          `export ${request.exportName}: the kernel connected ${device} but shows ${shown}, not ${sizeBytes} bytes for ${request.volumeId}; see the kernel log (dmesg)`,
        );
      }
      return attachment;
    } finally {
      // The kernel holds its own reference to each socket it took: closing ours leaves the connection open.
      for (const n of negotiated) n.socket.destroy();
    }
  }

  /** Gives a device that is ours but has lost its connections (some or all) fresh ones, in place, with no request timeout again. */
  private async reconnectRecorded(attachment: Attachment, lostSince: number): Promise<Attachment> {
    const current = { ...attachment, sizeBytes: sysfsSizeBytes(nbdName(attachment.device)) };
    writeRecord(detailString(current, 'workDir'), current);
    const link = this.linkFor(current);
    link.state = 'serving';
    if (link.open === 0) link.noServerSince ??= lostSince;
    await this.reconnect(link, link.slots - link.open, { timeoutSeconds: 0, deadConnTimeoutSeconds: this.deadConnectionTimeoutSeconds });
    if (link.open === 0)
      throw new ArborError(
        'unavailable',
        `${current.device} (volume ${detailString(current, 'volumeId')}) took none of its new connections; see the kernel log (dmesg)`,
      );
    if (link.open < link.slots) this.heal(link);
    return current;
  }

  /**
   * Negotiates `count` connections and hands them to the device with RECONFIGURE;
   * each takes the place of a dead one. The kernel silently drops a socket it finds
   * no dead slot for: its server end then closes, and the count of open ones shows it.
   */
  private async reconnect(link: Link, count: number, settings: { timeoutSeconds?: number; deadConnTimeoutSeconds?: number } = {}): Promise<void> {
    const request = requestOf(link.attachment);
    const negotiated: Negotiated[] = [];
    try {
      for (let i = 0; i < count; i++) negotiated.push(await this.negotiate(request));
      const before = link.open;
      this.watch(link, negotiated);
      await reconfigureDevice({
        index: detailNumber(link.attachment, 'index'),
        identifier: request.volumeId,
        sockets: negotiated.map((n) => n.socket),
        ...settings,
      });
      for (const n of negotiated) n.socket.destroy();
      await sleep(reconnectSettleMs);
      if (link.open > before) nbdDeviceReconnects.inc(link.open - before);
    } finally {
      for (const n of negotiated) n.socket.destroy();
    }
  }

  /** Keeps giving a device its missing connections while it is ours and serving, backing off while none are taken. */
  private heal(link: Link): void {
    if (link.healing || link.state !== 'serving') return;
    link.healing = (async () => {
      let delay = healFirstDelayMs;
      while (link.state === 'serving' && link.open < link.slots) {
        await sleep(delay);
        if (link.state !== 'serving' || !configuredFor(link.attachment.device, detailString(link.attachment, 'volumeId'))) return;
        const before = link.open;
        try {
          await this.reconnect(link, link.slots - link.open);
        } catch (err) {
          this.log.warn('could not give an NBD device a new connection; trying again', { device: link.attachment.device, error: (err as Error).message });
        }
        delay = link.open > before ? healFirstDelayMs : Math.min(healMaxDelayMs, delay * 2);
      }
    })().finally(() => (link.healing = undefined));
  }

  private linkFor(attachment: Attachment): Link {
    let link = this.links.get(attachment.device);
    if (!link || detailString(link.attachment, 'volumeId') !== detailString(attachment, 'volumeId')) {
      link = { attachment, slots: detailNumber(attachment, 'connections'), open: 0, state: 'serving' };
      this.links.set(attachment.device, link);
    }
    link.attachment = attachment;
    return link;
  }

  /** Counts the server ends of a device's connections, and heals it when one closes. */
  private watch(link: Link, negotiated: Negotiated[]): void {
    for (const { serverClosed } of negotiated) {
      if (!serverClosed) continue;
      if (link.open++ === 0 && link.noServerSince !== undefined) {
        observeDeviceStall((Date.now() - link.noServerSince) / 1000);
        link.noServerSince = undefined;
      }
      void serverClosed.then(() => {
        if (--link.open === 0) link.noServerSince = Date.now();
        if (this.links.get(link.attachment.device) === link) this.heal(link);
      });
    }
  }

  /** One connection, negotiated and no longer read, ready for the kernel. */
  private async negotiate(request: AttachRequest): Promise<Negotiated> {
    const local = this.localServerFor(request.socketPath);
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
      timer = setTimeout(
        () =>
          reject(
            new ArborError(
              'unavailable',
              `export ${request.exportName}: the NBD server at ${request.socketPath} did not finish the handshake within ${negotiateTimeoutMs} ms`,
            ),
          ),
        negotiateTimeoutMs,
      );
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

  private localServerFor(socketPath: string): LocalNbdServer | undefined {
    return this.options.localServer?.socketPath === socketPath ? this.options.localServer : undefined;
  }

  /**
   * Whether the device can still reach its server. For our own server we know each
   * connection's end; an outside server (a benchmark's nbdkit) is not ours to see, and
   * the kernel's configuration is all there is.
   */
  private connectionsAlive(attachment: Attachment): boolean {
    if (!this.localServerFor(detailString(attachment, 'socketPath'))) return true;
    const link = this.links.get(attachment.device);
    return link !== undefined && detailString(link.attachment, 'volumeId') === detailString(attachment, 'volumeId') && link.open > 0;
  }

  private async disconnect(attachment: Attachment): Promise<void> {
    const name = nbdName(attachment.device);
    const exportName = detailString(attachment, 'exportName');
    const mountedAt = mountPointsOfDevice(attachment.device);
    if (mountedAt.length > 0) {
      throw new ArborError(
        'failed-precondition',
        `export ${exportName}: ${attachment.device} is still mounted at ${mountedAt.join(', ')}; unmount it before detaching`,
      );
    }
    const link = this.links.get(attachment.device);
    if (link) link.state = 'detaching';
    await disconnectDevice(detailNumber(attachment, 'index'));
    if (link && this.links.get(attachment.device) === link) this.links.delete(attachment.device);
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
    return new ArborError(
      'not-found',
      `export ${request.exportName}: the NBD server at ${request.socketPath} has no such export; see 'arbor volume list' and 'arbor snapshot list'`,
    );
  }
  const code = (err as NodeJS.ErrnoException).code;
  if (code === 'ENOENT' || code === 'ECONNREFUSED') {
    return new ArborError('unavailable', `export ${request.exportName}: no NBD server listens on ${request.socketPath}: is arbor serve running on this node?`);
  }
  return new ArborError(
    'unavailable',
    `export ${request.exportName}: negotiating with the NBD server at ${request.socketPath} failed: ${(err as Error).message}`,
  );
}

/** The request an attachment was made from. */
function requestOf(attachment: Attachment): AttachRequest {
  return {
    socketPath: detailString(attachment, 'socketPath'),
    exportName: detailString(attachment, 'exportName'),
    volumeId: detailString(attachment, 'volumeId'),
    readOnly: detailString(attachment, 'access') === 'read-only',
    workDir: detailString(attachment, 'workDir'),
  };
}

/** The attachment, on the device that carries its volume's id (a record may name a stale index). */
function onDevice(attachment: Attachment, device: string): Attachment {
  return { ...attachment, device, details: { ...attachment.details, index: nbdIndex(device) } };
}

function orphanAttachment(device: string, request: AttachRequest): Attachment {
  return {
    kind: 'kernel',
    device,
    sizeBytes: sysfsSizeBytes(nbdName(device)),
    details: {
      workDir: request.workDir,
      exportName: request.exportName,
      socketPath: request.socketPath,
      access: 'unknown',
      volumeId: request.volumeId,
      index: nbdIndex(device),
      connections: 0,
    },
  };
}

function sameRequest(attachment: Attachment, request: AttachRequest): boolean {
  return (
    attachment.details.exportName === request.exportName &&
    attachment.details.socketPath === request.socketPath &&
    attachment.details.access === accessOf(request.readOnly)
  );
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
  if (
    typeof details.index !== 'number' ||
    typeof details.volumeId !== 'string' ||
    typeof details.exportName !== 'string' ||
    typeof details.socketPath !== 'string'
  )
    return undefined;
  if (typeof details.connections !== 'number') return undefined;
  return { kind: 'kernel', device: record.device, sizeBytes: Number(record.sizeBytes), details };
}

function writeRecord(workDir: string, attachment: Attachment): void {
  const file = path.join(workDir, recordFileName);
  fs.writeFileSync(`${file}.tmp`, JSON.stringify(attachment), { mode: 0o600 });
  fs.renameSync(`${file}.tmp`, file);
}
