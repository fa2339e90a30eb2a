import { BlobStore } from './blobs/blobs';
import { ArborError } from './errors';
import { EMPTY, Entry, blobOf, hasBlob, isPartial, isWritable, isZero } from './entry';
import { slotAt, slotsOverlapping } from './geometry';
import { MapNode, getEntry } from './map-node';
import { entriesPerNode } from './limits';
import { baseOf, forEachRun, isWideLeaf, pageBytes, pagesHeld, partialLayout } from './partial';

/** Where a tree's nodes come from: a volume's own dirty nodes first, then the shared cache. */
export interface NodeSource {
  cached(id: number): MapNode | undefined;
  load(id: number): Promise<MapNode>;
}

/** What a tree maps: its root pointer and how many levels of nodes hang under it. */
export interface TreeShape {
  root: Entry;
  depth: number;
  sizeBytes: number;
  extentSizeBytes: number;
}

/** A run of `count` extents starting at `first` that share one entry (holes come in runs). */
export interface Segment {
  first: number;
  count: number;
  entry: Entry;
  /** For a partial extent (count 1): the leaf holding its base and pages, and its slot there. */
  leaf?: MapNode;
  slot?: number;
}

/** One extent's leaf entry and, for a partial extent, the leaf that holds its base and pages. */
export interface ExtentRef {
  entry: Entry;
  leaf?: MapNode;
  slot?: number;
}

export type RangeKind = 'data' | 'hole' | 'zero';

export interface RangeStatus {
  offset: number;
  length: number;
  kind: RangeKind;
}

async function nodeOf(source: NodeSource, id: number): Promise<MapNode> {
  return source.cached(id) ?? (await source.load(id));
}

/**
 * The entries mapping extents first..last, walking each node once and reporting an
 * unmapped subtree as one hole segment, so a map of a huge sparse volume costs what
 * is written, not what is addressable. Reads never follow a chain of parents: a
 * clone's tree is complete.
 */
export async function mapExtents(source: NodeSource, root: Entry, depth: number, first: number, last: number): Promise<Segment[]> {
  const out: Segment[] = [];
  if (!hasBlob(root)) {
    out.push({ first, count: last - first + 1, entry: EMPTY });
    return out;
  }
  await walk(source, blobOf(root), depth - 1, 0, first, last, out);
  return out;
}

async function walk(source: NodeSource, id: number, level: number, base: number, first: number, last: number, out: Segment[]): Promise<void> {
  const node = source.cached(id) ?? (await source.load(id));
  const { span, firstSlot, lastSlot } = slotsOverlapping(level, base, first, last);
  for (let slot = firstSlot; slot <= lastSlot; slot++) {
    const entry = getEntry(node, slot);
    const slotBase = base + slot * span;
    const from = Math.max(first, slotBase);
    const to = Math.min(last, slotBase + span - 1);
    if (level > 0) checkAboveLeaves(node, id, slot, level, entry);
    if (level === 0 && isPartial(entry)) {
      out.push({ first: from, count: 1, entry, leaf: node, slot });
    } else if (level === 0 || !hasBlob(entry)) {
      const previous = out[out.length - 1];
      if (previous && previous.entry === entry && !hasBlob(entry) && previous.first + previous.count === from) previous.count += to - from + 1;
      else out.push({ first: from, count: to - from + 1, entry });
    } else {
      await walk(source, blobOf(entry), level - 1, slotBase, from, to, out);
    }
  }
}

const hole: ExtentRef = { entry: EMPTY };

/** The leaf entry of one extent. */
export async function lookupExtent(source: NodeSource, root: Entry, depth: number, extent: number): Promise<Entry> {
  return (await lookupRef(source, root, depth, extent)).entry;
}

/** Slot `slot` of a leaf as an ExtentRef: a partial extent carries its leaf, which holds its base and pages. */
export function refAt(leaf: MapNode, slot: number): ExtentRef {
  const entry = getEntry(leaf, slot);
  return isPartial(entry) ? { entry, leaf, slot } : { entry };
}

