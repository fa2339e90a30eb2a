import { BlobStore } from './blobs/blobs';
import { BlobIdAllocator } from './allocator';
import { classForBytes } from './blob-id';
import { BlobIdSet } from './blob-id-set';
import { assert } from './errors';
import { EMPTY, Entry, PARTIAL, WRITABLE, asShared, blobOf, hasBlob, isPartial, isWritable, isZero, makeEntry, zeroEntry } from './entry';
import { capacityExtents, slotAt, slotsOverlapping } from './geometry';
import { MapNode, emptyNode, getEntry, setEntry, sharedCopy } from './map-node';
import { AfterCommit } from './deferred-frees';
import { NodeCache } from './node-cache';
import { NodeSource, TreeShape } from './tree';
import { entriesPerNode } from './limits';
import { sharedPool } from '../lib/buffer-pool';
import {
  PartialLayout,
  addPages,
  allPages,
  baseOf,
  bitmapHasPage,
  hasPage,
  hasPages,
  isWideLeaf,
  pageBytes,
  pagesOf,
  partialLayout,
  setPages,
  setPartial,
  setPlain,
  widen,
} from './partial';

interface PathStep {
  id: number;
  node: MapNode;
}

/** Where one extent of `writeWholeExtents` goes, decided before any of its bytes are written. */
interface WholeExtentWrite {
  leaf: MapNode;
  slot: number;
  /** The blob the extent's bytes go to. */
  id: number;
  /** In place; in place into a partial extent (which the write makes plain); or a new blob. */
  kind: 'in-place' | 'fills-partial' | 'new-blob';
  /** This head's blob a new one replaces, freed after the next commit. */
  replaced?: number;
}

interface DirtyNode {
  node: MapNode;
  /** Allocated since the last commit: no committed tree points at it, so it may be written under its own id. */
  fresh: boolean;
}

/**
 * A volume head's radix tree as it lives in memory between commits.
 *
 * Writes follow Parallax: a node or extent reached through an all-writable path is
 * this head's alone and is changed in place; anything reached through a read-only
 * pointer is shared with a snapshot or clone and is copied first, the copy holding
 * its children read-only. Changed nodes stay in memory (dirty) until `writeBack`,
 * which writes them as new blobs (shadow paging), so a commit replaces the whole
 * committed tree atomically by changing one root pointer in the catalog; blobs the
 * old tree used and the new one does not are freed only after that commit.
 *
 * The caller serializes every call (the volume's exclusive lock).
 */
export class MutableTree implements NodeSource {
  private readonly dirty = new Map<number, DirtyNode>();
  /** Data extents written since their last sync (added to on every write: see BlobIdSet). */
  private readonly unsyncedData = new BlobIdSet();
  /** Owned blobs no longer in the live tree: freed once a commit stops the committed tree using them. */
  readonly frees = new AfterCommit();
  private readonly extentClass: number;
  /** How a leaf keeps partial extents; undefined when an extent is one page (nothing to be partial). */
  private readonly layout: PartialLayout | undefined;

  constructor(
    public root: Entry,
    public depth: number,
    public sizeBytes: number,
    readonly extentSizeBytes: number,
    private readonly blobs: BlobStore,
    private readonly nodes: NodeCache,
    private readonly ids: BlobIdAllocator,
  ) {
    this.extentClass = classForBytes(extentSizeBytes);
    this.layout = partialLayout(extentSizeBytes);
  }

  get shape(): TreeShape {
    return { root: this.root, depth: this.depth, sizeBytes: this.sizeBytes, extentSizeBytes: this.extentSizeBytes };
  }

  cached(id: number): MapNode | undefined {
    return this.dirty.get(id)?.node ?? this.nodes.get(id);
  }

  load(id: number): Promise<MapNode> {
    return this.nodes.load(id);
  }

  private async node(id: number): Promise<MapNode> {
    return this.cached(id) ?? (await this.nodes.load(id));
  }

  /** Marks an owned node as changed: it stays pinned in memory until the next write-back. */
  private touch(id: number, node: MapNode): void {
    if (this.dirty.has(id)) return;
    this.dirty.set(id, { node, fresh: false });
    this.nodes.delete(id);
  }

