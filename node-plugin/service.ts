import fs from 'node:fs';
import { formatRef } from '../store/names';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import type { NodeHandlers } from '../csi/generated/csi/v1/Node';
import type { NodeStageVolumeRequest__Output } from '../csi/generated/csi/v1/NodeStageVolumeRequest';
import { parseCapability } from '../csi/capabilities';
import { aborted, alreadyExists, CsiError, failedPrecondition, invalid, notFound } from '../csi/errors';
import { UnaryHandlers } from '../csi/server';
import { runBounded } from '../lib/bounded';
import { Log } from '../lib/logger';
import { StoreApi } from '../store/api';
import { Attacher, Attachment } from './attach/attacher';
import * as host from './host/filesystem';
import { hostCommands } from './host/commands';
import { ArborError, isArborError } from '../store/errors';
import { StagedVolume, StagedVolumes } from './staged-volumes';

export interface NodeOptions {
  nodeId: string;
  /** This node's NBD server, which the attacher connects the host to. */
  nbdSocket: string;
  /** Where the node keeps what it staged, to finish or undo it after a restart. */
  stateDir: string;
  topology?: Record<string, string>;
  maxVolumesPerNode: number;
  /** Chosen on first use, so a host that cannot attach fails staging with a clear reason, not startup. */
  attacher: () => Attacher;
  volumes: NodeVolumes;
  log: Log;
}

/** What the Node service asks about volumes: of the store where this node holds it, of the serving node where it relays. */
export interface NodeVolumes {
  /** A volume's export name, when the publish context names none; undefined when this node cannot tell. */
  exportNameOf(volumeId: string): Promise<string | undefined>;
  /** A volume's size now, as its server sees it (it may have grown since it was attached); undefined when it does not exist. */
  sizeOf(volumeId: string, exportName: string): Promise<number | undefined>;
}

/** The store answers for itself. */
export function storeVolumes(store: Pick<StoreApi, 'findVolume'>): NodeVolumes {
  return {
    exportNameOf: async (id) => {
      const volume = await store.findVolume({ id });
      return volume && formatRef(volume.name);
    },
    sizeOf: async (id) => (await store.findVolume({ id }))?.sizeBytes,
  };
}

const capabilities = ['STAGE_UNSTAGE_VOLUME', 'GET_VOLUME_STATS', 'EXPAND_VOLUME', 'VOLUME_CONDITION', 'SINGLE_NODE_MULTI_WRITER'] as const;

/** How often the plugin marks itself alive in its state directory: how precisely the next process knows how long devices waited. */
export const aliveIntervalMs = 1_000;
/**
 * At a stop, after the devices' request timeout was shortened: the plugin keeps
 * serving this long, so that what the kernel sent before the change is read and
 * answered; what it sends after is sent again to the next process within a second.
 */
export const handOverSettleMs = 200;
/** Devices re-attached at once at start: each is a few handshakes and a netlink call, then a short wait. */
const reattachConcurrency = 16;
/**
 * A volume that cannot be served yet at start (in distributed mode, the process that
 * died still owns it until its lease expires: 10 s by default) is tried again this
 * often, this long, in the background: Probe does not wait for it.
 */
const reattachRetryIntervalMs = 1_000;
const reattachRetryMs = 120_000;

/** The Node service's calls, and what the process around it does at its start and stop. */
export interface NodeService {
  handlers: UnaryHandlers<NodeHandlers>;
  /** Gives the kernel devices an earlier process of this node attached fresh connections; Probe is ready once it has run. */
  start(): Promise<void>;
  ready(): boolean;
  /** The process is stopping (call before its NBD server stops): the kernel devices wait for the next process. */
  handOver(): Promise<void>;
}

function required(value: string | undefined, field: string): string {
  if (!value) throw invalid(`${field} is required`);
  return value;
}

/**
 * The CSI Node service: stage = attach the volume's NBD export to the host as a block
 * device (and for Mount volumes check, format when blank, and mount it); publish =
 * bind it into the pod's target path. Every operation is idempotent, serialized per
 * volume (a concurrent one gets ABORTED), and recorded on disk so a plugin that
 * crashed half-way can be retried or undone.
 */