/** The leaf entry of one extent, with its leaf when it is partial. */
export async function lookupRef(source: NodeSource, root: Entry, depth: number, extent: number): Promise<ExtentRef> {
  let entry = root;
  for (let level = depth - 1; level >= 0; level--) {
    if (!hasBlob(entry)) return hole;
    const id = blobOf(entry);
    const slot = slotAt(extent, level);
    const node = await nodeOf(source, id);
    if (level === 0) return refAt(node, slot);
    entry = getEntry(node, slot);
    checkAboveLeaves(node, id, slot, level, entry);
  }
  return { entry };
}

/** `lookupRef` when every node on the extent's path is in memory; undefined when one must be loaded. */
export function lookupRefNow(source: NodeSource, root: Entry, depth: number, extent: number): ExtentRef | undefined {
  let entry = root;
  for (let level = depth - 1; level >= 0; level--) {
    if (!hasBlob(entry)) return hole;
    const id = blobOf(entry);
    const node = source.cached(id);
    if (!node) return undefined;
    const slot = slotAt(extent, level);
    if (level === 0) return refAt(node, slot);
    entry = getEntry(node, slot);
    checkAboveLeaves(node, id, slot, level, entry);
  }
  return { entry };
}

/**
 * ZERO (allocated zeros) and PARTIAL are a leaf's words for one extent, and only a
 * leaf is wide: above the leaves no code of ours writes them.
 */
function checkAboveLeaves(node: MapNode, id: number, slot: number, level: number, entry: Entry): void {
  const problem = isZero(entry) ? 'ZERO' : isPartial(entry) ? 'PARTIAL' : isWideLeaf(node) ? 'a wide leaf' : undefined;
  if (!problem) return;
  throw new ArborError(
    'internal',
    `map node ${id} is damaged: slot ${slot} holds ${problem} above the leaves (level ${level}); the blob store is damaged: restore it from a backup`,
  );
}

/**
 * Reads `length` bytes at `offsetInExtent` of one extent into `target`: zeros for a
 * hole or allocated zeros, the blob for a plain extent, and for a partial one each
 * page from the patch or from the base.
 */
export async function readExtent(
  blobs: BlobStore,
  ref: ExtentRef,
  extentSizeBytes: number,
  offsetInExtent: number,
  target: Buffer,
  at: number,
  length: number,
): Promise<void> {
  const { entry, leaf, slot } = ref;
  if (!hasBlob(entry)) {
    target.fill(0, at, at + length);
    return;
  }
  if (!leaf || slot === undefined) {
    await blobs.read(blobOf(entry), offsetInExtent, target, at, length);
    return;
  }
  const reads: Promise<void>[] = [];
  const patch = blobOf(entry);
  const base = blobOf(baseOf(leaf, slot));
  forEachRun(leaf, slot, partialLayout(extentSizeBytes)!.stride, offsetInExtent, length, (inPatch, offset, n) => {
    reads.push(blobs.read(inPatch ? patch : base, offset, target, at + (offset - offsetInExtent), n));
  });
  await Promise.all(reads);
}

/** `readExtent` done at once, from a blob store that can; false (maybe half done) when some part must be read async. */
export function readExtentNow(
  blobs: BlobStore,
  ref: ExtentRef,
  extentSizeBytes: number,
  offsetInExtent: number,
  target: Buffer,
  at: number,
  length: number,
): boolean {
  const { entry, leaf, slot } = ref;
  const readNow = blobs.readNow;
  if (!readNow) return false;
  if (!hasBlob(entry)) {
    target.fill(0, at, at + length);
    return true;
  }
  if (!leaf || slot === undefined) return readNow.call(blobs, blobOf(entry), offsetInExtent, target, at, length);
  const patch = blobOf(entry);
  const base = blobOf(baseOf(leaf, slot));
  let done = true;
  forEachRun(leaf, slot, partialLayout(extentSizeBytes)!.stride, offsetInExtent, length, (inPatch, offset, n) => {
    if (done) done = readNow.call(blobs, inPatch ? patch : base, offset, target, at + (offset - offsetInExtent), n);
  });
  return done;
}

