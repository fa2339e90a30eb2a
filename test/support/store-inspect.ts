import { Entry, blobOf, hasBlob } from '../../store/entry';
import { getEntry } from '../../store/map-node';
import { entriesPerNode } from '../../store/limits';
import { baseOf, nodeBytesOf } from '../../store/partial';
import { Store } from '../../store/store';
import { keys, SnapshotRecord, VolumeRecord } from '../../store/records';
import { SparseBytes } from './sparse-model';
import { RangeStatus } from '../../store/tree';

/**
 * Every blob reachable from a committed root, found by reading node blobs straight
 * from the blob store (not through the engine's caches): the test's own view.
 */
export async function reachableBlobs(store: Store): Promise<Set<number>> {
  const { catalog, blobs } = store.ctx;
  const records = [
    ...(await catalog.list(keys.volumes)).map((e) => JSON.parse(e.value) as VolumeRecord),
    ...(await catalog.list(keys.snapshots)).map((e) => JSON.parse(e.value) as SnapshotRecord),
  ];
  const seen = new Set<number>();
  const visit = async (entry: Entry, level: number): Promise<void> => {
    if (!hasBlob(entry) || seen.has(blobOf(entry))) return;
    seen.add(blobOf(entry));
    if (level < 0) return;
    const node = Buffer.alloc(nodeBytesOf(blobOf(entry)));
    await blobs.read(blobOf(entry), 0, node, 0, node.length);
    const children = Array.from({ length: entriesPerNode }, (_, slot) => getEntry(node, slot));
    for (const child of children) await visit(child, level - 1);
    // A leaf's partial extents read through their bases.
    if (level === 0) for (let slot = 0; slot < entriesPerNode; slot++) await visit(baseOf(node, slot), -1);
  };
  for (const record of records) await visit(record.root, record.depth - 1);
  return seen;
}

/** Blobs in the store that no root reaches. */
export async function orphanBlobs(store: Store): Promise<number[]> {
  const reachable = await reachableBlobs(store);
  return (await store.ctx.blobs.list()).filter((id) => !reachable.has(id));
}

interface Readable {
  sizeBytes: number;
  readInto(offset: number, target: Buffer, targetOffset: number, length: number): Promise<void>;
  blockStatus(offset: number, length: number): Promise<RangeStatus[]>;
}

const chunk = 4 * 1024 * 1024;

/**
 * Compares a volume or snapshot with its model byte for byte where it matters: all
 * of it when small; for a huge sparse one, every range the store calls data, every
 * page the model holds, and samples of what the store calls holes.
 */
export async function compareWithModel(what: string, actual: Readable, model: SparseBytes, sample: () => number): Promise<void> {
  if (actual.sizeBytes !== model.size) throw new Error(`${what}: size ${actual.sizeBytes}, model says ${model.size}`);
  const check = async (offset: number, length: number): Promise<void> => {
    for (let done = 0; done < length; done += chunk) {
      const n = Math.min(chunk, length - done);
      const got = Buffer.allocUnsafe(n);
      await actual.readInto(offset + done, got, 0, n);
      const want = model.read(offset + done, n);
      if (!got.equals(want)) {
        let at = 0;
        while (got[at] === want[at]) at++;
        throw new Error(`${what}: byte ${offset + done + at} reads ${got[at]}, model says ${want[at]}`);
      }
    }
  };
  if (model.size <= 16 * 1024 * 1024) {
    await check(0, model.size);
  }
  const status = await actual.blockStatus(0, actual.sizeBytes);
  const modelPages = model.nonZeroPages();
  let covered = 0;
  for (const range of status) {
    if (range.offset !== covered) throw new Error(`${what}: block status skips from ${covered} to ${range.offset}`);
    covered += range.length;
    if (range.kind === 'data') {
      if (model.size > 16 * 1024 * 1024) await check(range.offset, range.length);
    } else {
      const length = Math.min(range.length, 65536);
      const offset = range.offset + Math.floor(sample() * (range.length - length));
      const got = Buffer.alloc(length);
      await actual.readInto(offset, got, 0, length);
      if (got.some((b) => b !== 0)) throw new Error(`${what}: ${range.kind} at ${range.offset}+${range.length} does not read as zeros`);
      const overlapping = pagesIn(modelPages, range.offset - 4095, range.offset + range.length);
      const modelData = overlapping.some((page) => {
        const from = Math.max(page, range.offset);
        return model.read(from, Math.min(page + 4096, range.offset + range.length) - from).some((b) => b !== 0);
      });
      if (modelData) {
        throw new Error(`${what}: block status says ${range.kind} at ${range.offset}+${range.length} but the model holds data there`);
      }
    }
  }
  if (covered !== actual.sizeBytes) throw new Error(`${what}: block status covers ${covered} of ${actual.sizeBytes} bytes`);
  if (model.size > 16 * 1024 * 1024) for (const page of modelPages) await check(page, Math.min(4096, model.size - page));
}

/** The sorted pages that start in [from, to). */
function pagesIn(sortedPages: number[], from: number, to: number): number[] {
  let lo = 0;
  let hi = sortedPages.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (sortedPages[mid] < from) lo = mid + 1;
    else hi = mid;
  }
  const out: number[] = [];
  for (let i = lo; i < sortedPages.length && sortedPages[i] < to; i++) out.push(sortedPages[i]);
  return out;
}
