import { ArborError } from '../store/errors';
import { SnapshotRecord } from '../store/records';
import { StoreApi } from './admin/methods';
import { UsageError } from './args';

/** NAME or NAME@SNAP as typed on the command line. */
export interface VolumeOrSnapshot {
  volume: string;
  snapshot?: string;
}

export function parseRef(text: string, what: string): VolumeOrSnapshot {
  const at = text.indexOf('@');
  if (at < 0) return { volume: text };
  const volume = text.slice(0, at);
  const snapshot = text.slice(at + 1);
  if (!volume || !snapshot || snapshot.includes('@')) throw new UsageError(`${what} ${JSON.stringify(text)} is not NAME or NAME@SNAP`);
  return { volume, snapshot };
}

export function parseSnapshotRef(text: string, what: string): Required<VolumeOrSnapshot> {
  const ref = parseRef(text, what);
  if (!ref.snapshot) throw new UsageError(`${what} ${JSON.stringify(text)} names no snapshot: write NAME@SNAP`);
  return ref as Required<VolumeOrSnapshot>;
}

/** The snapshot NAME@SNAP, checking that SNAP was taken of NAME (snapshot names are unique per store). */
export async function snapshotOf(store: StoreApi, ref: Required<VolumeOrSnapshot>): Promise<SnapshotRecord> {
  const snapshot = await store.findSnapshot({ name: ref.snapshot });
  if (!snapshot) throw new ArborError('not-found', `snapshot ${ref.volume}@${ref.snapshot} does not exist; see 'arbor snapshot list ${ref.volume}'`);
  if (snapshot.volumeName !== ref.volume) {
    throw new ArborError(
      'not-found',
      `snapshot ${ref.snapshot} was taken of volume ${snapshot.volumeName}, not ${ref.volume}; write ${snapshot.volumeName}@${ref.snapshot}`,
    );
  }
  return snapshot;
}
