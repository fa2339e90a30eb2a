import fs from 'node:fs';
import path from 'node:path';
import { ArborError } from '../errors';
import { maxExtentSizeBytes, maxOpenSegmentFiles, syncConcurrency } from '../limits';
import { BlobStore } from './blobs';
import { Bitset } from './bitset';
import { punchHole } from './hole-punch';

/** Blob ids per segment file; with 4 MiB slots a segment spans 16 GiB (sparse). */
export const idsPerSegment = 4096;
/** Every blob gets a slot as large as the largest extent; unwritten bytes take no space. */
const slotBytes = maxExtentSizeBytes;

interface Segment {
  index: number;
  /** Ids that may hold a blob: written this session, or present when the store opened. */
  present: Bitset;
  /** Ids freed (their slot punched). A cache: losing it only means punching again. */
  freed: Bitset;
  freedChanged: boolean;
}

/**
 * Blobs in the data directory as slots of large sparse segment files: blob `id`
 * lives at byte (id mod 4096) × 4 MiB of segment floor(id / 4096). One descriptor
 * and one fsync serve thousands of blobs, and freeing a blob punches a hole so its
 * space goes back to the filesystem at once; a segment whose ids are all freed is
 * deleted.
 *
 * Which slots hold a blob is not stored durably: after a restart every id of a
 * segment below the allocator's committed mark (`idsBelow`) counts as present until
 * the collector frees it, so a crash can never hide a blob from the collector.
 *
 * I/O is synchronous on the calling thread: while data is in the page cache this is
 * the fastest path Node has (a libuv hand-off costs ~20 µs per I/O on these VMs);
 * only fsync, which waits for the disk, goes to the thread pool.
 */
export class FileBlobStore implements BlobStore {
  private readonly segments = new Map<number, Segment>();
  /** Open descriptors by segment, least recently used first. */
  private readonly fds = new Map<number, number>();
  private directoryChanged = false;
  private closed = false;

  private constructor(private readonly root: string) {}

  static open(root: string, options: { idsBelow: number }): FileBlobStore {
    fs.mkdirSync(root, { recursive: true, mode: 0o700 });
    const store = new FileBlobStore(root);
    for (const name of fs.readdirSync(root)) {
      const match = /^seg-([0-9a-f]{8})\.data$/.exec(name);
      if (!match) continue;
      const index = parseInt(match[1], 16);
      const freed = store.loadFreed(index);
      const present = new Bitset(idsPerSegment);
      for (let slot = 0; slot < idsPerSegment; slot++) {
        const id = index * idsPerSegment + slot;
        if (id !== 0 && id < options.idsBelow && !freed.has(slot)) present.add(slot);
      }
      store.segments.set(index, { index, present, freed, freedChanged: false });
    }
    return store;
  }

  async read(id: number, offset: number, target: Buffer, targetOffset: number, length: number): Promise<void> {
    const segment = this.segments.get(segmentOf(id));
    if (!segment || !segment.present.has(slotOf(id))) {
      throw new ArborError('internal', `blob ${id} is missing from ${this.root}: the store is damaged`);
    }
    const fd = this.fd(segment.index);
    const at = slotOf(id) * slotBytes + offset;
    let done = 0;
    while (done < length) {
      const n = fs.readSync(fd, target, targetOffset + done, length - done, at + done);
      if (n === 0) break;
      done += n;
    }
    if (done < length) target.fill(0, targetOffset + done, targetOffset + length);
  }

  async write(id: number, offset: number, source: Buffer, sourceOffset: number, length: number): Promise<void> {
    if (offset + length > slotBytes) throw new ArborError('internal', `a write of ${length} bytes at ${offset} does not fit blob ${id}`);
    const segment = this.segment(segmentOf(id));
    const fd = this.fd(segment.index);
    const at = slotOf(id) * slotBytes + offset;
    segment.present.add(slotOf(id));
    let done = 0;
    while (done < length) done += fs.writeSync(fd, source, sourceOffset + done, length - done, at + done);
  }

  async sync(ids: Iterable<number>): Promise<void> {
    const touched = new Set<number>();
    for (const id of ids) touched.add(segmentOf(id));
    // Each sync opens its own descriptor: a cached one may be evicted and its number
    // reused while the fsync waits in the thread pool.
    const work = [...touched].filter((index) => this.segments.has(index)).map((index) => () => syncFile(this.dataPath(index), false));
    if (this.directoryChanged) {
      this.directoryChanged = false;
      work.push(() => syncFile(this.root, true));
    }
    await runBounded(work, syncConcurrency);
  }

