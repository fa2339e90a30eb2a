import type { ControllerHandlers } from '../csi/generated/csi/v1/Controller';
import { formatRef, validateName } from '../store/names';
import type { CreateVolumeRequest__Output } from '../csi/generated/csi/v1/CreateVolumeRequest';
import { alreadyExists, invalid, notFound, outOfRange, CsiError } from '../csi/errors';
import { UnaryHandlers } from '../csi/server';
import { StoreApi } from '../store/api';
import { isArborError } from '../store/errors';
import { maxVolumeSizeBytes, minExtentSizeBytes } from '../store/limits';
import { SnapshotRecord, VolumeRecord } from '../store/records';
import { snapshotMessage, volumeContext, volumeMessage } from './messages';
import { page, pageFromStore } from './paging';
import { Capability, parseCapability } from '../csi/capabilities';
import { parseMutableParameters, parseParameters, sizeFor, wireCount } from './parameters';
import * as grpc from '@grpc/grpc-js';

export interface ControllerOptions {
  store: StoreApi;
  /** Where volumes are reachable (embedded mode: the node holding the data directory); undefined = everywhere. */
  topology?: Record<string, string>;
}

const capabilities = [
  'CREATE_DELETE_VOLUME',
  'PUBLISH_UNPUBLISH_VOLUME',
  'LIST_VOLUMES',
  'GET_CAPACITY',
  'CREATE_DELETE_SNAPSHOT',
  'LIST_SNAPSHOTS',
  'CLONE_VOLUME',
  'PUBLISH_READONLY',
  'EXPAND_VOLUME',
  'LIST_VOLUMES_PUBLISHED_NODES',
  'VOLUME_CONDITION',
  'GET_VOLUME',
  'SINGLE_NODE_MULTI_WRITER',
  // QoS limits (store/qos.ts): set by CreateVolume's and ControllerModifyVolume's mutable_parameters.
  'MODIFY_VOLUME',
  // GetSnapshot (alpha in v1.12) is implemented, but not advertised: the sanity
  // suites of csi-test built against v1.12 do not know the capability yet.
] as const;

function required(value: string | undefined, field: string): string {
  if (!value) throw invalid(`${field} is required`);
  return value;
}

function capabilitiesOf(list: CreateVolumeRequest__Output['volume_capabilities'], field: string, volume: string): Capability[] {
  if (!list || list.length === 0) throw invalid(`volume ${volume}: ${field} is required`);
  return list.map((c, i) => parseCapability(c, `${field}[${i}]`, volume));
}

/** Parameters a VolumeSnapshotClass may carry: only the sidecar's own metadata. */
function checkSnapshotParameters(parameters: Record<string, string>): void {
  for (const key of Object.keys(parameters)) {
    if (!key.startsWith('csi.storage.k8s.io/')) throw invalid(`unknown snapshot parameter ${JSON.stringify(key)}: Arbor's snapshots take none`);
  }
}

/**
 * The CSI Controller service over the store. The store decides (names, sizes,
 * ownership, consistency); this layer checks requests, maps sizes and capabilities,
 * and shapes responses.
 */
