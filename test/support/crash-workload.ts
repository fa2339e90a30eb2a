/**
 * The crash test's workload, shared by the parent (which plans it and checks the
 * outcome) and the child (which runs it until it is killed). Every 512-byte sector
 * written carries a stamp naming the operation that wrote it, so after a crash the
 * parent can tell which write each sector holds.
 */
export const sectorBytes = 512;

export type CrashOp =
  | { t: 'write'; k: number; v: string; offset: number; length: number; fua: boolean }
  | { t: 'zero'; k: number; v: string; offset: number; length: number; hole: boolean }
  | { t: 'flush'; k: number; v: string }
  | { t: 'snap'; k: number; v: string; s: string }
  | { t: 'clone'; k: number; s: string; v: string }
  | { t: 'delsnap'; k: number; s: string }
  | { t: 'delvol'; k: number; v: string }
  | { t: 'gc'; k: number };

const magic = 0x41524252; // "ARBR"
const zeroSector = Buffer.alloc(sectorBytes);

/** The 512 bytes op `k` writes into sector `sector`: a header, then bytes derived from both. */
export function stampSector(k: number, sector: number, target: Buffer, at: number): void {
  target.writeUInt32LE(magic, at);
  target.writeUInt32LE(k, at + 4);
  target.writeUInt32LE(sector, at + 8);
  let x = (k * 2654435761 + sector * 40503 + 1) >>> 0;
  for (let i = 12; i < sectorBytes; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    target.writeUInt32LE(x, at + i);
  }
}

export function stampedData(k: number, offset: number, length: number): Buffer {
  const data = Buffer.allocUnsafe(length);
  for (let at = 0; at < length; at += sectorBytes) stampSector(k, (offset + at) / sectorBytes, data, at);
  return data;
}

/** What a read sector holds: -1 zeros, the op that stamped it, or undefined when it is neither (corrupt). */
export function decodeSector(buffer: Buffer, at: number, sector: number): number | undefined {
  if (buffer.readUInt32LE(at) === 0 && buffer.compare(zeroSector, 0, sectorBytes, at, at + sectorBytes) === 0) return -1;
  if (buffer.readUInt32LE(at) !== magic || buffer.readUInt32LE(at + 8) !== sector) return undefined;
  const k = buffer.readUInt32LE(at + 4);
  const expected = Buffer.allocUnsafe(sectorBytes);
  stampSector(k, sector, expected, 0);
  return expected.equals(buffer.subarray(at, at + sectorBytes)) ? k : undefined;
}
