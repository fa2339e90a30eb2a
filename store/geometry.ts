import { ArborError } from './errors';
import { entriesPerNode, maxExtentSizeBytes, maxVolumeSizeBytes, minExtentSizeBytes, sectorSizeBytes } from './limits';

/** How many extents one slot of a node at `level` covers (level 0 = leaves). */
export function extentsPerSlot(level: number): number {
  return entriesPerNode ** level;
}

/** How many extents a tree of `depth` levels can map. */
export function capacityExtents(depth: number): number {
  return entriesPerNode ** depth;
}

/** The smallest depth (at least 1) whose tree maps `extentCount` extents. */
export function depthFor(extentCount: number): number {
  let depth = 1;
  while (capacityExtents(depth) < extentCount) depth++;
  return depth;
}

export function extentCountFor(sizeBytes: number, extentSizeBytes: number): number {
  return Math.ceil(sizeBytes / extentSizeBytes);
}

export function slotAt(extentIndex: number, level: number): number {
  return Math.floor(extentIndex / extentsPerSlot(level)) % entriesPerNode;
}

/** The slots of a level-`level` node covering extents `base`.. that overlap first..last. */
export function slotsOverlapping(level: number, base: number, first: number, last: number): { span: number; firstSlot: number; lastSlot: number } {
  const span = extentsPerSlot(level);
  return {
    span,
    firstSlot: Math.max(0, Math.floor((first - base) / span)),
    lastSlot: Math.min(entriesPerNode - 1, Math.floor((last - base) / span)),
  };
}

export function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

export function validateExtentSize(extentSizeBytes: number, what: string): void {
  if (!isPowerOfTwo(extentSizeBytes) || extentSizeBytes < minExtentSizeBytes || extentSizeBytes > maxExtentSizeBytes) {
    throw new ArborError('invalid-argument', `${what}: extent size ${extentSizeBytes} is not a power of two from 4 KiB to 4 MiB; pick e.g. 64KiB`);
  }
}

export function validateVolumeSize(sizeBytes: number, what: string): void {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) {
    throw new ArborError('invalid-argument', `${what}: size must be a positive whole number of bytes, got ${sizeBytes}`);
  }
  if (sizeBytes % sectorSizeBytes !== 0) {
    throw new ArborError('invalid-argument', `${what}: size ${sizeBytes} is not a multiple of ${sectorSizeBytes} bytes; round it up`);
  }
  if (sizeBytes > maxVolumeSizeBytes) {
    throw new ArborError('out-of-range', `${what}: size ${sizeBytes} is larger than the maximum of ${maxVolumeSizeBytes} bytes (1 PiB)`);
  }
}