  private async newNode(node: MapNode): Promise<number> {
    const id = await this.ids.allocate(classForBytes(node.length));
    this.dirty.set(id, { node, fresh: true });
    return id;
  }

  /** Writes `length` bytes of `source` at byte `offsetInExtent` of extent `extent`; returns the blob written. */
  async writeExtent(extent: number, offsetInExtent: number, source: Buffer, sourceOffset: number, length: number): Promise<number> {
    const { path, slot } = await this.writableLeaf(extent);
    const leaf = path[path.length - 1].node;
    const entry = getEntry(leaf, slot);
    if (this.changesInPlace(entry)) {
      const id = blobOf(entry);
      if (isPartial(entry)) {
        const base = blobOf(baseOf(leaf, slot));
        const stride = this.layout!.stride;
        await this.writePages(
          id,
          (page) => hasPage(leaf, slot, stride, page),
          () => base,
          offsetInExtent,
          source,
          sourceOffset,
          length,
        );
        this.touchPath(path);
        this.addWrittenPages(leaf, slot, offsetInExtent, length);
      } else {
        await this.blobs.write(id, offsetInExtent, source, sourceOffset, length);
      }
      this.unsyncedData.add(id);
      return id;
    }
    // A shared extent, a hole, or (where synced blobs are immutable) this head's own
    // extent already synced: the write goes to a new blob; an own one is freed after the commit.
    if (this.layout && hasBlob(entry) && length < this.extentSizeBytes && (isPartial(entry) || !isWritable(entry))) {
      return this.writeNewPatch(path, extent, slot, offsetInExtent, source, sourceOffset, length);
    }
    if (isWritable(entry) && hasBlob(entry)) this.frees.add(blobOf(entry));
    const id = await this.ids.allocate(this.extentClass);
    if (!hasBlob(entry) || length === this.extentSizeBytes) {
      // Over a hole the new blob is sparse: what is not written reads as zeros.
      await this.blobs.write(id, offsetInExtent, source, sourceOffset, length);
    } else {
      await this.copyExtentWith(blobOf(entry), id, offsetInExtent, source, sourceOffset, length);
    }
    this.touchPath(path);
    setPlain(leaf, slot, makeEntry(id, WRITABLE), this.layout);
    this.unsyncedData.add(id);
    return id;
  }

  /** Whether a write into the extent of `entry` goes into its blob as it is: this head's, and not sealed by a sync. */
  private changesInPlace(entry: Entry): boolean {
    return isWritable(entry) && hasBlob(entry) && (this.blobs.rewritable || this.unsyncedData.has(blobOf(entry)));
  }

  /**
   * Writes `count` whole extents from `first` out of `source` at `sourceOffset`. Each
   * goes where `writeExtent` would put it (into its blob in place, or into a new one),
   * but the extents whose blobs lie end to end in storage are written together, in one
   * call of the blob store: a volume written in order gets consecutive new blobs, so a
   * 1 MiB write of 64 KiB extents is one call, not sixteen (the store decides how to
   * cut it for the kernel). An extent's map entry changes only once its bytes are
   * written. Returns the blobs written.
   */
  async writeWholeExtents(first: number, count: number, source: Buffer, sourceOffset: number): Promise<number[]> {
    const size = this.extentSizeBytes;
    const places: WholeExtentWrite[] = [];
    for (let k = 0; k < count; k++) places.push(await this.placeWholeExtent(first + k));
    for (let start = 0; start < count;) {
      let end = start + 1;
      while (end < count && this.blobs.adjacent?.(places[end - 1].id, places[end].id)) end++;
      await this.blobs.write(places[start].id, 0, source, sourceOffset + start * size, (end - start) * size);
      for (let k = start; k < end; k++) this.mapWholeExtent(places[k]);
      start = end;
    }
    return places.map((place) => place.id);
  }

