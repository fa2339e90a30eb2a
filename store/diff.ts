/**
 * What changed between two trees of one lineage (two snapshots of a volume, or a
 * snapshot of a clone and one of its parent's lineage), and what one tree holds.
 *
 * Two trees of a lineage share every subtree neither changed: the same node, reached
 * through entries that name the same blob. The walk compares the two trees from the
 * roots down and skips every pair of equal entries, so its cost follows the map nodes
 * that differ, not the volume's size. An extent whose entries differ is then checked
 * by its bytes (a write of the same bytes, or allocated zeros where the other has a
 * hole, changes no byte): the answer is exactly the extents whose contents differ.
 */
import { BlobStore } from './blobs/blobs';
import { ArborError } from './errors';
import { EMPTY, Entry, asShared, blobOf, hasBlob, isPartial, isZero } from './entry';
import { extentsPerSlot } from './geometry';
import { entriesPerNode } from './limits';
import { ExtentRef, mapExtents, NodeSource, readExtent, refAt, TreeShape } from './tree';

/** Byte ranges, in order, merged where they touch. */
export interface ByteRange {
  offset: number;
  length: number;
}

/** The extents whose contents differ between `from` and `to`, as byte ranges within the larger size. */
export async function changedRanges(source: NodeSource, blobs: BlobStore, from: TreeShape, to: TreeShape): Promise<ByteRange[]> {
  if (from.extentSizeBytes !== to.extentSizeBytes) {
    throw new ArborError('invalid-argument', `trees of extent sizes ${from.extentSizeBytes} and ${to.extentSizeBytes} are not of one lineage`);
  }
  const candidates: Candidate[] = [];
  const depth = Math.max(from.depth, to.depth);
  await compare(source, lift(from, depth), lift(to, depth), depth - 1, 0, candidates);
  const extentSize = from.extentSizeBytes;
  const changed: number[] = [];
  for (const candidate of candidates) {
    if (!(await sameBytes(blobs, candidate.from, candidate.to, extentSize))) changed.push(candidate.extent);
  }
  return toRanges(changed, extentSize, Math.max(from.sizeBytes, to.sizeBytes));
}

/** The extents a tree maps (data, or allocated zeros), as byte ranges. */
export async function allocatedRanges(source: NodeSource, tree: TreeShape): Promise<ByteRange[]> {
  const extents = Math.ceil(tree.sizeBytes / tree.extentSizeBytes);
  if (extents === 0) return [];
  const segments = await mapExtents(source, tree.root, tree.depth, 0, extents - 1);
  const ranges: ByteRange[] = [];
  for (const segment of segments) {
    if (segment.entry === EMPTY) continue;
    addRange(ranges, segment.first * tree.extentSizeBytes, segment.count * tree.extentSizeBytes);
  }
  return clip(ranges, tree.sizeBytes);
}

/** An extent whose entries differ in the two trees. */
interface Candidate {
  extent: number;
  from: ExtentRef;
  to: ExtentRef;
}

/**
 * A tree's root seen at a greater depth: growing a volume puts its old root in slot 0
 * of a new one, level by level. Returned as the chain of slot-0 wrappers the compare
 * walks through.
 */
interface Lifted {
  root: Entry;
  /** Levels of wrapping above the real root: slot 0 of each holds the next, the rest are holes. */
  wraps: number;
}

function lift(tree: TreeShape, depth: number): Lifted {
  return { root: tree.root, wraps: depth - tree.depth };
}

