import { randomBytes } from 'node:crypto';
import { KvEntry, Op, del, put } from './catalog/catalog';
import { Check, arrayOf, boolean, count, damaged, decode, invalid, mapOf, optional, shape, string } from './decode';
import { EMPTY, Entry, asShared, entryProblem } from './entry';
import { depthFor, extentCountFor } from './geometry';

/** One step of a volume's ancestry: the volume it was cloned from, and through which snapshot. */
export interface LineageStep {
  volumeId: string;
  volumeName: string;
  snapshotId?: string;
  snapshotName?: string;
}

/** What volumes and snapshots have alike: a named tree. */
interface TreeRecord {
  id: string;
  name: string;
  sizeBytes: number;
  extentSizeBytes: number;
  /** Levels of map nodes under the root. */
  depth: number;
  root: Entry;
  createdAt: string;
  /** Ancestry, nearest first (for a snapshot: its volume's, when it was taken). */
  lineage: LineageStep[];
}

/** A volume head as committed in the catalog. */
export interface VolumeRecord extends TreeRecord {
  /** Set at creation by whoever created it (the CSI controller keeps its StorageClass parameters here). */
  labels?: Record<string, string>;
}

/** An immutable point-in-time root of a volume. */
export interface SnapshotRecord extends TreeRecord {
  volumeId: string;
  volumeName: string;
  /** The group snapshot it was taken in, if any: it is deleted with its group. */
  groupId?: string;
  /** Set on a received snapshot: the id it had in the store it was taken in (receive.ts). */
  origin?: string;
}

/** Snapshots of several volumes taken at one instant, in one catalog transaction. */
export interface GroupSnapshotRecord {
  id: string;
  name: string;
  volumeIds: string[];
  snapshotIds: string[];
  createdAt: string;
}

/** How a volume is published to one node. */
export interface Publication {
  readOnly: boolean;
  /** Published to several nodes at once. */
  multiNode: boolean;
  /** Read-write on several nodes at once (a multi-node Block volume); absent in records written before it existed: false. */
  multiNodeWriter?: boolean;
  publishedAt: string;
}

/** Where a volume is published (attached) and how; held in one key per volume so changes compare-and-swap. */
export interface Publications {
  nodes: Record<string, Publication>;
}

/** What a node plugin recorded about itself (`registerNode`). */
export interface NodeRecord {
  nodeId: string;
  topology: Record<string, string>;
  /** HOST:PORT where other nodes reach this node's NBD server (TCP, mutual TLS): where they relay a volume it owns. */
  nbdAddress?: string;
  registeredAt?: string;
}

// ---- decoding what the catalog holds (see decode.ts) ----

/** A root entry: it points at the top node (or is a hole), never ZERO. */
const rootEntry: Check<Entry> = (value, path) => {
  const checked = count(value, path);
  const problem = entryProblem(checked, false);
  return problem ? invalid(path, `a map entry (${problem})`, value) : checked;
};

const lineageStep = shape<LineageStep>({ volumeId: string, volumeName: string, snapshotId: optional(string), snapshotName: optional(string) });

const treeFields = {
  id: string,
  name: string,
  sizeBytes: count,
  extentSizeBytes: count,
  depth: count,
  root: rootEntry,
  createdAt: string,
  lineage: arrayOf(lineageStep),
};

const volumeShape = shape<VolumeRecord>({ ...treeFields, labels: optional(mapOf(string)) });
const snapshotShape = shape<SnapshotRecord>({ ...treeFields, volumeId: string, volumeName: string, groupId: optional(string), origin: optional(string) });
const groupShape = shape<GroupSnapshotRecord>({ id: string, name: string, volumeIds: arrayOf(string), snapshotIds: arrayOf(string), createdAt: string });
const publicationShape = shape<Publication>({ readOnly: boolean, multiNode: boolean, multiNodeWriter: optional(boolean), publishedAt: string });
const publicationsShape = shape<Publications>({ nodes: mapOf(publicationShape) });
const nodeShape = shape<NodeRecord>({ nodeId: string, topology: mapOf(string), nbdAddress: optional(string), registeredAt: optional(string) });

/** A record whose id is not the one its key names was written somewhere else. */
function named<T extends { id: string }>(entry: KvEntry, what: string, check: Check<T>, prefix: string): T {
  const record = decode(entry, what, check);
  if (entry.key !== `${prefix}${record.id}`) throw damaged(entry, what, `it is the record of ${prefix}${record.id}`);
  return record;
}

export const decodeVolume = (entry: KvEntry): VolumeRecord => named(entry, 'a volume record', volumeShape, keys.volumes);
export const decodeSnapshot = (entry: KvEntry): SnapshotRecord => named(entry, 'a snapshot record', snapshotShape, keys.snapshots);
export const decodeGroup = (entry: KvEntry): GroupSnapshotRecord => named(entry, 'a group snapshot record', groupShape, keys.groups);
export const decodePublications = (entry: KvEntry): Publications => decode(entry, 'the publications of a volume', publicationsShape);
export const decodeNode = (entry: KvEntry): NodeRecord => decode(entry, 'a node record', nodeShape);
/** What a name key holds: the id of the volume, snapshot or group of that name. */
export const decodeId = (entry: KvEntry): string => decode(entry, 'an id', string);
export const decodeFormat = (entry: KvEntry): number => decode(entry, 'the store format', count);

