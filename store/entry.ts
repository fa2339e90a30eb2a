/**
 * A map entry is 64 bits: a blob id and 8 flag bits. It is kept in a JavaScript
 * number (id * 256 + flags), exact for ids below 2^45, so the hot path needs no BigInt.
 *
 *   0                  never written: reads as zeros, costs nothing
 *   id | WRITABLE      owned by this tree alone: may be changed in place and freed
 *   id                 shared (reached through a snapshot or clone): never changed
 *   ZERO               allocated but known to read as zeros (write-zeroes without a hole)
 *   id | PARTIAL       (leaves only) a patch holding some pages; the rest read through a
 *                      shared base kept beside it in a wide leaf (store/partial.ts); may
 *                      also be WRITABLE
 */
import { assert } from './errors';

export type Entry = number;

export const EMPTY: Entry = 0;
export const WRITABLE = 1;
export const ZERO = 2;
export const PARTIAL = 4;

const flagSpace = 256;
const knownFlags = WRITABLE | ZERO | PARTIAL;
export const maxBlobId = 2 ** 45 - 1;

export function makeEntry(blobId: number, flags: number): Entry {
  assert(Number.isSafeInteger(blobId) && blobId >= 0 && blobId <= maxBlobId, `blob id ${blobId} is within 0..2^45-1`);
  assert((flags & ~knownFlags) === 0, `entry flags 0x${flags.toString(16)} are WRITABLE, ZERO and PARTIAL only`);
  return blobId * flagSpace + flags;
}

export function blobOf(entry: Entry): number {
  return Math.floor(entry / flagSpace);
}

function flagsOf(entry: Entry): number {
  return entry % flagSpace;
}

export function isWritable(entry: Entry): boolean {
  return (flagsOf(entry) & WRITABLE) !== 0;
}

export function isZero(entry: Entry): boolean {
  return (flagsOf(entry) & ZERO) !== 0;
}

export function isPartial(entry: Entry): boolean {
  return (flagsOf(entry) & PARTIAL) !== 0;
}

/** True when the entry points at a blob (a node or a data extent). */
export function hasBlob(entry: Entry): boolean {
  return blobOf(entry) !== 0;
}

/** The same pointer without its writable bit: what a copy of a shared node holds. */
export function asShared(entry: Entry): Entry {
  return isWritable(entry) ? entry - WRITABLE : entry;
}

export const zeroEntry: Entry = makeEntry(0, ZERO);

/**
 * What is wrong with an entry read from storage (a map node, a catalog root), or
 * undefined when nothing is. Any entry points at a node or an extent, is a hole, or
 * (in a leaf only: `leaf`) is ZERO with no blob and no other flag. PARTIAL above the
 * leaves is caught by the tree walk, which knows the level.
 */
export function entryProblem(entry: Entry, leaf: boolean): string | undefined {
  if (!Number.isSafeInteger(entry) || entry < 0) return `${entry} is not an entry (a blob id below 2^45 and 8 flag bits)`;
  const flags = flagsOf(entry);
  if ((flags & ~knownFlags) !== 0) return `entry ${entry} has unknown flags 0x${flags.toString(16)}`;
  if (isZero(entry) && (!leaf || entry !== zeroEntry))
    return leaf ? `entry ${entry} is ZERO with a blob or another flag` : `entry ${entry} is ZERO above the leaves`;
  if (isPartial(entry) && (!leaf || !hasBlob(entry)))
    return leaf ? `entry ${entry} is PARTIAL without a patch blob` : `entry ${entry} is PARTIAL above the leaves`;
  return undefined;
}