/** Compares the subtrees at `level` (entries point at level-`level` nodes; -1: data extents) starting at extent `base`. */
async function compare(source: NodeSource, a: Lifted, b: Lifted, level: number, base: number, out: Candidate[]): Promise<void> {
  if (a.wraps > 0 || b.wraps > 0) {
    // Above a shallower root: its slot 0 is the root's subtree, the other slots are holes.
    const span = extentsPerSlot(level);
    const childA: Lifted = a.wraps > 0 ? { root: a.root, wraps: a.wraps - 1 } : { root: EMPTY, wraps: 0 };
    const childB: Lifted = b.wraps > 0 ? { root: b.root, wraps: b.wraps - 1 } : { root: EMPTY, wraps: 0 };
    const nodeA = a.wraps > 0 ? undefined : a.root;
    const nodeB = b.wraps > 0 ? undefined : b.root;
    for (let slot = 0; slot < entriesPerNode; slot++) {
      const left = nodeA === undefined ? (slot === 0 ? childA : none) : { root: (await childOf(source, nodeA, slot)).entry, wraps: 0 };
      const right = nodeB === undefined ? (slot === 0 ? childB : none) : { root: (await childOf(source, nodeB, slot)).entry, wraps: 0 };
      if (left.wraps === 0 && right.wraps === 0 && left.root === EMPTY && right.root === EMPTY) continue;
      await compare(source, left, right, level - 1, base + slot * span, out);
    }
    return;
  }
  await compareEntries(source, { entry: a.root }, { entry: b.root }, level, base, out);
}

const none: Lifted = { root: EMPTY, wraps: 0 };

const hole: ExtentRef = { entry: EMPTY };

/** Slot `slot` of the node `entry` points at, with the leaf when it is a partial extent. */
async function childOf(source: NodeSource, entry: Entry, slot: number): Promise<ExtentRef> {
  if (!hasBlob(entry)) return hole;
  const id = blobOf(entry);
  const node = source.cached(id) ?? (await source.load(id));
  return refAt(node, slot);
}

async function compareEntries(source: NodeSource, a: ExtentRef, b: ExtentRef, level: number, base: number, out: Candidate[]): Promise<void> {
  // The same blob, whoever owns it: the same subtree, or the same extent (a patch
  // is shared only once it stops changing, so one patch has one set of pages).
  if (asShared(a.entry) === asShared(b.entry)) return;
  if (level < 0) {
    out.push({ extent: base, from: a, to: b });
    return;
  }
  if (isZero(a.entry) || isZero(b.entry) || isPartial(a.entry) || isPartial(b.entry)) {
    throw new ArborError('internal', `a map holds ZERO or PARTIAL above its leaves at extent ${base}: the blob store is damaged`);
  }
  const span = extentsPerSlot(level);
  for (let slot = 0; slot < entriesPerNode; slot++) {
    const left = await childOf(source, a.entry, slot);
    const right = await childOf(source, b.entry, slot);
    await compareEntries(source, left, right, level - 1, base + slot * span, out);
  }
}

/** Whether two extents read the same bytes (holes and allocated zeros read as zeros). */
async function sameBytes(blobs: BlobStore, a: ExtentRef, b: ExtentRef, extentSize: number): Promise<boolean> {
  const read = async (ref: ExtentRef): Promise<Buffer | undefined> => {
    if (!hasBlob(ref.entry) || isZero(ref.entry)) return undefined;
    const data = Buffer.alloc(extentSize);
    await readExtent(blobs, ref, extentSize, 0, data, 0, extentSize);
    return data;
  };
  const [left, right] = [await read(a), await read(b)];
  if (!left && !right) return true;
  if (left && right) return left.equals(right);
  return isAllZeros((left ?? right)!);
}

function isAllZeros(data: Buffer): boolean {
  for (let i = 0; i < data.length; i++) if (data[i] !== 0) return false;
  return true;
}

function toRanges(extents: number[], extentSize: number, sizeBytes: number): ByteRange[] {
  const ranges: ByteRange[] = [];
  for (const extent of extents) addRange(ranges, extent * extentSize, extentSize);
  return clip(ranges, sizeBytes);
}

function addRange(ranges: ByteRange[], offset: number, length: number): void {
  const last = ranges[ranges.length - 1];
  if (last && last.offset + last.length === offset) last.length += length;
  else ranges.push({ offset, length });
}

/** The last extent may reach past the volume's end: ranges stop at its size. */
function clip(ranges: ByteRange[], sizeBytes: number): ByteRange[] {
  return ranges.map((r) => ({ offset: r.offset, length: Math.min(r.length, sizeBytes - r.offset) })).filter((r) => r.length > 0);
}