  async delete(ids: Iterable<number>): Promise<void> {
    const sorted = [...new Set(ids)].sort((a, b) => a - b);
    const touched = new Set<Segment>();
    for (let i = 0; i < sorted.length; ) {
      // Adjacent ids are adjacent slots: one hole for the whole run.
      let end = i + 1;
      while (end < sorted.length && sorted[end] === sorted[end - 1] + 1 && segmentOf(sorted[end]) === segmentOf(sorted[i])) end++;
      const segment = this.segments.get(segmentOf(sorted[i]));
      if (segment) {
        punchHole(this.fd(segment.index), slotOf(sorted[i]) * slotBytes, (end - i) * slotBytes);
        for (let j = i; j < end; j++) {
          segment.present.remove(slotOf(sorted[j]));
          segment.freed.add(slotOf(sorted[j]));
        }
        segment.freedChanged = true;
        touched.add(segment);
      }
      i = end;
    }
    for (const segment of touched) this.settle(segment);
  }

  async list(): Promise<number[]> {
    const ids: number[] = [];
    for (const segment of this.segments.values()) for (const slot of segment.present.members()) ids.push(segment.index * idsPerSegment + slot);
    return ids;
  }

  async usage(): Promise<{ blobs: number; bytes: number }> {
    let blobs = 0;
    let bytes = 0;
    for (const segment of this.segments.values()) {
      blobs += segment.present.count();
      bytes += fs.fstatSync(this.fd(segment.index)).blocks * 512;
    }
    return { blobs, bytes };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    for (const segment of this.segments.values()) this.saveFreed(segment);
    this.closed = true;
    for (const fd of this.fds.values()) fs.closeSync(fd);
    this.fds.clear();
  }

  /** Saves what was freed, and deletes a segment none of whose ids can hold a blob again. */
  private settle(segment: Segment): void {
    let allFreed = true;
    for (let slot = 0; slot < idsPerSegment && allFreed; slot++) {
      if (segment.index * idsPerSegment + slot !== 0 && !segment.freed.has(slot)) allFreed = false;
    }
    if (!allFreed) {
      this.saveFreed(segment);
      return;
    }
    const fd = this.fds.get(segment.index);
    if (fd !== undefined) fs.closeSync(fd);
    this.fds.delete(segment.index);
    this.segments.delete(segment.index);
    fs.rmSync(this.dataPath(segment.index), { force: true });
    fs.rmSync(this.freedPath(segment.index), { force: true });
  }

  private saveFreed(segment: Segment): void {
    if (!segment.freedChanged) return;
    segment.freedChanged = false;
    // No fsync: a lost update only means the collector punches those slots again.
    fs.writeFileSync(this.freedPath(segment.index), segment.freed.bytes);
  }

  private loadFreed(index: number): Bitset {
    try {
      const bytes = fs.readFileSync(this.freedPath(index));
      if (bytes.length === idsPerSegment / 8) return new Bitset(idsPerSegment, new Uint8Array(bytes));
    } catch {
      // Absent or unreadable: nothing is known to be freed.
    }
    return new Bitset(idsPerSegment);
  }

  private segment(index: number): Segment {
    let segment = this.segments.get(index);
    if (!segment) {
      segment = { index, present: new Bitset(idsPerSegment), freed: new Bitset(idsPerSegment), freedChanged: false };
      this.segments.set(index, segment);
    }
    return segment;
  }

  private fd(index: number): number {
    if (this.closed) throw new ArborError('unavailable', 'the blob store is closed');
    const cached = this.fds.get(index);
    if (cached !== undefined) {
      this.fds.delete(index);
      this.fds.set(index, cached);
      return cached;
    }
    const file = this.dataPath(index);
    const existed = fs.existsSync(file);
    const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
    if (!existed) this.directoryChanged = true;
    this.fds.set(index, fd);
    if (this.fds.size > maxOpenSegmentFiles) {
      const [oldest, oldestFd] = this.fds.entries().next().value as [number, number];
      this.fds.delete(oldest);
      fs.closeSync(oldestFd);
    }
    return fd;
  }

  private dataPath(index: number): string {
    return path.join(this.root, `seg-${index.toString(16).padStart(8, '0')}.data`);
  }

  private freedPath(index: number): string {
    return path.join(this.root, `seg-${index.toString(16).padStart(8, '0')}.freed`);
  }
}

function segmentOf(id: number): number {
  return Math.floor(id / idsPerSegment);
}

function slotOf(id: number): number {
  return id % idsPerSegment;
}

async function syncFile(filePath: string, directory: boolean): Promise<void> {
  const handle = await fs.promises.open(filePath, fs.constants.O_RDONLY);
  try {
    await (directory ? handle.sync() : handle.datasync());
  } finally {
    await handle.close();
  }
}

/** Runs the tasks with at most `limit` in flight; rejects with the first failure after all settle. */
export async function runBounded(tasks: Array<() => Promise<void>>, limit: number): Promise<void> {
  let next = 0;
  let failure: unknown;
  const worker = async (): Promise<void> => {
    while (next < tasks.length) {
      const task = tasks[next++];
      try {
        await task();
      } catch (err) {
        failure ??= err;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, tasks.length) }, worker));
  if (failure !== undefined) throw failure;
}
