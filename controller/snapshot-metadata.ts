import { invalid, notFound, outOfRange } from '../csi/errors';
import type { BlockMetadata } from '../csi/generated/csi/v1/BlockMetadata';
import type { GetMetadataAllocatedResponse } from '../csi/generated/csi/v1/GetMetadataAllocatedResponse';
import type { GetMetadataDeltaResponse } from '../csi/generated/csi/v1/GetMetadataDeltaResponse';
import type { SnapshotMetadataHandlers } from '../csi/generated/csi/v1/SnapshotMetadata';
import { ResponseStream, StreamingHandlers } from '../csi/server';
import type { StoreApi } from '../store/api';
import type { ByteRange } from '../store/diff';
import type { SnapshotRecord } from '../store/records';

/**
 * The CSI SnapshotMetadata service (alpha in CSI v1.12): which byte ranges a
 * snapshot holds, and which differ between two snapshots, for backup tools that
 * would otherwise read every byte of every volume. The store computes both by
 * walking the snapshots' maps, skipping every subtree two snapshots share
 * (store/diff.ts); this layer checks requests and streams the answer.
 *
 * What Arbor answers, where the spec leaves the choice to the plugin:
 * - VARIABLE_LENGTH block metadata: each tuple is a run of whole extents, merged
 *   with its neighbours; every tuple starts on an extent boundary and ends on one or
 *   at the volume's end.
 * - A tuple that holds starting_offset is sent from the start of the extent that
 *   holds it (tuples that end at or before starting_offset are left out).
 * - The stream always carries at least one message, so the client learns
 *   volume_capacity_bytes even when nothing is allocated or nothing changed.
 * - GetMetadataDelta takes any two snapshots of one lineage (snapshots of one
 *   volume, of a clone and of its parent's lineage, of two clones of one source):
 *   the ranges whose bytes differ, within the target's capacity. Snapshots that
 *   share no volume in their ancestry are refused (INVALID_ARGUMENT).
 */

/** The store calls this service makes: in this process, or through the admin socket of the process that holds the store. */
export type SnapshotMetadataStore = Pick<StoreApi, 'findSnapshot' | 'snapshotAllocated' | 'diffSnapshots'>;

/** Tuples per response message when the client leaves max_results at 0: about 20 bytes each on the wire. */
export const defaultTuplesPerMessage = 1024;
/** The most tuples Arbor puts in one message, whatever max_results asks (the spec lets the plugin send fewer): messages stay under ~100 KiB. */
export const maxTuplesPerMessage = 4096;

/**
 * Arbor's snapshot ids, as CreateSnapshot returns them (store/records.ts,
 * newSnapshotId). Anything else cannot name a snapshot: a name or a VolumeSnapshot's
 * name passed by mistake is refused as malformed rather than reported missing.
 */
const snapshotIdPattern = /^snap-[0-9a-f]{16}$/;

export function snapshotMetadataService(store: SnapshotMetadataStore): StreamingHandlers<SnapshotMetadataHandlers> {
  const mustFind = async (id: string, field: string): Promise<SnapshotRecord> => {
    const snapshot = await store.findSnapshot({ id });
    if (!snapshot) throw notFound(`${field} ${id}: no such snapshot`);
    return snapshot;
  };

  return {
    async GetMetadataAllocated(request, stream) {
      const id = snapshotId(request.snapshot_id, 'snapshot_id');
      const start = startingOffset(request.starting_offset);
      const perMessage = tuplesPerMessage(request.max_results);
      const snapshot = await mustFind(id, 'snapshot_id');
      checkWithin(start, snapshot);
      const ranges = await store.snapshotAllocated({ id });
      await sendRanges(stream, ranges, { start, perMessage, extentSizeBytes: snapshot.extentSizeBytes, capacityBytes: snapshot.sizeBytes });
    },

    async GetMetadataDelta(request, stream) {
      const baseId = snapshotId(request.base_snapshot_id, 'base_snapshot_id');
      const targetId = snapshotId(request.target_snapshot_id, 'target_snapshot_id');
      const start = startingOffset(request.starting_offset);
      const perMessage = tuplesPerMessage(request.max_results);
      const base = await mustFind(baseId, 'base_snapshot_id');
      const target = await mustFind(targetId, 'target_snapshot_id');
      if (!oneLineage(base, target)) {
        throw invalid(
          `base_snapshot_id ${baseId} (of volume ${base.volumeName}) and target_snapshot_id ${targetId} (of volume ${target.volumeName}) are not of one lineage: neither volume was cloned from the other or from a common source, so there is no delta to compute; ask for GetMetadataAllocated of the target instead`,
        );
      }
      checkWithin(start, target);
      // The whole diff is computed before the first message (the store answers in one piece); a client gone meanwhile is not answered.
      const ranges = await store.diffSnapshots({ id: baseId }, { id: targetId });
      if (stream.cancelled) return;
      await sendRanges(stream, ranges, { start, perMessage, extentSizeBytes: target.extentSizeBytes, capacityBytes: target.sizeBytes });
    },
  };
}