export function nodeService(options: NodeOptions): NodeService {
  const staged = new StagedVolumes(options.stateDir);
  const busy = new Set<string>();
  let attacher: Attacher | undefined;
  const getAttacher = (): Attacher => (attacher ??= options.attacher());
  let started = false;
  let alive: NodeJS.Timeout | undefined;

  const exclusive = async <T>(volumeId: string, fn: () => Promise<T>): Promise<T> => {
    if (busy.has(volumeId)) throw aborted(`an operation on volume ${volumeId} is already in progress; retry`);
    busy.add(volumeId);
    try {
      return await fn();
    } finally {
      busy.delete(volumeId);
    }
  };

  const exportNameFor = async (request: NodeStageVolumeRequest__Output): Promise<string> => {
    if (request.publish_context.export) return request.publish_context.export;
    if (request.volume_context.name) return formatRef(request.volume_context.name);
    const found = await options.volumes.exportNameOf(request.volume_id);
    if (!found) throw notFound(`volume ${request.volume_id} does not exist, or this node cannot tell: its publish context names no export`);
    return found;
  };

  /** A kernel device whose connections died gets fresh ones in place; undefined where that cannot be (userspace, or the device is gone). */
  const revive = async (state: StagedVolume): Promise<StagedVolume | undefined> => {
    const reattached = state.attachment.kind === 'kernel' ? await getAttacher().reattach?.(state.attachment, staged.lastAlive() ?? Date.now()) : undefined;
    if (!reattached) return undefined;
    const revived = { ...state, attachment: reattached };
    staged.save(revived);
    return revived;
  };

  const handlers: UnaryHandlers<NodeHandlers> = {
    async NodeGetCapabilities() {
      return { capabilities: capabilities.map((type) => ({ rpc: { type } })) };
    },

    async NodeGetInfo() {
      return {
        node_id: options.nodeId,
        max_volumes_per_node: String(options.maxVolumesPerNode),
        accessible_topology: options.topology ? { segments: options.topology } : null,
      };
    },

    async NodeStageVolume(request) {
      const volumeId = required(request.volume_id, 'volume_id');
      const stagingPath = required(request.staging_target_path, 'staging_target_path');
      const capability = parseCapability(request.volume_capability, 'volume_capability');
      return exclusive(volumeId, async () => {
        const readOnly = capability.readOnly || request.publish_context.readOnly === 'true';
        let state = staged.get(volumeId);
        if (state && state.stagingPath !== stagingPath) {
          throw alreadyExists(`volume ${volumeId} is already staged at ${state.stagingPath}, not ${stagingPath}`);
        }
        if (state && state.access !== capability.access) {
          throw alreadyExists(`volume ${volumeId} is staged as a ${state.access} volume; unstage it first`);
        }
        if (state && !(await getAttacher().isHealthy(state.attachment))) {
          const revived = await revive(state);
          if (revived) {
            options.log.info('volume re-attached: its device has new connections', { volume: volumeId, device: revived.attachment.device });
            state = revived;
          } else {
            // The userspace path cannot reconnect, and a kernel device may be gone: attach afresh.
            options.log.warn('attaching again a volume whose NBD connection died', {
              volume: volumeId,
              device: state.attachment.device,
              attacher: state.attachment.kind,
            });
            if (capability.access === 'mount') await host.unmount(stagingPath);
            await getAttacher().detach(state.attachment);
            state = undefined;
          }
        }
        if (!state) {
          if (staged.count() >= options.maxVolumesPerNode) {
            throw new CsiError(grpc.status.RESOURCE_EXHAUSTED, `node ${options.nodeId} already holds its maximum of ${options.maxVolumesPerNode} volumes`);
          }
          const exportName = await exportNameFor(request);
          const attachment = await getAttacher().attach({ socketPath: options.nbdSocket, exportName, volumeId, readOnly, workDir: staged.workDir(volumeId) });
          state = { volumeId, exportName, stagingPath, access: capability.access, readOnly, attachment, targets: {} };
          staged.save(state);
          options.log.info('volume attached', { volume: volumeId, export: exportName, device: attachment.device, attacher: attachment.kind });
        }
        if (capability.access === 'mount') {
          const fsType = await mountStaged(
            state,
            capability.fsType ?? (request.volume_context.fsType as 'ext4' | 'xfs' | undefined),
            request.volume_context.mkfsOptions,
            capability.mountFlags,
            options.log,
          );
          if (state.fsType !== fsType) staged.save({ ...state, fsType });
        } else {
          fs.mkdirSync(stagingPath, { recursive: true });
        }
        return {};
      });
    },

    async NodeUnstageVolume(request) {
      const volumeId = required(request.volume_id, 'volume_id');
      const stagingPath = required(request.staging_target_path, 'staging_target_path');
      return exclusive(volumeId, async () => {
        const state = staged.get(volumeId);
        const stillPublished = state ? Object.keys(state.targets).filter((t) => fs.existsSync(t)) : [];
        if (stillPublished.length > 0) throw failedPrecondition(`volume ${volumeId} is still published at ${stillPublished.join(', ')}; unpublish it first`);
        await host.unmount(stagingPath);
        if (state) {
          await getAttacher().detach(state.attachment);
          staged.remove(volumeId);
          options.log.info('volume detached', { volume: volumeId, device: state.attachment.device });
        }
        return {};
      });
    },

    async NodePublishVolume(request) {
      const volumeId = required(request.volume_id, 'volume_id');
      const stagingPath = required(request.staging_target_path, 'staging_target_path');
      const targetPath = required(request.target_path, 'target_path');
      const capability = parseCapability(request.volume_capability, 'volume_capability');
      return exclusive(volumeId, async () => {
        const state = staged.get(volumeId);
        if (!state || state.stagingPath !== stagingPath) throw failedPrecondition(`volume ${volumeId} is not staged at ${stagingPath}; stage it first`);
        if (state.access !== capability.access) throw invalid(`volume ${volumeId} was staged as a ${state.access} volume, not ${capability.access}`);
        const readOnly = request.readonly || capability.readOnly || state.readOnly;
        // The spec's table: a volume for one writer is published at one target at a time on a node.
        const others = Object.keys(state.targets).filter((t) => t !== targetPath && fs.existsSync(t));
        if (others.length > 0 && !capability.multiNode && capability.mode !== 'SINGLE_NODE_MULTI_WRITER') {
          throw failedPrecondition(`volume ${volumeId} (${capability.mode}) is already published at ${others[0]}; unpublish it there first`);
        }
        const published = state.targets[targetPath];
        if (published && (await host.isMounted(targetPath))) {
          if (published.readOnly !== readOnly)
            throw alreadyExists(`volume ${volumeId} is already published at ${targetPath} ${published.readOnly ? 'read-only' : 'read-write'}`);
          return {};
        }
        if (capability.access === 'mount') {
          fs.mkdirSync(targetPath, { recursive: true });
          await host.bindMount(stagingPath, targetPath, readOnly);
        } else {
          fs.mkdirSync(path.dirname(targetPath), { recursive: true });
          if (!fs.existsSync(targetPath)) fs.closeSync(fs.openSync(targetPath, 'w'));
          await host.bindMount(state.attachment.device, targetPath, readOnly);
        }
        staged.save({ ...state, targets: { ...state.targets, [targetPath]: { readOnly } } });
        return {};
      });
    },

    async NodeUnpublishVolume(request) {
      const volumeId = required(request.volume_id, 'volume_id');
      const targetPath = required(request.target_path, 'target_path');
      return exclusive(volumeId, async () => {
        await host.unmount(targetPath);
        removeTarget(targetPath);
        const state = staged.get(volumeId);
        if (state && state.targets[targetPath]) {
          const targets = { ...state.targets };
          delete targets[targetPath];
          staged.save({ ...state, targets });
        }
        return {};
      });
    },

    async NodeGetVolumeStats(request) {
      const volumeId = required(request.volume_id, 'volume_id');
      const volumePath = required(request.volume_path, 'volume_path');
      const state = staged.get(volumeId);
      if (!state) throw notFound(`volume ${volumeId} is not staged on node ${options.nodeId}`);
      if (!path.isAbsolute(volumePath) || !fs.existsSync(volumePath)) throw notFound(`volume ${volumeId} is not at ${volumePath}`);
      const healthy = await getAttacher().isHealthy(state.attachment);
      const condition = { abnormal: !healthy, message: healthy ? 'volume is healthy' : deadConnectionMessage(state.attachment) };
      if (state.access === 'block') {
        const total = healthy ? await host.blockDeviceSize(state.attachment.device) : state.attachment.sizeBytes;
        return { usage: [{ unit: 'BYTES', total: String(total), used: '0', available: '0' }], volume_condition: condition };
      }
      const stats = await host.filesystemStats(volumePath);
      return {
        usage: [
          { unit: 'BYTES', total: String(stats.totalBytes), used: String(stats.usedBytes), available: String(stats.availableBytes) },
          { unit: 'INODES', total: String(stats.totalInodes), used: String(stats.usedInodes), available: String(stats.freeInodes) },
        ],
        volume_condition: condition,
      };
    },

    async NodeExpandVolume(request) {
      const volumeId = required(request.volume_id, 'volume_id');
      const volumePath = required(request.volume_path, 'volume_path');
      return exclusive(volumeId, async () => {
        const state = staged.get(volumeId);
        if (!state) throw notFound(`volume ${volumeId} is not staged on node ${options.nodeId}`);
        if (!path.isAbsolute(volumePath) || !fs.existsSync(volumePath)) throw notFound(`volume ${volumeId} is not at ${volumePath}`);
        const wanted = Number(request.capacity_range?.required_bytes ?? 0);
        let deviceBytes = await host.blockDeviceSize(state.attachment.device);
        if (deviceBytes < wanted) {
          const resize = getAttacher().resize;
          if (state.attachment.kind !== 'kernel' || !resize) {
            // nbdfuse fixes the file's size when it connects and there is no device-mapper to
            // swap the device under a mounted filesystem: the device shows the new size when
            // the volume is next staged, and the filesystem grows then.
            throw failedPrecondition(
              `volume ${volumeId}: the ${state.attachment.kind} device ${state.attachment.device} is ${deviceBytes} bytes and cannot grow while in use; it grows to ${wanted} bytes the next time the volume is staged (the kernel NBD path grows it at once: load the nbd module)`,
            );
          }
          const sizeBytes = await options.volumes.sizeOf(volumeId, state.exportName);
          if (sizeBytes === undefined) throw notFound(`volume ${volumeId} does not exist`);
          if (sizeBytes < wanted)
            throw failedPrecondition(`volume ${volumeId} is ${sizeBytes} bytes, less than the ${wanted} asked for: expand it through the controller first`);
          const resized = await resize.call(getAttacher(), state.attachment, sizeBytes);
          staged.save({ ...state, attachment: resized });
          options.log.info('volume device grown in place', { volume: volumeId, device: resized.device, sizeBytes });
          deviceBytes = sizeBytes;
        }
        if (state.access === 'mount') await host.growFilesystem(state.attachment.device, state.stagingPath, (state.fsType ?? 'ext4') as 'ext4' | 'xfs');
        return { capacity_bytes: String(deviceBytes) };
      });
    },
  };

  return {
    handlers,
    ready: () => started,

    async start() {
      const lostSince = staged.lastAlive() ?? Date.now();
      staged.markAlive();
      alive = setInterval(() => staged.markAlive(), aliveIntervalMs);
      alive.unref();
      const counts = { reattached: 0, gone: 0, failed: 0 };
      /** One try; true when it is settled (re-attached, or the device is gone), false when it is worth trying again. */
      const reattach = async (state: StagedVolume, lastTry: boolean): Promise<boolean> => {
        try {
          await exclusive(state.volumeId, async () => {
            const revived = await revive(state);
            if (revived) {
              counts.reattached++;
              options.log.info('volume re-attached: its device has new connections', {
                volume: state.volumeId,
                device: revived.attachment.device,
                waitedMs: Date.now() - lostSince,
              });
            } else {
              counts.gone++;
              options.log.warn('the device of a staged volume is gone (the host restarted?); staging it again attaches it afresh', {
                volume: state.volumeId,
                device: state.attachment.device,
              });
            }
          });
          return true;
        } catch (err) {
          // The volume may still be owned by the process that died (distributed mode: until its lease expires).
          const transient = isArborError(err) && ['unavailable', 'busy', 'aborted'].includes(err.code);
          if (transient && !lastTry) return false;
          counts.failed++;
          options.log.error('could not re-attach a staged volume; its I/O waits until it is staged again, up to the dead-connection timeout', {
            volume: state.volumeId,
            device: state.attachment.device,
            error: (err as Error).message,
          });
          return true;
        }
      };
      const kernelVolumes = staged.all().filter((state) => state.attachment.kind === 'kernel');
      const pending: StagedVolume[] = [];
      await runBounded(
        kernelVolumes.map((state) => async () => {
          if (!(await reattach(state, false))) pending.push(state);
        }),
        reattachConcurrency,
      );
      started = true;
      options.log.info('node plugin started', { ...counts, retrying: pending.length, waitedMs: Date.now() - lostSince });
      // What could not be served yet is tried again in the background, until it is or the time runs out.
      if (pending.length > 0) {
        void (async () => {
          const deadline = Date.now() + reattachRetryMs;
          for (let round = pending; round.length > 0;) {
            await new Promise((resolve) => setTimeout(resolve, reattachRetryIntervalMs));
            const next: StagedVolume[] = [];
            for (const state of round) if (!(await reattach(state, Date.now() > deadline))) next.push(state);
            round = next;
          }
        })();
      }
    },

    async handOver() {
      clearInterval(alive);
      if (attacher?.handOver) {
        await attacher.handOver();
        await new Promise((resolve) => setTimeout(resolve, handOverSettleMs));
      }
      staged.markAlive();
    },
  };
}

