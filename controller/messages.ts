import type { Snapshot } from '../csi/generated/csi/v1/Snapshot';
import type { Volume } from '../csi/generated/csi/v1/Volume';
import type { VolumeGroupSnapshot } from '../csi/generated/csi/v1/VolumeGroupSnapshot';
import { GroupSnapshotRecord, SnapshotRecord, VolumeRecord } from '../store/records';

/**
 * Store records as CSI messages. The int64 fields are given as numbers (every size
 * and time here is a safe integer): the wire is the same, and protobufjs encodes a
 * number without parsing a string into a Long first, which showed in the cost of a
 * page of ListSnapshots. Clients read them as strings (proto-loader's longs: String).
 */

export function timestamp(iso: string): { seconds: number; nanos: number } {
  const ms = Date.parse(iso);
  return { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1e6 };
}

/** What the node needs at stage time, kept in the volume's labels at creation. */
export function volumeContext(volume: VolumeRecord): Record<string, string> {
  const context: Record<string, string> = { name: volume.name };
  if (volume.labels?.fsType) context.fsType = volume.labels.fsType;
  if (volume.labels?.mkfsOptions) context.mkfsOptions = volume.labels.mkfsOptions;
  return context;
}

export function volumeMessage(volume: VolumeRecord, topology?: Record<string, string>): Volume {
  const source = volume.lineage[0];
  return {
    capacity_bytes: volume.sizeBytes,
    volume_id: volume.id,
    volume_context: volumeContext(volume),
    content_source: !source ? null : source.snapshotId ? { snapshot: { snapshot_id: source.snapshotId } } : { volume: { volume_id: source.volumeId } },
    accessible_topology: topology ? [{ segments: topology }] : [],
  };
}

export function snapshotMessage(snapshot: SnapshotRecord): Snapshot {
  return {
    size_bytes: snapshot.sizeBytes,
    snapshot_id: snapshot.id,
    source_volume_id: snapshot.volumeId,
    creation_time: timestamp(snapshot.createdAt),
    ready_to_use: true,
    group_snapshot_id: snapshot.groupId ?? '',
  };
}

export function groupMessage(group: GroupSnapshotRecord, snapshots: SnapshotRecord[]): VolumeGroupSnapshot {
  return {
    group_snapshot_id: group.id,
    snapshots: snapshots.map(snapshotMessage),
    creation_time: timestamp(group.createdAt),
    ready_to_use: true,
  };
}
