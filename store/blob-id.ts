import { assert } from './errors';
import { maxExtentSizeBytes, nodeSizeBytes } from './limits';

/**
 * A blob id names a size class and a serial number within it:
 *
 *   id = class × 2^41 + serial
 *
 * Class c holds blobs of up to 4096 << c bytes: class 0 is map nodes (and 4 KiB
 * extents), class 4 is 64 KiB extents, class 10 is 4 MiB extents. Each class counts
 * its own serials, so consecutive blobs of one size are consecutive on disk, and a
 * backend can give every blob a slot of exactly its size. 11 classes × 2^41 serials
 * stay below 2^45, the largest id a map entry holds.
 */
export const serialBits = 41;
const serialSpace = 2 ** serialBits;
export const sizeClassCount = Math.log2(maxExtentSizeBytes / nodeSizeBytes) + 1;
export const maxSerial = serialSpace - 1;

/** The map-node size class. */
export const nodeClass = 0;

export function classForBytes(bytes: number): number {
  const c = Math.log2(bytes / nodeSizeBytes);
  assert(Number.isInteger(c) && c >= 0 && c < sizeClassCount, `a blob size class for ${bytes} bytes`);
  return c;
}

export function bytesOfClass(sizeClass: number): number {
  return nodeSizeBytes << sizeClass;
}

export function blobId(sizeClass: number, serial: number): number {
  return sizeClass * serialSpace + serial;
}

export function classOf(id: number): number {
  return Math.floor(id / serialSpace);
}

export function serialOf(id: number): number {
  return id % serialSpace;
}