/** What a volume's condition says when its device lost its server. */
function deadConnectionMessage(attachment: Attachment): string {
  if (attachment.kind === 'kernel') {
    return `the kernel NBD device ${attachment.device} has no connection to this node's server: its I/O waits (up to the dead-connection timeout, then fails); staging the volume again gives it new connections`;
  }
  return `the NBD connection behind ${attachment.device} is dead: nbdfuse cannot reconnect after the node plugin restarted or lost the volume; restage the volume (restart the pod), or load the nbd kernel module (modprobe nbd) so that attachments survive plugin restarts`;
}

/**
 * Mounts a staged volume's filesystem at its staging path: formats it when blank
 * (never when it holds anything), checks it, mounts it, and grows it to the device
 * when the volume was expanded while detached. Returns the filesystem type.
 */
async function mountStaged(
  state: StagedVolume,
  requested: 'ext4' | 'xfs' | undefined,
  mkfsOptions: string | undefined,
  flags: string[],
  log: Log,
): Promise<string> {
  const { device } = state.attachment;
  fs.mkdirSync(state.stagingPath, { recursive: true });
  if (await host.isMounted(state.stagingPath)) {
    const mounted = await host.mountedDevice(state.stagingPath);
    if (mounted === device) return state.fsType ?? requested ?? 'ext4';
    throw alreadyExists(`${state.stagingPath} already has ${mounted} mounted on it`);
  }
  let found = await host.detectFilesystem(device);
  if (!found) {
    if (state.readOnly) throw failedPrecondition(`volume ${state.volumeId} is blank and attached read-only: it cannot be formatted`);
    const fsType = requested ?? 'ext4';
    await host.formatFilesystem(device, fsType, mkfsOptions ? mkfsOptions.split(/\s+/).filter(Boolean) : []);
    log.info('volume formatted', { volume: state.volumeId, fsType });
    found = fsType;
  } else if (requested && found !== requested) {
    throw failedPrecondition(`volume ${state.volumeId} holds ${found}, not the ${requested} asked for; Arbor never reformats a volume that holds data`);
  } else if (found !== 'ext4' && found !== 'xfs') {
    throw failedPrecondition(`volume ${state.volumeId} holds ${found}; Arbor mounts ext4 and xfs only`);
  }
  if (!state.readOnly) {
    await host.checkFilesystem(device, found as 'ext4' | 'xfs');
    // The volume may have grown while detached. ext4 grows unmounted (a mounted ext4
    // grows only for a process with CAP_SYS_RESOURCE); xfs grows only mounted.
    if (found === 'ext4' && (await host.blockDeviceSize(device)) > (await ext4SizeBytes(device))) await host.growFilesystem(device, state.stagingPath, 'ext4');
  }
  await host.mountFilesystem(device, state.stagingPath, found as 'ext4' | 'xfs', flags, state.readOnly);
  if (!state.readOnly && found === 'xfs') await host.growFilesystem(device, state.stagingPath, 'xfs');
  return found;
}

/** An ext4 filesystem's size from its superblock (block count × block size). */
async function ext4SizeBytes(device: string): Promise<number> {
  const { stdout } = await hostCommands.run('dumpe2fs', ['-h', device]);
  const blocks = /^Block count:\s+(\d+)$/m.exec(stdout);
  const size = /^Block size:\s+(\d+)$/m.exec(stdout);
  if (!blocks || !size) throw new ArborError('internal', `dumpe2fs -h ${device} did not report the block count and size`);
  return Number(blocks[1]) * Number(size[1]);
}

/**
 * Removes what publish created at the target: the empty directory of a Mount volume
 * or the file a Block device was bound onto. Never recursive: if something is
 * still mounted or written there, this fails rather than deleting the pod's data.
 */
function removeTarget(targetPath: string): void {
  let stats: fs.Stats;
  try {
    stats = fs.lstatSync(targetPath);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw err;
  }
  if (stats.isDirectory()) fs.rmdirSync(targetPath);
  else fs.unlinkSync(targetPath);
}