  /** Where a whole-extent write of `extent` goes; a path whose map entry will change is pinned (dirty) now. */
  private async placeWholeExtent(extent: number): Promise<WholeExtentWrite> {
    const { path, slot } = await this.writableLeaf(extent);
    const leaf = path[path.length - 1].node;
    const entry = getEntry(leaf, slot);
    if (this.changesInPlace(entry)) {
      // A partial extent written whole becomes a plain one.
      if (isPartial(entry)) this.touchPath(path);
      return { leaf, slot, id: blobOf(entry), kind: isPartial(entry) ? 'fills-partial' : 'in-place' };
    }
    this.touchPath(path);
    const replaced = isWritable(entry) && hasBlob(entry) ? blobOf(entry) : undefined;
    return { leaf, slot, id: await this.ids.allocate(this.extentClass), kind: 'new-blob', replaced };
  }

  /** The map after a whole-extent write has landed in its blob. */
  private mapWholeExtent(place: WholeExtentWrite): void {
    if (place.kind === 'new-blob') {
      if (place.replaced !== undefined) this.frees.add(place.replaced);
      setPlain(place.leaf, place.slot, makeEntry(place.id, WRITABLE), this.layout);
    } else if (place.kind === 'fills-partial') {
      this.addWrittenPages(place.leaf, place.slot, 0, this.extentSizeBytes);
    }
    this.unsyncedData.add(place.id);
  }

  /**
   * Copy-on-write at page granularity: a write smaller than the extent into a shared
   * one (or into a partial one this head may not change in place) goes to a new patch
   * holding only the pages written, and those an older patch of this extent held;
   * every other page keeps reading through the base. Costs the pages written, not
   * the extent.
   */
  private async writeNewPatch(
    path: PathStep[],
    extent: number,
    slot: number,
    at: number,
    source: Buffer,
    sourceOffset: number,
    length: number,
  ): Promise<number> {
    const layout = this.layout!;
    const leaf = await this.wideLeaf(path, extent);
    const entry = getEntry(leaf, slot);
    const old = isPartial(entry) ? { patch: blobOf(entry), pages: Buffer.from(pagesOf(leaf, slot, layout.stride)) } : undefined;
    const base = old ? baseOf(leaf, slot) : asShared(entry);
    if (old && isWritable(entry)) this.frees.add(old.patch);
    const id = await this.ids.allocate(this.extentClass);
    const first = Math.floor(at / pageBytes);
    const last = Math.floor((at + length - 1) / pageBytes);
    const inOld = (page: number): boolean => old !== undefined && bitmapHasPage(old.pages, page);
    if (old) {
      // The older patch's pages this write does not reach move to the new one.
      for (let page = 0; page < layout.pages; page++) {
        if (page >= first && page <= last) continue;
        if (inOld(page)) await this.copyPage(old.patch, id, page);
      }
    }
    await this.writePages(
      id,
      () => false,
      (page) => (inOld(page) ? old!.patch : blobOf(base)),
      at,
      source,
      sourceOffset,
      length,
    );
    this.touchPath(path);
    setPartial(leaf, slot, layout, makeEntry(id, WRITABLE | PARTIAL), base);
    if (old) setPages(leaf, slot, layout.stride, old.pages);
    this.addWrittenPages(leaf, slot, at, length);
    this.unsyncedData.add(id);
    return id;
  }

  /** The pages a write covered are in the patch now; once all are, the extent is a plain one and lets its base go. */
  private addWrittenPages(leaf: MapNode, slot: number, at: number, length: number): void {
    const layout = this.layout!;
    addPages(leaf, slot, layout.stride, Math.floor(at / pageBytes), Math.floor((at + length - 1) / pageBytes));
    if (allPages(leaf, slot, layout)) setPlain(leaf, slot, makeEntry(blobOf(getEntry(leaf, slot)), WRITABLE), layout);
  }

