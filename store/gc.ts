import { StoreContext } from './context';
import { EMPTY, Entry, blobOf, hasBlob } from './entry';
import { assert } from './errors';
import { checkNode, getEntry } from './map-node';
import { entriesPerNode } from './limits';
import { baseOf, nodeBytesOf } from './partial';

export interface GcRoot {
  root: Entry;
  depth: number;
}

export interface GcReport {
  /** Blobs present when the sweep listed them. */
  scannedBlobs: number;
  /** Blobs reachable from some volume or snapshot. */
  reachableBlobs: number;
  freedBlobs: number;
  /** Blobs present but allocated during the pass, left alone. */
  newerBlobs: number;
  /** Storage that held only freed blobs, deleted after the sweep (S3 packs). */
  unusedDeleted: number;
  durationMs: number;
}

const deleteBatch = 1024;

/**
 * Mark and sweep. `roots` must be a consistent cut of the store, taken when
 * `allocatedAfter` was read from the allocator, while blob frees are held back
 * until the pass ends: then every node the mark reads is the one the cut refers to,
 * and every blob reachable later is either reachable in the cut (marked) or
 * allocated after it (never swept).
 */
export async function markAndSweep(
  ctx: StoreContext,
  roots: GcRoot[],
  allocatedAfter: (id: number) => boolean,
  /** Ids no committed tree can reach (handed out after the cut): marking one means the cut or the allocator is broken. */
  aboveWatermark: (id: number) => boolean = allocatedAfter,
): Promise<GcReport> {
  const started = Date.now();
  const marked = new Set<number>();
  const stack: Array<{ entry: Entry; level: number }> = roots.map((r) => ({ entry: r.root, level: r.depth - 1 }));
  while (stack.length > 0) {
    const { entry, level } = stack.pop()!;
    if (!hasBlob(entry)) continue;
    const id = blobOf(entry);
    if (marked.has(id)) continue;
    assert(!aboveWatermark(id), `the collector's cut reaches blob ${id}, which was handed out after it`);
    marked.add(id);
    if (level < 0) continue;
    let node = ctx.nodes.get(id);
    if (!node) {
      node = Buffer.allocUnsafe(nodeBytesOf(id));
      await ctx.blobs.read(id, 0, node, 0, node.length);
      checkNode(node, id);
    }
    for (let slot = 0; slot < entriesPerNode; slot++) {
      const child = getEntry(node, slot);
      if (hasBlob(child) && !marked.has(blobOf(child))) stack.push({ entry: child, level: level - 1 });
      // A partial extent reads through its base: the base is reachable too.
      const base = level === 0 ? baseOf(node, slot) : EMPTY;
      if (hasBlob(base) && !marked.has(blobOf(base))) stack.push({ entry: base, level: -1 });
    }
  }
  const present = await ctx.blobs.list();
  const newer = present.filter((id) => allocatedAfter(id));
  const garbage = present.filter((id) => !allocatedAfter(id) && !marked.has(id));
  for (let at = 0; at < garbage.length; at += deleteBatch) await ctx.blobs.delete(garbage.slice(at, at + deleteBatch));
  const unusedDeleted = (await ctx.blobs.collectUnused?.()) ?? 0;
  return {
    scannedBlobs: present.length,
    reachableBlobs: marked.size,
    freedBlobs: garbage.length,
    newerBlobs: newer.length,
    unusedDeleted,
    durationMs: Date.now() - started,
  };
}
