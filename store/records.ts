import { randomBytes } from 'node:crypto';
import { ArborError } from './errors';
import { Entry } from './entry';
import { maxNameLength } from './limits';

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
}

/** Snapshots of several volumes taken at one instant, in one catalog transaction. */
export interface GroupSnapshotRecord {
  id: string;
  name: string;
  volumeIds: string[];
  snapshotIds: string[];
  createdAt: string;
}

/** Where a volume is published (attached) and how; held in one key per volume so changes compare-and-swap. */
export interface Publications {
  nodes: Record<string, { readOnly: boolean; multiNode: boolean; publishedAt: string }>;
}

export const keys = {
  volume: (id: string) => `volumes/${id}`,
  volumeName: (name: string) => `volume-names/${name}`,
  snapshot: (id: string) => `snapshots/${id}`,
  snapshotName: (name: string) => `snapshot-names/${name}`,
  volumes: 'volumes/',
  snapshots: 'snapshots/',
  group: (id: string) => `groups/${id}`,
  groupName: (name: string) => `group-names/${name}`,
  groups: 'groups/',
  publications: (volumeId: string) => `publications/${volumeId}`,
  node: (nodeId: string) => `nodes/${nodeId}`,
  format: 'meta/format',
};

/** The on-disk format this code reads and writes. */
export const formatVersion = 1;

export function newVolumeId(): string {
  return `vol-${randomBytes(8).toString('hex')}`;
}

export function newGroupId(): string {
  return `group-${randomBytes(8).toString('hex')}`;
}

export function newSnapshotId(): string {
  return `snap-${randomBytes(8).toString('hex')}`;
}

const namePattern = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;

/**
 * Names become NBD export names, CSI names and file names: letters, digits, '.', '_'
 * and '-', starting with a letter or digit ('@' separates a volume from its snapshot).
 */
export function validateName(name: string, what: 'volume' | 'snapshot' | 'group snapshot'): void {
  if (typeof name !== 'string' || name.length === 0 || name.length > maxNameLength || !namePattern.test(name)) {
    throw new ArborError(
      'invalid-argument',
      `${what} name ${JSON.stringify(name)} is not valid: use 1 to ${maxNameLength} letters, digits, '.', '_' or '-', starting with a letter or digit`,
    );
  }
}
