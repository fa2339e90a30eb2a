import { ArborError } from '../store/errors';
import { SnapshotRecord } from '../store/records';
import { StoreApi } from './admin/methods';
import { UsageError } from './args';
import { VolumeOrSnapshotName, formatRef, parseRefText } from '../store/names';

/** NAME or NAME@SNAP as typed on the command line (names quoted: '@' as %40, '%' as %25). */
export type VolumeOrSnapshot = VolumeOrSnapshotName;

export function parseRef(text: string, what: string): VolumeOrSnapshot {
  const ref = parseRefText(text);
  if (typeof ref === 'string') throw new UsageError(`${what} ${JSON.stringify(text)} is not NAME or NAME@SNAP: ${ref}`);
  return ref;
}

export function parseSnapshotRef(text: string, what: string): Required<VolumeOrSnapshot> {
  const ref = parseRef(text, what);
  if (!ref.snapshot) throw new UsageError(`${what} ${JSON.stringify(text)} names no snapshot: write NAME@SNAP`);
  return ref as Required<VolumeOrSnapshot>;
}

/** The snapshot NAME@SNAP: SNAP among the snapshots of volume NAME (as in rbd and zfs). */
export async function snapshotOf(store: StoreApi, ref: Required<VolumeOrSnapshot>): Promise<SnapshotRecord> {
  const snapshot = await store.findSnapshot({ volume: { name: ref.volume }, name: ref.snapshot });
  if (!snapshot) {
    const text = formatRef(ref.volume, ref.snapshot);
    throw new ArborError('not-found', `snapshot ${text} does not exist; see 'arbor snapshot list ${formatRef(ref.volume)}'`);
  }
  return snapshot;
}
