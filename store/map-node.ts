import { ArborError } from './errors';
import { Entry, asShared, entryProblem, isPartial } from './entry';
import { entriesPerNode, nodeSizeBytes } from './limits';
import { isWideLeaf, wideLeafProblem } from './partial';

/**
 * A radix-tree map node: exactly 512 little-endian 64-bit entries, 4 KiB, no header,
 * so that a node is one page on disk and one object in a blob store. A leaf holding
 * partial extents is wider: the same 4 KiB of entries, then what they need beside
 * them (store/partial.ts).
 */
export type MapNode = Buffer;

const twoTo32 = 2 ** 32;

export function emptyNode(): MapNode {
  return Buffer.alloc(nodeSizeBytes);
}

export function getEntry(node: MapNode, slot: number): Entry {
  const at = slot * 8;
  return node.readUInt32LE(at) + node.readUInt32LE(at + 4) * twoTo32;
}

export function setEntry(node: MapNode, slot: number, entry: Entry): void {
  const at = slot * 8;
  node.writeUInt32LE(entry % twoTo32, at);
  node.writeUInt32LE(Math.floor(entry / twoTo32), at + 4);
}

/**
 * The copy made when a shared node is written through: every child it points to is
 * now reachable from two trees, so the copy holds them read-only (Parallax's rule).
 */
export function sharedCopy(node: MapNode): MapNode {
  const copy = Buffer.allocUnsafe(node.length);
  // A wide leaf's bases are shared already; its bitmaps go with their entries.
  if (isWideLeaf(node)) node.copy(copy, nodeSizeBytes, nodeSizeBytes);
  for (let slot = 0; slot < entriesPerNode; slot++) setEntry(copy, slot, asShared(getEntry(node, slot)));
  return copy;
}

export function isEmptyNode(node: MapNode): boolean {
  for (let at = 0; at < node.length; at += 4) if (node.readUInt32LE(at) !== 0) return false;
  return true;
}

/**
 * Refuses a node read from the blob store that no code of ours could have written:
 * an entry with unknown flags or past the id range, or a ZERO entry that is not the
 * plain one (whether it sits in a leaf, the only place it may, the tree walk checks).
 * Damage shows here, naming the blob, not as a wrong read far away.
 */
export function checkNode(node: MapNode, blobId: number): void {
  const wide = isWideLeaf(node);
  for (let slot = 0; slot < entriesPerNode; slot++) {
    const entry = getEntry(node, slot);
    const problem = entryProblem(entry, true) ?? (!wide && isPartial(entry) ? `entry ${entry} is PARTIAL in a node that is not a wide leaf` : undefined);
    if (problem) {
      throw new ArborError('internal', `map node ${blobId} is damaged: slot ${slot}: ${problem}; the blob store is damaged: restore it from a backup`);
    }
  }
  const wideProblem = wide ? wideLeafProblem(node) : undefined;
  if (wideProblem) throw new ArborError('internal', `map node ${blobId} is damaged: ${wideProblem}; the blob store is damaged: restore it from a backup`);
}