/** Reads `length` bytes at `offset` of the tree into `target`. */
export async function readTree(
  source: NodeSource,
  blobs: BlobStore,
  tree: TreeShape,
  offset: number,
  target: Buffer,
  targetOffset: number,
  length: number,
): Promise<void> {
  if (length === 0) return;
  const extentSize = tree.extentSizeBytes;
  const first = Math.floor(offset / extentSize);
  const last = Math.floor((offset + length - 1) / extentSize);
  const segments: Array<ExtentRef & { first: number; count: number }> =
    first === last
      ? [{ first, count: 1, ...(await lookupRef(source, tree.root, tree.depth, first)) }]
      : await mapExtents(source, tree.root, tree.depth, first, last);
  for (let i = 0; i < segments.length;) {
    const segment = segments[i];
    // Whole extents in blobs that lie end to end (consecutive ids of one file) are one read.
    let count = segment.count;
    while (i + 1 < segments.length && followsInStorage(blobs, segments[i], segments[i + 1])) count += segments[++i].count;
    i++;
    const from = Math.max(offset, segment.first * extentSize);
    const to = Math.min(offset + length, (segment.first + count) * extentSize);
    await readExtent(blobs, segment, extentSize, from - segment.first * extentSize, target, targetOffset + (from - offset), to - from);
  }
}

/** Whether `next`, the extent right after `segment`, is the next blob in storage after it: both plain data, `adjacent` by the store. */
function followsInStorage(
  blobs: BlobStore,
  segment: ExtentRef & { first: number; count: number },
  next: ExtentRef & { first: number; count: number },
): boolean {
  const plain = (s: ExtentRef) => hasBlob(s.entry) && s.leaf === undefined;
  return (
    blobs.adjacent !== undefined &&
    plain(segment) &&
    plain(next) &&
    segment.count === 1 &&
    next.first === segment.first + 1 &&
    blobs.adjacent(blobOf(segment.entry), blobOf(next.entry))
  );
}

/** Allocation status of [offset, offset+length): data, holes (never written) and allocated zeros, merged into runs. */
export async function treeStatus(source: NodeSource, tree: TreeShape, offset: number, length: number): Promise<RangeStatus[]> {
  if (length === 0) return [];
  const extentSize = tree.extentSizeBytes;
  const first = Math.floor(offset / extentSize);
  const last = Math.floor((offset + length - 1) / extentSize);
  const out: RangeStatus[] = [];
  for (const segment of await mapExtents(source, tree.root, tree.depth, first, last)) {
    const kind: RangeKind = hasBlob(segment.entry) ? 'data' : isZero(segment.entry) ? 'zero' : 'hole';
    const from = Math.max(offset, segment.first * extentSize);
    const to = Math.min(offset + length, (segment.first + segment.count) * extentSize);
    const previous = out[out.length - 1];
    if (previous && previous.kind === kind && previous.offset + previous.length === from) previous.length += to - from;
    else out.push({ offset: from, length: to - from, kind });
  }
  return out;
}

/**
 * How many bytes a tree maps to data, and how many of those it owns: reached through
 * writable pointers all the way from the root, so freed when the head is. A partial
 * extent maps its whole extent (the pages its patch lacks read through its base) and
 * owns only the pages its patch holds: the base is shared.
 */
export async function countExtents(
  source: NodeSource,
  root: Entry,
  depth: number,
  extentSizeBytes: number,
): Promise<{ dataBytes: number; ownedBytes: number }> {
  const layout = partialLayout(extentSizeBytes);
  const counts = { dataBytes: 0, ownedBytes: 0 };
  const visit = async (entry: Entry, level: number, owned: boolean, leaf?: MapNode, slot?: number): Promise<void> => {
    if (!hasBlob(entry)) return;
    const mine = owned && isWritable(entry);
    if (level < 0) {
      counts.dataBytes += extentSizeBytes;
      if (mine) counts.ownedBytes += isPartial(entry) ? pagesHeld(leaf!, slot!, layout!.stride) * pageBytes : extentSizeBytes;
      return;
    }
    const node = await nodeOf(source, blobOf(entry));
    for (let i = 0; i < entriesPerNode; i++) await visit(getEntry(node, i), level - 1, mine, node, i);
  };
  await visit(root, depth - 1, true);
  return counts;
}
