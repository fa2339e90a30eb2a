import fs from 'node:fs';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import type { NodeExpandVolumeRequest__Output } from '../csi/generated/csi/v1/NodeExpandVolumeRequest';
import type { NodeGetVolumeStatsRequest__Output } from '../csi/generated/csi/v1/NodeGetVolumeStatsRequest';
import type { NodePublishVolumeRequest__Output } from '../csi/generated/csi/v1/NodePublishVolumeRequest';
import type { NodeStageVolumeRequest__Output } from '../csi/generated/csi/v1/NodeStageVolumeRequest';
import type { NodeUnpublishVolumeRequest__Output } from '../csi/generated/csi/v1/NodeUnpublishVolumeRequest';
import type { NodeUnstageVolumeRequest__Output } from '../csi/generated/csi/v1/NodeUnstageVolumeRequest';
import { parseCapability } from '../csi/capabilities';
import { aborted, alreadyExists, CsiError, failedPrecondition, invalid, notFound } from '../csi/errors';
import { Unary } from '../csi/server';
import { Log } from '../lib/logger';
import { StoreApi } from '../store/api';
import { Attacher } from './attach/attacher';
import * as host from './host/filesystem';
import { hostCommands } from './host/commands';
import { ArborError } from '../store/errors';
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
  store: StoreApi;
  log: Log;
}

const capabilities = ['STAGE_UNSTAGE_VOLUME', 'GET_VOLUME_STATS', 'EXPAND_VOLUME', 'VOLUME_CONDITION', 'SINGLE_NODE_MULTI_WRITER'];

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
export function nodeService(options: NodeOptions): Record<string, Unary> {
  const staged = new StagedVolumes(options.stateDir);
  const busy = new Set<string>();
  let attacher: Attacher | undefined;
  const getAttacher = (): Attacher => (attacher ??= options.attacher());

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
    const name = request.publish_context.export || request.volume_context.name;
    if (name) return name;
    const volume = await options.store.findVolume({ id: request.volume_id });
    if (!volume) throw notFound(`volume ${request.volume_id} does not exist`);
    return volume.name;
  };

  return {
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

    async NodeStageVolume(request: NodeStageVolumeRequest__Output) {
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
          // A plugin or server restart left a dead connection: attach afresh.
          options.log.warn('re-attaching a volume whose NBD connection died', { volume: volumeId, device: state.attachment.device });
          if (capability.access === 'mount') await host.unmount(stagingPath);
          await getAttacher().detach(state.attachment);
          state = undefined;
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
          const fsType = await mountStaged(state, capability.fsType ?? (request.volume_context.fsType as 'ext4' | 'xfs' | undefined), request.volume_context.mkfsOptions, capability.mountFlags, options.log);
          if (state.fsType !== fsType) staged.save({ ...state, fsType });
        } else {
          fs.mkdirSync(stagingPath, { recursive: true });
        }
        return {};
      });
    },

    async NodeUnstageVolume(request: NodeUnstageVolumeRequest__Output) {
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

    async NodePublishVolume(request: NodePublishVolumeRequest__Output) {
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
          if (published.readOnly !== readOnly) throw alreadyExists(`volume ${volumeId} is already published at ${targetPath} ${published.readOnly ? 'read-only' : 'read-write'}`);
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

    async NodeUnpublishVolume(request: NodeUnpublishVolumeRequest__Output) {
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

    async NodeGetVolumeStats(request: NodeGetVolumeStatsRequest__Output) {
      const volumeId = required(request.volume_id, 'volume_id');
      const volumePath = required(request.volume_path, 'volume_path');
      const state = staged.get(volumeId);
      if (!state) throw notFound(`volume ${volumeId} is not staged on node ${options.nodeId}`);
      if (!path.isAbsolute(volumePath) || !fs.existsSync(volumePath)) throw notFound(`volume ${volumeId} is not at ${volumePath}`);
      const healthy = await getAttacher().isHealthy(state.attachment);
      const condition = { abnormal: !healthy, message: healthy ? 'volume is healthy' : `the NBD connection behind ${state.attachment.device} is dead; restage the volume` };
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

    async NodeExpandVolume(request: NodeExpandVolumeRequest__Output) {
      const volumeId = required(request.volume_id, 'volume_id');
      const volumePath = required(request.volume_path, 'volume_path');
      return exclusive(volumeId, async () => {
        const state = staged.get(volumeId);
        if (!state) throw notFound(`volume ${volumeId} is not staged on node ${options.nodeId}`);
        if (!path.isAbsolute(volumePath) || !fs.existsSync(volumePath)) throw notFound(`volume ${volumeId} is not at ${volumePath}`);
        const wanted = Number(request.capacity_range?.required_bytes ?? 0);
        const deviceBytes = await host.blockDeviceSize(state.attachment.device);
        if (deviceBytes < wanted) {
          // nbdfuse fixes the file's size when it connects and there is no device-mapper to
          // swap the device under a mounted filesystem: the device shows the new size when
          // the volume is next staged, and the filesystem grows then.
          throw failedPrecondition(
            `volume ${volumeId}: the ${state.attachment.kind} device ${state.attachment.device} is ${deviceBytes} bytes and cannot grow while in use; it grows to ${wanted} bytes the next time the volume is staged`,
          );
        }
        if (state.access === 'mount') await host.growFilesystem(state.attachment.device, state.stagingPath, (state.fsType ?? 'ext4') as 'ext4' | 'xfs');
        return { capacity_bytes: String(deviceBytes) };
      });
    },
  };
}

/**
 * Mounts a staged volume's filesystem at its staging path: formats it when blank
 * (never when it holds anything), checks it, mounts it, and grows it to the device
 * when the volume was expanded while detached. Returns the filesystem type.
 */
async function mountStaged(state: StagedVolume, requested: 'ext4' | 'xfs' | undefined, mkfsOptions: string | undefined, flags: string[], log: Log): Promise<string> {
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