  /**
   * Writes `[at, at + length)` into blob `to`, whole pages: a page the write covers
   * only in part, and that `to` does not hold yet, is first filled from blob `from(page)`.
   */
  private async writePages(
    to: number,
    holds: (page: number) => boolean,
    from: (page: number) => number,
    at: number,
    source: Buffer,
    sourceOffset: number,
    length: number,
  ): Promise<void> {
    const end = at + length;
    const first = Math.floor(at / pageBytes);
    const last = Math.floor((end - 1) / pageBytes);
    const fillFirst = at % pageBytes !== 0 && !holds(first);
    const fillLast = end % pageBytes !== 0 && !holds(last);
    if (!fillFirst && !fillLast) {
      await this.blobs.write(to, at, source, sourceOffset, length);
      return;
    }
    const spanStart = fillFirst ? first * pageBytes : at;
    const spanEnd = fillLast ? (last + 1) * pageBytes : end;
    const span = Buffer.allocUnsafe(spanEnd - spanStart);
    if (fillFirst) await this.blobs.read(from(first), first * pageBytes, span, 0, pageBytes);
    if (fillLast && !(fillFirst && last === first)) await this.blobs.read(from(last), last * pageBytes, span, last * pageBytes - spanStart, pageBytes);
    source.copy(span, at - spanStart, sourceOffset, sourceOffset + length);
    await this.blobs.write(to, spanStart, span, 0, span.length);
  }

  private async copyPage(from: number, to: number, page: number): Promise<void> {
    const buffer = sharedPool.take(pageBytes);
    try {
      await this.blobs.read(from, page * pageBytes, buffer, 0, pageBytes);
      await this.blobs.write(to, page * pageBytes, buffer, 0, pageBytes);
    } finally {
      sharedPool.give(buffer);
    }
  }

  /**
   * The leaf at the end of a writable path, made wide (able to hold partial extents)
   * if it was not: the wide copy is a new node, so the parent points at it and the
   * plain one leaves the tree.
   */
  private async wideLeaf(path: PathStep[], extent: number): Promise<MapNode> {
    const step = path[path.length - 1];
    if (isWideLeaf(step.node)) return step.node;
    const wide = widen(step.node, this.layout!);
    const id = await this.ids.allocate(classForBytes(wide.length));
    this.dirty.set(id, { node: wide, fresh: true });
    this.dirty.delete(step.id);
    this.nodes.delete(step.id);
    // Freed even when fresh and never written: after a restart every id below the
    // committed marks counts as present (store/blobs/files.ts) until it is freed.
    this.frees.add(step.id);
    if (path.length === 1) {
      this.root = makeEntry(id, WRITABLE);
    } else {
      const parents = path.slice(0, -1);
      this.touchPath(parents);
      setEntry(parents[parents.length - 1].node, slotAt(extent, 1), makeEntry(id, WRITABLE));
    }
    path[path.length - 1] = { id, node: wide };
    return wide;
  }