export function controllerService(options: ControllerOptions): UnaryHandlers<ControllerHandlers> {
  const { store, topology } = options;

  const findVolume = (id: string) => store.findVolume({ id });
  const mustFindVolume = async (id: string): Promise<VolumeRecord> => {
    const volume = await findVolume(id);
    if (!volume) throw notFound(`volume ${id} does not exist`);
    return volume;
  };
  const status = async (volume: VolumeRecord) => ({
    published_node_ids: Object.keys((await store.publications(volume.id)).nodes).sort(),
    volume_condition: { abnormal: false, message: 'volume is healthy' },
  });

  return {
    async ControllerGetCapabilities() {
      return { capabilities: capabilities.map((type) => ({ rpc: { type } })) };
    },

    async CreateVolume(request) {
      const name = required(request.name, 'name');
      validateName(name, 'volume', 'name');
      const caps = capabilitiesOf(request.volume_capabilities, 'volume_capabilities', name);
      const parameters = parseParameters(request.parameters);
      const qos = parseMutableParameters(request.mutable_parameters, name);
      checkTopology(request, topology);
      const source = request.volume_content_source;
      // A volume of this name (a retry), read while the source is looked up. Not for a
      // clone of a snapshot: its transaction finds the name taken, and then (exclusive)
      // the clone is refused and the volume of the name judged below, as a twin's is.
      const existingRead = source?.snapshot ? undefined : store.findVolume({ name });
      // Settled here so that an error of the source's lookup does not leave it unhandled.
      existingRead?.catch(() => {});
      const fsType = caps.find((c) => c.fsType)?.fsType ?? parameters.fsType;
      const labels: Record<string, string> = { ...parameters.metadata };
      if (fsType) labels.fsType = fsType;
      if (parameters.mkfsOptions.length) labels.mkfsOptions = parameters.mkfsOptions.join(' ');
      // A retry (the limits may not have been set when the first try failed) sets them again.
      const withQos = async (volume: VolumeRecord) => {
        if (qos) await store.setVolumeQos({ id: volume.id }, qos);
        return { volume: volumeMessage(volume, topology) };
      };
      // A source may go once a clone of it is made (its clones keep what they share), and a
      // retry of that clone's CreateVolume (its answer was lost) must still find the clone,
      // not NOT_FOUND: the volume of this name, if it was cloned from that very source.
      const retryOfClone = async (missing: { snapshot: { id: string } } | { volume: { id: string } }, what: string) => {
        const existing = await store.findVolume({ name });
        if (!existing || !madeFrom(existing, missing)) throw notFound(`${what} does not exist`);
        const extent = 'extentSize' in request.parameters ? parameters.extentSizeBytes : existing.extentSizeBytes;
        return withQos(compatible(existing, request, missing, extent, labels));
      };
      let sourceRef: { snapshot: { id: string } } | { volume: { id: string } } | undefined;
      let sourceBytes = 0;
      let extentSizeBytes = parameters.extentSizeBytes;
      if (source?.snapshot) {
        const id = required(source.snapshot.snapshot_id, 'volume_content_source.snapshot.snapshot_id');
        // The record this store saw last will do: the clone's transaction compares it unchanged.
        const snapshot = await store.findSnapshot({ id }, { mayBeStale: true });
        if (!snapshot) return retryOfClone({ snapshot: { id } }, `source snapshot ${id}`);
        sourceRef = { snapshot: { id } };
        sourceBytes = snapshot.sizeBytes;
        extentSizeBytes = snapshot.extentSizeBytes;
      } else if (source?.volume) {
        const id = required(source.volume.volume_id, 'volume_content_source.volume.volume_id');
        const volume = await findVolume(id);
        if (!volume) return retryOfClone({ volume: { id } }, `source volume ${id}`);
        sourceRef = { volume: { id } };
        sourceBytes = volume.sizeBytes;
        extentSizeBytes = volume.extentSizeBytes;
      }
      if (sourceRef && 'extentSize' in request.parameters && extentSizeBytes !== parameters.extentSizeBytes) {
        throw invalid(
          `parameter extentSize ${request.parameters.extentSize} differs from the source's extent size ${extentSizeBytes}; a clone keeps its source's`,
        );
      }
      const sizeBytes = sizeFor(request.capacity_range, extentSizeBytes, sourceBytes);
      const existing = await existingRead;
      if (existing) return withQos(compatible(existing, request, sourceRef, extentSizeBytes, labels));
      let volume: VolumeRecord;
      try {
        volume = sourceRef
          ? await store.cloneVolume(name, 'snapshot' in sourceRef ? { snapshot: sourceRef.snapshot } : { volume: sourceRef.volume }, {
              labels,
              exclusive: existingRead === undefined,
            })
          : await store.createVolume(name, { sizeBytes, extentSizeBytes, labels });
      } catch (err) {
        // Lost a race with a twin request: answer as the winner would be answered.
        const winner = isArborError(err, 'already-exists') ? await store.findVolume({ name }) : undefined;
        if (!winner) throw err;
        return withQos(compatible(winner, request, sourceRef, extentSizeBytes, labels));
      }
      if (volume.sizeBytes < sizeBytes) volume = await store.resizeVolume({ id: volume.id }, sizeBytes);
      return withQos(volume);
    },

    async DeleteVolume(request) {
      const id = required(request.volume_id, 'volume_id');
      try {
        await store.deleteVolume({ id });
      } catch (err) {
        if (!isArborError(err, 'not-found')) throw err;
      }
      return {};
    },

    async ControllerPublishVolume(request) {
      const volumeId = required(request.volume_id, 'volume_id');
      const nodeId = required(request.node_id, 'node_id');
      const capability = parseCapability(request.volume_capability, 'volume_capability', volumeId);
      const volume = await mustFindVolume(volumeId);
      // Any node whose plugin registered: with relays every node reaches every volume, so no topology is checked here.
      if (!(await store.findNode(nodeId))) throw notFound(`node ${nodeId} is not known: no Arbor node plugin registered with that id`);
      const readOnly = request.readonly || capability.readOnly;
      // The store refuses a publication that shares the volume another way than those on other nodes (FAILED_PRECONDITION).
      await store.publishVolume(volumeId, nodeId, { readOnly, multiNode: capability.multiNode, multiNodeWriter: capability.multiNodeWriter });
      return { publish_context: { export: formatRef(volume.name), readOnly: String(readOnly) } };
    },

    async ControllerUnpublishVolume(request) {
      const volumeId = required(request.volume_id, 'volume_id');
      await store.unpublishVolume(volumeId, request.node_id || undefined);
      return {};
    },

    async ValidateVolumeCapabilities(request) {
      const volumeId = required(request.volume_id, 'volume_id');
      if (!request.volume_capabilities?.length) throw invalid('volume_capabilities is required');
      const volume = await mustFindVolume(volumeId);
      try {
        const caps = request.volume_capabilities.map((c, i) => parseCapability(c, `volume_capabilities[${i}]`, volume.name));
        parseParameters(request.parameters);
        parseMutableParameters(request.mutable_parameters, volume.name);
        const fsType = volume.labels?.fsType;
        const clash = caps.find((c) => c.fsType && fsType && c.fsType !== fsType);
        if (clash) return { message: `volume ${volume.name} is formatted for ${fsType}, not ${clash.fsType}` };
        const context = volumeContext(volume);
        const mismatched = Object.entries(request.volume_context).find(([key, value]) => context[key] !== value);
        if (mismatched) return { message: `volume_context ${mismatched[0]}=${mismatched[1]} does not match the volume` };
      } catch (err) {
        if (err instanceof CsiError && err.status === grpc.status.INVALID_ARGUMENT) return { message: err.message };
        throw err;
      }
      return {
        confirmed: {
          volume_context: request.volume_context,
          volume_capabilities: request.volume_capabilities,
          parameters: request.parameters,
          mutable_parameters: request.mutable_parameters,
        },
      };
    },

    async ListVolumes(request) {
      const { entries, nextToken } = await pageFromStore(request.max_entries, request.starting_token, 'volume', {
        exists: async (id) => (await store.findVolume({ id })) !== undefined,
        page: (options) => store.volumesPage(options),
      });
      return {
        entries: await Promise.all(entries.map(async (volume) => ({ volume: volumeMessage(volume, topology), status: await status(volume) }))),
        next_token: nextToken,
      };
    },

    async GetCapacity(request) {
      if (request.volume_capabilities?.length) request.volume_capabilities.forEach((c, i) => parseCapability(c, `volume_capabilities[${i}]`));
      parseParameters(request.parameters);
      const here = !topology || !request.accessible_topology || Object.entries(request.accessible_topology.segments).every(([k, v]) => topology[k] === v);
      const available = here ? ((await store.availableBytes()) ?? maxVolumeSizeBytes) : 0;
      return {
        available_capacity: String(available),
        maximum_volume_size: { value: String(maxVolumeSizeBytes) },
        minimum_volume_size: { value: String(minExtentSizeBytes) },
      };
    },

    async ControllerGetVolume(request) {
      const volume = await mustFindVolume(required(request.volume_id, 'volume_id'));
      return { volume: volumeMessage(volume, topology), status: await status(volume) };
    },

    async ControllerExpandVolume(request) {
      const volume = await mustFindVolume(required(request.volume_id, 'volume_id'));
      if (!request.capacity_range) throw invalid('capacity_range is required');
      const capability = request.volume_capability ? parseCapability(request.volume_capability, 'volume_capability', volume.name) : undefined;
      const wanted = wireCount(request.capacity_range.required_bytes, 'capacity_range.required_bytes');
      const limit = wireCount(request.capacity_range.limit_bytes, 'capacity_range.limit_bytes');
      const target = Math.ceil(wanted / volume.extentSizeBytes) * volume.extentSizeBytes;
      if (limit > 0 && target > limit) throw outOfRange(`${wanted} bytes rounded up to whole extents is ${target}, more than limit_bytes ${limit}`);
      if (limit > 0 && volume.sizeBytes > limit)
        throw outOfRange(`volume ${volume.name} is already ${volume.sizeBytes} bytes, more than limit_bytes ${limit}; volumes do not shrink`);
      const grown = target > volume.sizeBytes ? await store.resizeVolume({ id: volume.id }, target) : volume;
      // A filesystem must grow on the node; a raw block device's new size shows at its next attach.
      return { capacity_bytes: String(grown.sizeBytes), node_expansion_required: capability?.access !== 'block' };
    },

    async ControllerModifyVolume(request) {
      const id = required(request.volume_id, 'volume_id');
      const volume = await mustFindVolume(id);
      // The parameters are the volume's whole QoS (a VolumeAttributesClass describes the whole class): a key left out is no limit.
      const qos = parseMutableParameters(request.mutable_parameters, volume.name) ?? {};
      await store.setVolumeQos({ id: volume.id }, qos);
      return {};
    },

    async CreateSnapshot(request) {
      const volumeId = required(request.source_volume_id, 'source_volume_id');
      const name = required(request.name, 'name');
      validateName(name, 'snapshot', 'name');
      checkSnapshotParameters(request.parameters);
      // The store answers idempotent retries, a name taken by another volume (ALREADY_EXISTS)
      // and a missing volume (NOT_FOUND): the fewer catalog round trips the better here.
      return { snapshot: snapshotMessage(await store.createSnapshot({ id: volumeId }, name)) };
    },

    async DeleteSnapshot(request) {
      const id = required(request.snapshot_id, 'snapshot_id');
      try {
        await store.deleteSnapshot({ id });
      } catch (err) {
        if (!isArborError(err, 'not-found')) throw err;
      }
      return {};
    },

    async ListSnapshots(request) {
      const volumeId = request.source_volume_id || undefined;
      const ofVolume = (s: SnapshotRecord | undefined): s is SnapshotRecord => s !== undefined && (volumeId === undefined || s.volumeId === volumeId);
      let listed: { entries: SnapshotRecord[]; nextToken: string };
      if (request.snapshot_id) {
        // One snapshot at most: paged like any list (its id as a token names the end).
        const snapshot = await store.findSnapshot({ id: request.snapshot_id });
        listed = page(ofVolume(snapshot) ? [snapshot] : [], request.max_entries, request.starting_token, 'snapshot');
      } else {
        listed = await pageFromStore(request.max_entries, request.starting_token, 'snapshot', {
          exists: async (id) => ofVolume(await store.findSnapshot({ id })),
          page: (options) => store.snapshotsPage({ ...options, volumeId }),
        });
      }
      const { entries, nextToken } = listed;
      return { entries: entries.map((s) => ({ snapshot: snapshotMessage(s) })), next_token: nextToken };
    },

    async GetSnapshot(request) {
      const id = required(request.snapshot_id, 'snapshot_id');
      const snapshot = await store.findSnapshot({ id });
      if (!snapshot) throw notFound(`snapshot ${id} does not exist`);
      return { snapshot: snapshotMessage(snapshot) };
    },
  };
}

