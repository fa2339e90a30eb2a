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
export type VolumeRecord = TreeRecord;

/** An immutable point-in-time root of a volume. */
export interface SnapshotRecord extends TreeRecord {
  volumeId: string;
  volumeName: string;
}

export const keys = {
  volume: (id: string) => `volumes/${id}`,
  volumeName: (name: string) => `volume-names/${name}`,
  snapshot: (id: string) => `snapshots/${id}`,
  snapshotName: (name: string) => `snapshot-names/${name}`,
  volumes: 'volumes/',
  snapshots: 'snapshots/',
  format: 'meta/format',
};

/** The on-disk format this code reads and writes. */
export const formatVersion = 1;

export function newVolumeId(): string {
  return `vol-${randomBytes(8).toString('hex')}`;
}

export function newSnapshotId(): string {
  return `snap-${randomBytes(8).toString('hex')}`;
}

const namePattern = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;

/**
 * Names become NBD export names, CSI names and file names: letters, digits, '.', '_'
 * and '-', starting with a letter or digit ('@' separates a volume from its snapshot).
 */
export function validateName(name: string, what: 'volume' | 'snapshot'): void {
  if (typeof name !== 'string' || name.length === 0 || name.length > maxNameLength || !namePattern.test(name)) {
    throw new ArborError(
      'invalid-argument',
      `${what} name ${JSON.stringify(name)} is not valid: use 1 to ${maxNameLength} letters, digits, '.', '_' or '-', starting with a letter or digit`,
    );
  }
}