  /**
   * The write of `writeExtent` done synchronously, where it needs nothing loaded,
   * reserved or read: the map path is in memory and owned all the way (no node to
   * copy), and the blob store writes at once. That is a write in place into an
   * extent this head may change (into a partial one, whole pages or pages its patch
   * holds), or the first write of whole pages into a shared extent under a wide leaf,
   * to a new patch from an id already reserved. Returns the blob written, or
   * undefined, having changed nothing, when the write must take the async path.
   */
  writeNow(extent: number, offsetInExtent: number, source: Buffer, sourceOffset: number, length: number): number | undefined {
    const writeNow = this.blobs.writeNow;
    if (!writeNow) return undefined;
    let entry = this.root;
    let leaf: MapNode | undefined;
    for (let level = this.depth - 1; level >= 0; level--) {
      if (!isWritable(entry) || !hasBlob(entry)) return undefined;
      leaf = this.cached(blobOf(entry));
      if (!leaf) return undefined;
      entry = getEntry(leaf, slotAt(extent, level));
    }
    if (!hasBlob(entry)) return undefined;
    const slot = slotAt(extent, 0);
    const end = offsetInExtent + length;
    const first = Math.floor(offsetInExtent / pageBytes);
    const last = Math.floor((end - 1) / pageBytes);
    const aligned = offsetInExtent % pageBytes === 0 && end % pageBytes === 0;
    if (!isWritable(entry)) {
      // A first write into a shared extent: a new patch over it.
      if (!this.layout || !aligned || length === this.extentSizeBytes || isPartial(entry) || isZero(entry) || !isWideLeaf(leaf!)) return undefined;
      const id = this.ids.allocateNow(this.extentClass);
      if (id === undefined) return undefined;
      writeNow.call(this.blobs, id, offsetInExtent, source, sourceOffset, length);
      this.touchPath(this.pathTo(extent));
      setPartial(leaf!, slot, this.layout, makeEntry(id, WRITABLE | PARTIAL), entry);
      this.addWrittenPages(leaf!, slot, offsetInExtent, length);
      this.unsyncedData.add(id);
      return id;
    }
    const id = blobOf(entry);
    if (!this.blobs.rewritable && !this.unsyncedData.has(id)) return undefined;
    if (isPartial(entry)) {
      const stride = this.layout!.stride;
      if ((offsetInExtent % pageBytes !== 0 && !hasPage(leaf!, slot, stride, first)) || (end % pageBytes !== 0 && !hasPage(leaf!, slot, stride, last))) {
        return undefined;
      }
      writeNow.call(this.blobs, id, offsetInExtent, source, sourceOffset, length);
      if (!hasPages(leaf!, slot, stride, first, last)) {
        this.touchPath(this.pathTo(extent));
        this.addWrittenPages(leaf!, slot, offsetInExtent, length);
      }
    } else {
      writeNow.call(this.blobs, id, offsetInExtent, source, sourceOffset, length);
    }
    this.unsyncedData.add(id);
    return id;
  }

  /** The nodes from the root to the leaf of `extent`, every one in memory (the caller walked it). */
  private pathTo(extent: number): PathStep[] {
    const path: PathStep[] = [];
    let entry = this.root;
    for (let level = this.depth - 1; level >= 0; level--) {
      const id = blobOf(entry);
      const node = this.cached(id)!;
      path.push({ id, node });
      entry = getEntry(node, slotAt(extent, level));
    }
    return path;
  }

  /** Copy-on-write of a shared extent: the old bytes with the new ones laid over, keeping zero pages sparse. */
  private async copyExtentWith(fromId: number, toId: number, at: number, source: Buffer, sourceOffset: number, length: number): Promise<void> {
    const size = this.extentSizeBytes;
    const buffer = sharedPool.take(size);
    try {
      await this.blobs.read(fromId, 0, buffer, 0, size);
      source.copy(buffer, at, sourceOffset, sourceOffset + length);
      let run = -1;
      for (let page = 0; page <= size; page += 4096) {
        const keep = page < size && ((page + 4096 > at && page < at + length) || !isZeroPage(buffer, page));
        if (keep && run < 0) run = page;
        if (!keep && run >= 0) {
          await this.blobs.write(toId, run, buffer, run, page - run);
          run = -1;
        }
      }
    } finally {
      sharedPool.give(buffer);
    }
  }

  /**
   * The path from the root to the leaf that maps `extent`, after making every node
   * on it writable: shared nodes are copied, missing ones created.
   */
  private async writableLeaf(extent: number): Promise<{ path: PathStep[]; slot: number }> {
    const path = [await this.writableRoot()];
    for (let level = this.depth - 1; level > 0; level--) path.push(await this.writableChild(path, slotAt(extent, level)));
    return { path, slot: slotAt(extent, 0) };
  }

  private async writableRoot(): Promise<PathStep> {
    if (!isWritable(this.root) || !hasBlob(this.root)) {
      const copy = hasBlob(this.root) ? sharedCopy(await this.node(blobOf(this.root))) : emptyNode();
      this.root = makeEntry(await this.newNode(copy), WRITABLE);
    }
    const id = blobOf(this.root);
    return { id, node: await this.node(id) };
  }

