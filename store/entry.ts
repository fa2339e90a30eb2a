/**
 * A map entry is 64 bits: a blob id and 8 flag bits. It is kept in a JavaScript
 * number (id * 256 + flags), exact for ids below 2^45, so the hot path needs no BigInt.
 *
 *   0                  never written: reads as zeros, costs nothing
 *   id | WRITABLE      owned by this tree alone: may be changed in place and freed
 *   id                 shared (reached through a snapshot or clone): never changed
 *   ZERO               allocated but known to read as zeros (write-zeroes without a hole)
 */
export type Entry = number;

export const EMPTY: Entry = 0;
export const WRITABLE = 1;
export const ZERO = 2;

const flagSpace = 256;
export const maxBlobId = 2 ** 45 - 1;

export function makeEntry(blobId: number, flags: number): Entry {
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

/** True when the entry points at a blob (a node or a data extent). */
export function hasBlob(entry: Entry): boolean {
  return blobOf(entry) !== 0;
}

/** The same pointer without its writable bit: what a copy of a shared node holds. */
export function asShared(entry: Entry): Entry {
  return isWritable(entry) ? entry - WRITABLE : entry;
}

export const zeroEntry: Entry = makeEntry(0, ZERO);