function snapshotId(value: string, field: string): string {
  if (!value) throw invalid(`${field} is required`);
  if (!snapshotIdPattern.test(value)) {
    throw invalid(`${field} ${JSON.stringify(value.slice(0, 128))} is not an Arbor snapshot id (snap- and 16 hex digits, as CreateSnapshot returns)`);
  }
  return value;
}

/** starting_offset as the wire gives it (an int64 as a decimal string). */
function startingOffset(value: string): number {
  const offset = /^-?\d+$/.test(value) ? BigInt(value) : undefined;
  if (offset === undefined) throw invalid(`starting_offset ${JSON.stringify(value)} is not a whole number`);
  if (offset < 0n) throw outOfRange(`starting_offset ${value} is negative`);
  // Past any volume Arbor makes: checkWithin names the size once the snapshot is known.
  return offset > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(offset);
}

function checkWithin(start: number, snapshot: SnapshotRecord): void {
  // The spec: OUT_OF_RANGE when starting_offset "exceeds the volume size"; at the size exactly there is nothing left to report.
  if (start > snapshot.sizeBytes) {
    throw outOfRange(
      `starting_offset ${start} is past the end of snapshot ${snapshot.id} (of volume ${snapshot.volumeName}), which is ${snapshot.sizeBytes} bytes`,
    );
  }
}

function tuplesPerMessage(maxResults: number): number {
  if (!Number.isInteger(maxResults) || maxResults < 0) throw invalid(`max_results must not be negative, got ${maxResults}`);
  return maxResults === 0 ? defaultTuplesPerMessage : Math.min(maxResults, maxTuplesPerMessage);
}

/** Two snapshots are of one lineage when some volume is in the ancestry of both (their own volumes included). */
function oneLineage(a: SnapshotRecord, b: SnapshotRecord): boolean {
  const ancestry = (s: SnapshotRecord) => [s.volumeId, ...s.lineage.map((step) => step.volumeId)];
  const ofA = new Set(ancestry(a));
  return ancestry(b).some((id) => ofA.has(id));
}

interface Window {
  /** starting_offset: tuples that end at or before it are left out. */
  start: number;
  perMessage: number;
  extentSizeBytes: number;
  /** volume_capacity_bytes: no tuple reaches past it. */
  capacityBytes: number;
}

/** The ranges from `window.start` on, `perMessage` tuples at a time; built one message at a time, so memory follows the message, not the answer. */
async function sendRanges(
  stream: ResponseStream<GetMetadataAllocatedResponse> | ResponseStream<GetMetadataDeltaResponse>,
  ranges: ByteRange[],
  window: Window,
): Promise<void> {
  const { start, perMessage, extentSizeBytes, capacityBytes } = window;
  const message = (tuples: BlockMetadata[]) => ({
    block_metadata_type: 'VARIABLE_LENGTH' as const,
    volume_capacity_bytes: String(capacityBytes),
    block_metadata: tuples,
  });
  const from = Math.floor(start / extentSizeBytes) * extentSizeBytes;
  let tuples: BlockMetadata[] = [];
  let sentAny = false;
  let previousEnd = 0;
  for (let i = firstEndingAfter(ranges, start); i < ranges.length; i++) {
    const offset = Math.max(ranges[i].offset, from);
    const end = Math.min(ranges[i].offset + ranges[i].length, capacityBytes);
    if (end <= offset) break;
    // What the spec requires of every stream: ascending, never overlapping, never empty.
    if (offset < previousEnd) throw new Error(`the store's ranges overlap or go backwards at byte ${offset}`);
    previousEnd = end;
    tuples.push({ byte_offset: String(offset), size_bytes: String(end - offset) });
    if (tuples.length === perMessage) {
      if (!(await stream.send(message(tuples)))) return;
      sentAny = true;
      tuples = [];
    }
  }
  if (tuples.length > 0 || !sentAny) await stream.send(message(tuples));
}

/** The index of the first range that ends after `offset` (ranges are in ascending order): a binary search. */
function firstEndingAfter(ranges: ByteRange[], offset: number): number {
  let low = 0;
  let high = ranges.length;
  while (low < high) {
    const middle = (low + high) >>> 1;
    if (ranges[middle].offset + ranges[middle].length <= offset) low = middle + 1;
    else high = middle;
  }
  return low;
}