  private async writableChild(path: PathStep[], slot: number): Promise<PathStep> {
    const parent = path[path.length - 1];
    const entry = getEntry(parent.node, slot);
    if (isWritable(entry) && hasBlob(entry)) {
      const id = blobOf(entry);
      return { id, node: await this.node(id) };
    }
    const node = hasBlob(entry) ? sharedCopy(await this.node(blobOf(entry))) : emptyNode();
    const id = await this.newNode(node);
    this.touchPath(path);
    setEntry(parent.node, slot, makeEntry(id, WRITABLE));
    return { id, node };
  }

  /**
   * A changed node gets a new id when written back, which changes its parent: so
   * changing a node dirties its whole path up to the root.
   */
  private touchPath(path: PathStep[]): void {
    for (const step of path) this.touch(step.id, step.node);
  }

  /**
   * Replaces whole extents first..last by holes (`EMPTY`) or allocated zeros
   * (`zeroEntry`). A range that covers whole subtrees drops them at the highest level
   * it can, so discarding a huge volume costs what was written, not what is addressable.
   */
  async replaceExtents(first: number, last: number, replacement: typeof EMPTY | typeof zeroEntry): Promise<void> {
    const extentCount = Math.ceil(this.sizeBytes / this.extentSizeBytes);
    if (replacement === EMPTY) {
      if (!hasBlob(this.root)) return;
      if (first === 0 && last >= extentCount - 1) {
        const old = this.root;
        this.root = EMPTY;
        await this.drop(old, this.depth - 1);
        return;
      }
    }
    await this.replaceUnder([await this.writableRoot()], this.depth - 1, 0, first, last, replacement);
  }

  private async replaceUnder(path: PathStep[], level: number, base: number, first: number, last: number, replacement: Entry): Promise<void> {
    const node = path[path.length - 1].node;
    const { span, firstSlot, lastSlot } = slotsOverlapping(level, base, first, last);
    for (let slot = firstSlot; slot <= lastSlot; slot++) {
      const entry = getEntry(node, slot);
      const slotBase = base + slot * span;
      const slotLast = slotBase + span - 1;
      if (replacement === EMPTY && entry === EMPTY) continue;
      if (level === 0 || (replacement === EMPTY && first <= slotBase && slotLast <= last)) {
        if (entry === replacement) continue;
        this.touchPath(path);
        if (level === 0) setPlain(node, slot, replacement, this.layout);
        else setEntry(node, slot, replacement);
        await this.drop(entry, level - 1);
      } else {
        const child = await this.writableChild(path, slot);
        await this.replaceUnder([...path, child], level - 1, slotBase, Math.max(first, slotBase), Math.min(last, slotLast), replacement);
      }
    }
  }

  /**
   * An entry left the live tree. What it reached through writable pointers is this
   * head's alone, so it is freed after the next commit; shared blobs are left to
   * their other owners and the collector. `level` is the node level of what the
   * entry points at (-1: a data extent).
   */
  private async drop(entry: Entry, level: number): Promise<void> {
    if (!hasBlob(entry) || !isWritable(entry)) return;
    const id = blobOf(entry);
    this.frees.add(id);
    this.unsyncedData.delete(id);
    if (level < 0) return;
    const node = await this.node(id);
    this.dirty.delete(id);
    this.nodes.delete(id);
    for (let slot = 0; slot < entriesPerNode; slot++) await this.drop(getEntry(node, slot), level - 1);
  }

  /** Every blob this tree owns (reached through writable pointers only). */
  async ownedBlobs(): Promise<number[]> {
    const out: number[] = [];
    const visit = async (entry: Entry, level: number): Promise<void> => {
      if (!hasBlob(entry) || !isWritable(entry)) return;
      out.push(blobOf(entry));
      if (level < 0) return;
      const node = await this.node(blobOf(entry));
      for (let slot = 0; slot < entriesPerNode; slot++) await visit(getEntry(node, slot), level - 1);
    };
    await visit(this.root, this.depth - 1);
    return out;
  }

  /** Adds levels above the root until the tree maps `extentCount` extents: O(1) per level. */
  async growTo(sizeBytes: number): Promise<void> {
    const extentCount = Math.ceil(sizeBytes / this.extentSizeBytes);
    while (capacityExtents(this.depth) < extentCount) {
      if (hasBlob(this.root)) {
        const top = emptyNode();
        setEntry(top, 0, this.root);
        this.root = makeEntry(await this.newNode(top), WRITABLE);
      }
      this.depth++;
    }
    this.sizeBytes = sizeBytes;
  }

