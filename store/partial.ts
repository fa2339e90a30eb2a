/**
 * Partial extents: copy-on-write at page granularity.
 *
 * The first write into a shared extent does not copy the extent. It goes to a new,
 * sparse blob (the patch) that holds only the 4 KiB pages written since; every other
 * page still reads through the shared blob it came from (the base). The leaf entry
 * is PARTIAL and names the patch; the base and the pages the patch holds sit beside
 * the entries, in a wide leaf:
 *
 *   [0, 4 KiB)            the 512 entries, as in every node
 *   [4 KiB, 8 KiB)        512 base entries: the shared extent a PARTIAL slot reads through, 0 elsewhere
 *   [8 KiB, ...)          512 page bitmaps of `stride` bytes: bit p set = page p is in the patch
 *
 * rounded up to a blob size class, so a wide leaf is told from a plain one by its
 * blob id's class alone. It is written back with the rest of the tree (shadow
 * paging), so a partial extent's pages, base and patch change atomically with the
 * commit. qcow2's subclusters (extended L2 entries) solve the same problem the same way.
 *
 * A base is never this tree's own: it is a shared extent, freed by the collector.
 * When every page is in the patch, the entry becomes a plain one and the base is let go.
 */
import { bytesOfClass, classOf } from './blob-id';
import { Entry, entryProblem, hasBlob, isPartial, isWritable, isZero, EMPTY } from './entry';
import { entriesPerNode, nodeSizeBytes } from './limits';
import { MapNode, getEntry, setEntry } from './map-node';

export const pageBytes = 4096;
const basesAt = nodeSizeBytes;
const bitmapsAt = basesAt + entriesPerNode * 8;

export interface PartialLayout {
  /** Pages per extent. */
  pages: number;
  /** Bytes of one slot's page bitmap. */
  stride: number;
  /** Bytes of a wide leaf (a blob size class). */
  bytes: number;
}

const layouts = new Map<number, PartialLayout>();

/** The wide-leaf layout of a tree with extents of `extentSizeBytes`, or undefined when an extent is one page. */
export function partialLayout(extentSizeBytes: number): PartialLayout | undefined {
  const pages = extentSizeBytes / pageBytes;
  if (pages <= 1) return undefined;
  let layout = layouts.get(extentSizeBytes);
  if (!layout) {
    const stride = Math.ceil(pages / 8);
    let bytes = nodeSizeBytes;
    while (bytes < bitmapsAt + entriesPerNode * stride) bytes *= 2;
    layout = { pages, stride, bytes };
    layouts.set(extentSizeBytes, layout);
  }
  return layout;
}

export function isWideLeaf(node: MapNode): boolean {
  return node.length > nodeSizeBytes;
}

/** How many bytes a node blob of this id holds (a wide leaf when its class is above the map-node class). */
export function nodeBytesOf(id: number): number {
  return bytesOfClass(classOf(id));
}

/** A wide copy of a plain leaf: the same entries, no partial slots. */
export function widen(leaf: MapNode, layout: PartialLayout): MapNode {
  const wide = Buffer.alloc(layout.bytes);
  leaf.copy(wide, 0, 0, nodeSizeBytes);
  return wide;
}

export function baseOf(leaf: MapNode, slot: number): Entry {
  return isWideLeaf(leaf) ? getEntry(leaf.subarray(basesAt), slot) : EMPTY;
}

export function hasPage(leaf: MapNode, slot: number, stride: number, page: number): boolean {
  return bitSet(leaf, bitmapsAt + slot * stride, page);
}

/** Whether a bitmap `pagesOf` returned (or a copy of one) holds `page`. */
export function bitmapHasPage(pages: Buffer, page: number): boolean {
  return bitSet(pages, 0, page);
}

function bitSet(bytes: Buffer, at: number, page: number): boolean {
  return (bytes[at + (page >> 3)] & (1 << (page & 7))) !== 0;
}

/** Whether pages first..last (inclusive) are all in the patch. */
export function hasPages(leaf: MapNode, slot: number, stride: number, first: number, last: number): boolean {
  for (let page = first; page <= last; page++) if (!hasPage(leaf, slot, stride, page)) return false;
  return true;
}