/** An existing volume answers a CreateVolume again only if it is what that request would have made. */
function compatible(
  existing: VolumeRecord,
  request: CreateVolumeRequest__Output,
  source: { snapshot: { id: string } } | { volume: { id: string } } | undefined,
  extentSizeBytes: number,
  labels: Record<string, string>,
): VolumeRecord {
  const step = existing.lineage[0];
  const sameSource = madeFrom(existing, source);
  const requiredBytes = Number(request.capacity_range?.required_bytes ?? 0);
  const limitBytes = Number(request.capacity_range?.limit_bytes ?? 0);
  const fits = existing.sizeBytes >= requiredBytes && (limitBytes === 0 || existing.sizeBytes <= limitBytes);
  const sameClass =
    existing.extentSizeBytes === extentSizeBytes &&
    (existing.labels?.fsType ?? '') === (labels.fsType ?? '') &&
    (existing.labels?.mkfsOptions ?? '') === (labels.mkfsOptions ?? '');
  if (sameSource && fits && sameClass) return existing;
  throw alreadyExists(
    `volume ${existing.name} already exists (${existing.sizeBytes} bytes${step ? `, cloned from ${step.snapshotName ?? step.volumeName}` : ''}) and differs from this request`,
  );
}

/** Whether `volume` was made from `source`: cloned from that snapshot or volume, or made empty when there is none. */
function madeFrom(volume: VolumeRecord, source: { snapshot: { id: string } } | { volume: { id: string } } | undefined): boolean {
  const step = volume.lineage[0];
  if (!source) return !step;
  return 'snapshot' in source ? step?.snapshotId === source.snapshot.id : step?.volumeId === source.volume.id && !step.snapshotId;
}

function checkTopology(request: CreateVolumeRequest__Output, topology?: Record<string, string>): void {
  const requisite = request.accessibility_requirements?.requisite ?? [];
  if (!topology || requisite.length === 0) return;
  const reachable = requisite.some((t) => Object.entries(t.segments).every(([k, v]) => topology[k] === v));
  if (!reachable) {
    throw new CsiError(
      grpc.status.RESOURCE_EXHAUSTED,
      `volumes can only be made where the data is: ${Object.entries(topology)
        .map(([k, v]) => `${k}=${v}`)
        .join(', ')}`,
    );
  }
}