  /** Map nodes changed since the last write-back (pinned in memory until then). */
  get dirtyNodeCount(): number {
    return this.dirty.size;
  }

  /** Whether a commit is needed: nodes changed, blobs wait to be freed, or the root differs from the committed one. */
  needsCommit(committedRoot: Entry): boolean {
    return this.dirty.size > 0 || this.frees.pending || this.root !== committedRoot;
  }

  /** Extents written since the last capture (their data not yet synced): what a commit would make durable. */
  get unsyncedExtentCount(): number {
    return this.unsyncedData.size;
  }

  get hasUnsyncedData(): boolean {
    return this.unsyncedData.size > 0;
  }

  /** These extents were synced (a FUA write that changed only data in place). */
  markSynced(ids: number[]): void {
    for (const id of ids) this.unsyncedData.delete(id);
  }

  /**
   * Writes the dirty nodes back and takes what a commit of this tree needs: its
   * shape, the blobs to make durable first, the blobs to free once it committed.
   */
  async capture(): Promise<{ shape: { root: Entry; depth: number; sizeBytes: number }; sync: number[]; free: number[] }> {
    const written = await this.writeBack();
    const sync = [...this.unsyncedData, ...written];
    this.unsyncedData.clear();
    return { shape: { root: this.root, depth: this.depth, sizeBytes: this.sizeBytes }, sync, free: this.frees.takeForCapture() };
  }

  /**
   * Forgets every change not committed (the head was deleted or lost): returns the
   * blobs it was holding back from the free list, which are the caller's to free or not.
   */
  discardChanges(): number[] {
    this.dirty.clear();
    this.unsyncedData.clear();
    return this.frees.forget();
  }

  /** After a snapshot or clone commits, everything the head reaches is shared. */
  shareRoot(): void {
    assert(this.dirty.size === 0, 'a tree is shared only when it has no dirty nodes');
    this.root = asShared(this.root);
  }

  /**
   * Writes every dirty node, children before parents, each under a new id unless it
   * is fresh, so that the committed tree is never changed in place. Returns the ids
   * written; the new root is in `root`.
   */
  private async writeBack(): Promise<number[]> {
    const written: number[] = [];
    if (this.dirty.size > 0) this.root = await this.writeNode(this.root, this.depth - 1, written);
    assert(this.dirty.size === 0, `every dirty node is reachable from the root (${this.dirty.size} left)`);
    return written;
  }

  private async writeNode(entry: Entry, level: number, written: number[]): Promise<Entry> {
    if (!isWritable(entry) || !hasBlob(entry)) return entry;
    const id = blobOf(entry);
    const dirty = this.dirty.get(id);
    if (!dirty) return entry;
    if (level > 0) {
      for (let slot = 0; slot < entriesPerNode; slot++) {
        const child = getEntry(dirty.node, slot);
        if (isWritable(child) && hasBlob(child) && this.dirty.has(blobOf(child))) {
          const moved = await this.writeNode(child, level - 1, written);
          if (moved !== child) setEntry(dirty.node, slot, moved);
        }
      }
    }
    const newId = dirty.fresh ? id : await this.ids.allocate(classForBytes(dirty.node.length));
    await this.blobs.write(newId, 0, dirty.node, 0, dirty.node.length);
    // Only once written: a write that fails (a full disk) leaves the node dirty under its old
    // id, for the next capture to write again, and the old id waiting for no second free.
    if (newId !== id) this.frees.add(id);
    written.push(newId);
    this.dirty.delete(id);
    this.nodes.set(newId, dirty.node);
    return makeEntry(newId, WRITABLE);
  }
}

const zeroPage = Buffer.alloc(4096);

function isZeroPage(buffer: Buffer, at: number): boolean {
  return buffer.compare(zeroPage, 0, 4096, at, at + 4096) === 0;
}
