/**
 * Sizes and durations as people type them. Binary units (K, M, G, T, P and KiB,
 * MiB, ...) are powers of 1024, as in qemu-img and rbd; KB, MB, GB, TB, PB are
 * powers of 1000. A bare number is bytes.
 */
const sizeUnits: Record<string, number> = {
  '': 1,
  b: 1,
  k: 1024,
  kib: 1024,
  m: 1024 ** 2,
  mib: 1024 ** 2,
  g: 1024 ** 3,
  gib: 1024 ** 3,
  t: 1024 ** 4,
  tib: 1024 ** 4,
  p: 1024 ** 5,
  pib: 1024 ** 5,
  kb: 1000,
  mb: 1000 ** 2,
  gb: 1000 ** 3,
  tb: 1000 ** 4,
  pb: 1000 ** 5,
};

export class UnitError extends Error {}

export function parseSize(text: string, what = 'size'): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$/.exec(text);
  const unit = match ? sizeUnits[match[2].toLowerCase()] : undefined;
  if (!match || unit === undefined) {
    throw new UnitError(`${what} ${JSON.stringify(text)} is not a size: write e.g. 512MiB, 10GiB, 1T or a number of bytes`);
  }
  const bytes = Number(match[1]) * unit;
  if (!Number.isSafeInteger(bytes)) throw new UnitError(`${what} ${JSON.stringify(text)} is not a whole number of bytes or is too large`);
  return bytes;
}

const binaryNames = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

/** 1536 -> "1.5 KiB"; whole values print without decimals. */
export function formatSize(bytes: number): string {
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < binaryNames.length - 1) {
    value /= 1024;
    unit++;
  }
  const text = Number.isInteger(value) ? String(value) : value.toFixed(value < 10 ? 2 : 1);
  return `${text} ${binaryNames[unit]}`;
}

const durationUnits: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/** "500ms", "30s", "10m", "1h" -> milliseconds. */
export function parseDuration(text: string, what = 'duration'): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$/.exec(text);
  if (!match) throw new UnitError(`${what} ${JSON.stringify(text)} is not a duration: write e.g. 500ms, 30s, 10m or 1h`);
  return Math.round(Number(match[1]) * durationUnits[match[2]]);
}

export function formatRate(bytes: number, ms: number): string {
  return `${formatSize(Math.round((bytes * 1000) / Math.max(ms, 1)))}/s`;
}