export function allPages(leaf: MapNode, slot: number, layout: PartialLayout): boolean {
  return hasPages(leaf, slot, layout.stride, 0, layout.pages - 1);
}

/** How many pages the patch of `slot` holds. */
export function pagesHeld(leaf: MapNode, slot: number, stride: number): number {
  let count = 0;
  for (const byte of pagesOf(leaf, slot, stride)) {
    for (let bits = byte; bits !== 0; bits &= bits - 1) count++;
  }
  return count;
}

/** Makes `slot` a partial extent: `patch` (a PARTIAL entry) over `base`, holding no page yet. */
export function setPartial(leaf: MapNode, slot: number, layout: PartialLayout, patch: Entry, base: Entry): void {
  setEntry(leaf, slot, patch);
  setEntry(leaf.subarray(basesAt), slot, base);
  leaf.fill(0, bitmapsAt + slot * layout.stride, bitmapsAt + (slot + 1) * layout.stride);
}

export function addPages(leaf: MapNode, slot: number, stride: number, first: number, last: number): void {
  for (let page = first; page <= last; page++) leaf[bitmapsAt + slot * stride + (page >> 3)] |= 1 << (page & 7);
}

/** A slot's page bitmap (a view into the leaf: copy it to keep it). */
export function pagesOf(leaf: MapNode, slot: number, stride: number): Buffer {
  return leaf.subarray(bitmapsAt + slot * stride, bitmapsAt + (slot + 1) * stride);
}

export function setPages(leaf: MapNode, slot: number, stride: number, pages: Buffer): void {
  pages.copy(leaf, bitmapsAt + slot * stride, 0, stride);
}

/** Sets a leaf slot to a plain entry, clearing what a partial extent kept beside it. */
export function setPlain(leaf: MapNode, slot: number, entry: Entry, layout: PartialLayout | undefined): void {
  setEntry(leaf, slot, entry);
  if (!layout || !isWideLeaf(leaf)) return;
  setEntry(leaf.subarray(basesAt), slot, EMPTY);
  leaf.fill(0, bitmapsAt + slot * layout.stride, bitmapsAt + (slot + 1) * layout.stride);
}

/**
 * Runs of pages of `[offset, offset + length)` within one partial extent, each read
 * from the patch (`inPatch`) or the base: `visit(inPatch, offset, length)`.
 */
export function forEachRun(
  leaf: MapNode,
  slot: number,
  stride: number,
  offset: number,
  length: number,
  visit: (inPatch: boolean, offset: number, length: number) => void,
): void {
  const end = offset + length;
  let at = offset;
  while (at < end) {
    const inPatch = hasPage(leaf, slot, stride, Math.floor(at / pageBytes));
    let to = (Math.floor(at / pageBytes) + 1) * pageBytes;
    while (to < end && hasPage(leaf, slot, stride, to / pageBytes) === inPatch) to += pageBytes;
    to = Math.min(to, end);
    visit(inPatch, at, to - at);
    at = to;
  }
}

/**
 * What is wrong with the partial-extent part of a wide leaf read from storage, or
 * undefined: a PARTIAL slot must name a plain shared data extent as its base, and
 * every other slot none.
 */
export function wideLeafProblem(leaf: MapNode): string | undefined {
  const bytes = leaf.length;
  if (bytes < bitmapsAt + entriesPerNode) return `a wide leaf of ${bytes} bytes is too small for its page bitmaps`;
  for (let slot = 0; slot < entriesPerNode; slot++) {
    const entry = getEntry(leaf, slot);
    const base = baseOf(leaf, slot);
    if (!isPartial(entry)) {
      if (base !== EMPTY) return `slot ${slot} is not partial but names base ${base}`;
      continue;
    }
    const problem = entryProblem(base, true);
    if (problem) return `slot ${slot}'s base: ${problem}`;
    if (!hasBlob(base) || isWritable(base) || isZero(base) || isPartial(base)) return `slot ${slot}'s base ${base} is not a shared data extent`;
  }
  return undefined;
}