export const keys = {
  volume: (id: string) => `volumes/${id}`,
  volumeName: (name: string) => `volume-names/${name}`,
  snapshot: (id: string) => `snapshots/${id}`,
  /** Store-wide, for snapshots made through CSI (whose names the spec wants unique) and group snapshots' members. */
  snapshotName: (name: string) => `snapshot-names/${name}`,
  /** Every snapshot's name among its volume's (format 2): `a@daily` and `b@daily` both exist. */
  volumeSnapshotName: (volumeId: string, name: string) => `volume-snapshot-names/${volumeId}/${name}`,
  volumeSnapshotNames: 'volume-snapshot-names/',
  /**
   * Every snapshot among its volume's by id (format 3): the snapshots of one volume in
   * id order are one prefix of keys, so listing them pages by key like every listing.
   */
  volumeSnapshot: (volumeId: string, snapshotId: string) => `volume-snapshots/${volumeId}/${snapshotId}`,
  volumeSnapshots: (volumeId: string) => `volume-snapshots/${volumeId}/`,
  volumeSnapshotIndex: 'volume-snapshots/',
  volumes: 'volumes/',
  snapshots: 'snapshots/',
  group: (id: string) => `groups/${id}`,
  groupName: (name: string) => `group-names/${name}`,
  groups: 'groups/',
  publications: (volumeId: string) => `publications/${volumeId}`,
  node: (nodeId: string) => `nodes/${nodeId}`,
  format: 'meta/format',
};

/**
 * The on-disk format this code reads and writes. 2: every snapshot also has a name
 * key among its volume's (keys.volumeSnapshotName). 3: and an id key among its
 * volume's (keys.volumeSnapshot). 4: leaves may hold partial extents. 5: S3 blobs may
 * be packed. An older store is migrated at open (store/format.ts).
 */
export const formatVersion = 5;

export function newVolumeId(): string {
  return `vol-${randomBytes(8).toString('hex')}`;
}

export function newGroupId(): string {
  return `group-${randomBytes(8).toString('hex')}`;
}

export function newSnapshotId(): string {
  return `snap-${randomBytes(8).toString('hex')}`;
}

export { validateName } from './names';

/**
 * The keys every snapshot has, whoever made it: its record, its name and its id
 * among its volume's. Written and deleted together, in the transaction that makes
 * or forgets the snapshot (the store-wide name key is the caller's: not every
 * snapshot has one).
 */
export function snapshotPuts(record: SnapshotRecord): Op[] {
  return [
    put(keys.snapshot(record.id), record),
    put(keys.volumeSnapshotName(record.volumeId, record.name), record.id),
    put(keys.volumeSnapshot(record.volumeId, record.id), record.id),
  ];
}

export function snapshotDeletes(record: SnapshotRecord): Op[] {
  return [del(keys.snapshot(record.id)), del(keys.volumeSnapshotName(record.volumeId, record.name)), del(keys.volumeSnapshot(record.volumeId, record.id))];
}

// ---- building records ----

/** A new, empty volume. */
export function newVolumeRecord(name: string, sizeBytes: number, extentSizeBytes: number, labels?: Record<string, string>): VolumeRecord {
  return {
    id: newVolumeId(),
    name,
    sizeBytes,
    extentSizeBytes,
    depth: depthFor(extentCountFor(sizeBytes, extentSizeBytes)),
    root: EMPTY,
    createdAt: new Date().toISOString(),
    lineage: [],
    ...(labels ? { labels } : {}),
  };
}

/** A new volume sharing every block of a snapshot. */
export function cloneOfSnapshot(snapshot: SnapshotRecord, name: string, labels?: Record<string, string>): VolumeRecord {
  return {
    id: newVolumeId(),
    name,
    sizeBytes: snapshot.sizeBytes,
    extentSizeBytes: snapshot.extentSizeBytes,
    depth: snapshot.depth,
    root: asShared(snapshot.root),
    createdAt: new Date().toISOString(),
    lineage: [{ volumeId: snapshot.volumeId, volumeName: snapshot.volumeName, snapshotId: snapshot.id, snapshotName: snapshot.name }, ...snapshot.lineage],
    ...(labels ? { labels } : {}),
  };
}

/** A snapshot of `source` as it is now: its root, read-only. */
export function snapshotRecordOf(source: VolumeRecord, name: string): SnapshotRecord {
  return {
    id: newSnapshotId(),
    name,
    volumeId: source.id,
    volumeName: source.name,
    sizeBytes: source.sizeBytes,
    extentSizeBytes: source.extentSizeBytes,
    depth: source.depth,
    root: asShared(source.root),
    createdAt: new Date().toISOString(),
    lineage: source.lineage,
  };
}

/** A new volume sharing every block of `source` as it is now. */
export function cloneRecordOf(source: VolumeRecord, name: string, labels?: Record<string, string>): VolumeRecord {
  return {
    id: newVolumeId(),
    name,
    sizeBytes: source.sizeBytes,
    extentSizeBytes: source.extentSizeBytes,
    depth: source.depth,
    root: asShared(source.root),
    createdAt: new Date().toISOString(),
    lineage: [{ volumeId: source.id, volumeName: source.name }, ...source.lineage],
    ...(labels ? { labels } : {}),
  };
}

export function describeStep(step: LineageStep): string {
  return step.snapshotName ? `snapshot ${step.volumeName}@${step.snapshotName}` : `volume ${step.volumeName}`;
}
