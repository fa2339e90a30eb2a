import fs from 'node:fs';
import path from 'node:path';
import { runBounded } from '../../lib/bounded';
import { Lru } from '../../lib/lru';
import { ArborError } from '../errors';
import { maxOpenSegmentFiles, poolReadBytes, syncConcurrency, writeCallBytes } from '../limits';
import { blobId, bytesOfClass, classOf, serialOf } from '../blob-id';
import { BlobStore } from './blobs';
import { Bitset } from './bitset';
import { punchHole } from './hole-punch';

/** Blobs per segment file: 16 MiB of map nodes, 256 MiB of 64 KiB extents. */
export const idsPerSegment = 4096;

interface Segment {
  /** Key in the segment map: size class and index together. */
  key: number;
  sizeClass: number;
  index: number;
  slotBytes: number;
  /** Ids that may hold a blob: written this session, or present when the store opened. */
  present: Bitset;
  /** Ids freed (their slot punched). A cache: losing it only means punching again. */
  freed: Bitset;
  freedChanged: boolean;
}

/**
 * Blobs in the data directory as slots of segment files, one set of files per size
 * class: a blob of class c and serial s lives at byte (s mod 4096) × (4 KiB << c) of
 * `c<c>-<s div 4096>.data`. Slots are exactly the blob size, so consecutive blobs
 * of a volume are consecutive on disk; one descriptor and one fsync serve thousands
 * of blobs; freeing a blob punches a hole so its space goes back to the filesystem
 * at once, and a segment whose blobs are all freed is deleted.
 *
 * Which slots hold a blob is not stored durably: after a restart every serial of a
 * segment below its class's committed mark counts as present until the collector
 * frees it, so a crash can never hide a blob from the collector.
 *
 * I/O is synchronous on the calling thread: while data is in the page cache this is
 * the fastest path Node has (a libuv hand-off costs ~20 µs per I/O on these VMs).
 * Reads of `poolReadBytes` or more, whose copies cost far more than that, go to the
 * thread pool, as fsync (which waits for the disk) does; writes do not (see write).
 */
export class FileBlobStore implements BlobStore {
  /** Ids synced this session, when blobs are immutable once synced (checked on every write). */
  private readonly sealed?: Set<number>;
  private readonly segments = new Map<number, Segment>();
  /** Open descriptors by segment. */
  private readonly fds = new Lru<number, number>({ capacity: maxOpenSegmentFiles, evicted: (_segment, fd) => this.closeFd(fd) });
  /** Descriptors that reads in the thread pool are using, with how many such reads (`inPool`). */
  private readonly inUse = new Map<number, { users: number; closeAfter: boolean }>();
  private directoryChanged = false;
  private closed = false;

  private constructor(
    private readonly root: string,
    readonly rewritable: boolean,
    /** With `rewritable` false: serials below these were handed out before this session, so are sealed. */
    private readonly sealedBelow: number[],
  ) {
    if (!rewritable) this.sealed = new Set();
  }

  /** `serialsBelow[c]`: the committed next serial of size class c (nothing at or above it was handed out). */
  /**
   * `rewritable: false` makes the store behave like an object store: a blob synced
   * once can never be written again (a write throws), so the engine's sealed-blob
   * path can be tested without one.
   */
  static open(root: string, options: { serialsBelow: number[]; rewritable?: boolean }): FileBlobStore {
    fs.mkdirSync(root, { recursive: true, mode: 0o700 });
    const store = new FileBlobStore(root, options.rewritable ?? true, options.serialsBelow);
    for (const name of fs.readdirSync(root)) {
      const match = /^c(\d{2})-([0-9a-f]{8})\.data$/.exec(name);
      if (!match) continue;
      const segment = store.newSegment(Number(match[1]), parseInt(match[2], 16));
      segment.freed = store.loadFreed(segment);
      for (let slot = 0; slot < idsPerSegment; slot++) {
        const serial = segment.index * idsPerSegment + slot;
        if (blobId(segment.sizeClass, serial) !== 0 && serial < (options.serialsBelow[segment.sizeClass] ?? 0) && !segment.freed.has(slot))
          segment.present.add(slot);
      }
      store.segments.set(segment.key, segment);
    }
    return store;
  }

  async read(id: number, offset: number, target: Buffer, targetOffset: number, length: number): Promise<void> {
    if (length < poolReadBytes) {
      this.readNow(id, offset, target, targetOffset, length);
      return;
    }
    const segment = this.presentSegment(id, offset, length);
    const fd = this.fd(segment);
    const at = slotOf(id) * segment.slotBytes + offset;
    const done = await this.inPool(fd, async () => {
      let n = 0;
      while (n < length) {
        const got = await readInPool(fd, target, targetOffset + n, length - n, at + n);
        if (got === 0) break;
        n += got;
      }
      return n;
    });
    if (done < length) target.fill(0, targetOffset + done, targetOffset + length);
  }

  /** Positioned reads on this thread: while the file is in the page cache, cheaper than any hand-off to a thread pool. */
  readNow(id: number, offset: number, target: Buffer, targetOffset: number, length: number): true {
    const segment = this.presentSegment(id, offset, length);
    const fd = this.fd(segment);
    const at = slotOf(id) * segment.slotBytes + offset;
    let done = 0;
    while (done < length) {
      const n = fs.readSync(fd, target, targetOffset + done, length - done, at + done);
      if (n === 0) break;
      done += n;
    }
    if (done < length) target.fill(0, targetOffset + done, targetOffset + length);
    return true;
  }

  /** Consecutive ids of one segment: their slots lie end to end in its file. */
  adjacent(id: number, next: number): boolean {
    return next === id + 1 && segmentKey(next) === segmentKey(id);
  }

  /** The segment of blob `id`, checking that it and every blob a read of `length` at `offset` runs on into are there. */
  private presentSegment(id: number, offset: number, length: number): Segment {
    const segment = this.segments.get(segmentKey(id));
    const first = slotOf(id);
    const last = segment ? first + Math.floor((offset + Math.max(length, 1) - 1) / segment.slotBytes) : first;
    for (let slot = first; slot <= last; slot++) {
      if (segment && slot < idsPerSegment && segment.present.has(slot)) continue;
      throw new ArborError('internal', `blob ${id - first + slot} is missing from ${this.root}: the store is damaged`);
    }
    return segment!;
  }

  /** Closes a descriptor now, or (a read in the pool uses it) when that read ends. */
  private closeFd(fd: number): void {
    const use = this.inUse.get(fd);
    if (use) use.closeAfter = true;
    else fs.closeSync(fd);
  }

  /**
   * On this thread, whatever the length: ext4 takes a file's inode lock for every
   * buffered write, so writes from the pool's threads into one segment file queue on
   * it (on 2 cores they spun there, and a clone's 1 MiB sequential writes fell to a
   * fifth of the same writes done here).
   */
  async write(id: number, offset: number, source: Buffer, sourceOffset: number, length: number): Promise<void> {
    this.writeNow(id, offset, source, sourceOffset, length);
  }

  writeNow(id: number, offset: number, source: Buffer, sourceOffset: number, length: number): void {
    const { fd, at } = this.writableRange(id, offset, length);
    for (let done = 0; done < length;) done += fs.writeSync(fd, source, sourceOffset + done, writeCallLength(at + done, length - done), at + done);
  }

  /**
   * Where a write of `length` at `offset` of blob `id` goes in its segment file, having
   * checked that it stays in that file and that no blob it reaches is sealed, and
   * counted every one of them present.
   */
  private writableRange(id: number, offset: number, length: number): { fd: number; at: number } {
    const segment = this.segment(id);
    const first = slotOf(id);
    const last = first + Math.floor((offset + Math.max(length, 1) - 1) / segment.slotBytes);
    if (last >= idsPerSegment) {
      throw new ArborError('internal', `a write of ${length} bytes at ${offset} of blob ${id} runs past the last blob of its segment file`);
    }
    for (let each = id; each <= id + last - first; each++) {
      if (this.sealed && (this.sealed.has(each) || serialOf(each) < (this.sealedBelow[classOf(each)] ?? 0))) {
        throw new ArborError('internal', `blob ${each} was synced and is immutable; the engine must write a new blob`);
      }
    }
    const fd = this.fd(segment);
    for (let slot = first; slot <= last; slot++) segment.present.add(slot);
    return { fd, at: first * segment.slotBytes + offset };
  }

  /**
   * Runs a read in the thread pool on descriptor `fd`: one evicted or let go meanwhile
   * is closed when the last such read ends, so that its number is not reused under it.
   */
  private async inPool<T>(fd: number, io: () => Promise<T>): Promise<T> {
    const use = this.inUse.get(fd) ?? { users: 0, closeAfter: false };
    this.inUse.set(fd, use);
    use.users++;
    try {
      return await io();
    } finally {
      if (--use.users === 0) {
        this.inUse.delete(fd);
        if (use.closeAfter) fs.closeSync(fd);
      }
    }
  }

  async sync(ids: Iterable<number>): Promise<void> {
    const touched = new Set<Segment>();
    for (const id of ids) {
      this.sealed?.add(id);
      const segment = this.segments.get(segmentKey(id));
      if (segment) touched.add(segment);
    }
    // Each sync opens its own descriptor: a cached one may be evicted and its number
    // reused while the fsync waits in the thread pool.
    const work = [...touched].map((segment) => () => syncFile(this.dataPath(segment), false));
    if (this.directoryChanged) {
      this.directoryChanged = false;
      work.push(() => syncFile(this.root, true));
    }
    await runBounded(work, syncConcurrency);
  }

  async delete(ids: Iterable<number>): Promise<void> {
    const sorted = [...new Set(ids)].sort((a, b) => a - b);
    const touched = new Set<Segment>();
    for (let i = 0; i < sorted.length;) {
      // Adjacent ids are adjacent slots: one hole for the whole run.
      let end = i + 1;
      while (end < sorted.length && sorted[end] === sorted[end - 1] + 1 && segmentKey(sorted[end]) === segmentKey(sorted[i])) end++;
      const segment = this.segments.get(segmentKey(sorted[i]));
      if (segment) {
        punchHole(this.fd(segment), slotOf(sorted[i]) * segment.slotBytes, (end - i) * segment.slotBytes);
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
    for (const segment of this.segments.values())
      for (const slot of segment.present.members()) ids.push(blobId(segment.sizeClass, segment.index * idsPerSegment + slot));
    return ids;
  }

  async usage(): Promise<{ blobs: number; bytes: number }> {
    let blobs = 0;
    let bytes = 0;
    for (const segment of this.segments.values()) {
      blobs += segment.present.count();
      bytes += fs.fstatSync(this.fd(segment)).blocks * 512;
    }
    return { blobs, bytes };
  }

  async availableBytes(): Promise<number> {
    const stats = await fs.promises.statfs(this.root);
    return stats.bavail * stats.bsize;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    for (const segment of this.segments.values()) this.saveFreed(segment);
    this.closed = true;
    this.fds.clear();
  }

  /** Saves what was freed, and deletes a segment none of whose ids can hold a blob again. */
  private settle(segment: Segment): void {
    let allFreed = true;
    for (let slot = 0; slot < idsPerSegment && allFreed; slot++) {
      if (blobId(segment.sizeClass, segment.index * idsPerSegment + slot) !== 0 && !segment.freed.has(slot)) allFreed = false;
    }
    if (!allFreed) {
      this.saveFreed(segment);
      return;
    }
    const fd = this.fds.delete(segment.key);
    if (fd !== undefined) this.closeFd(fd);
    this.segments.delete(segment.key);
    fs.rmSync(this.dataPath(segment), { force: true });
    fs.rmSync(this.freedPath(segment), { force: true });
  }

  private saveFreed(segment: Segment): void {
    if (!segment.freedChanged) return;
    segment.freedChanged = false;
    // No fsync: a lost update only means the collector punches those slots again.
    fs.writeFileSync(this.freedPath(segment), segment.freed.bytes);
  }

  private loadFreed(segment: Segment): Bitset {
    try {
      const bytes = fs.readFileSync(this.freedPath(segment));
      if (bytes.length === idsPerSegment / 8) return new Bitset(idsPerSegment, new Uint8Array(bytes));
    } catch {
      // Absent or unreadable: nothing is known to be freed.
    }
    return new Bitset(idsPerSegment);
  }

  /** The segment a blob lives in, created when it is the first blob written there. */
  private segment(id: number): Segment {
    const key = segmentKey(id);
    let segment = this.segments.get(key);
    if (!segment) {
      segment = this.newSegment(classOf(id), Math.floor(serialOf(id) / idsPerSegment));
      this.segments.set(key, segment);
    }
    return segment;
  }

  private newSegment(sizeClass: number, index: number): Segment {
    return {
      key: keyOf(sizeClass, index),
      sizeClass,
      index,
      slotBytes: bytesOfClass(sizeClass),
      present: new Bitset(idsPerSegment),
      freed: new Bitset(idsPerSegment),
      freedChanged: false,
    };
  }

  private fd(segment: Segment): number {
    if (this.closed) throw new ArborError('unavailable', 'the blob store is closed');
    const cached = this.fds.get(segment.key);
    if (cached !== undefined) return cached;
    const file = this.dataPath(segment);
    const existed = fs.existsSync(file);
    const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
    if (!existed) this.directoryChanged = true;
    return this.fds.set(segment.key, fd);
  }

  private dataPath(segment: Segment): string {
    return path.join(this.root, `${segmentName(segment)}.data`);
  }

  private freedPath(segment: Segment): string {
    return path.join(this.root, `${segmentName(segment)}.freed`);
  }
}

function segmentName(segment: Segment): string {
  return `c${String(segment.sizeClass).padStart(2, '0')}-${segment.index.toString(16).padStart(8, '0')}`;
}

function keyOf(sizeClass: number, index: number): number {
  return sizeClass * 2 ** 32 + index;
}

function segmentKey(id: number): number {
  return keyOf(classOf(id), Math.floor(serialOf(id) / idsPerSegment));
}

function slotOf(id: number): number {
  return serialOf(id) % idsPerSegment;
}

async function syncFile(filePath: string, directory: boolean): Promise<void> {
  const handle = await fs.promises.open(filePath, fs.constants.O_RDONLY);
  try {
    await (directory ? handle.sync() : handle.datasync());
  } finally {
    await handle.close();
  }
}

function readInPool(fd: number, target: Buffer, targetOffset: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => fs.read(fd, target, targetOffset, length, position, (err, n) => (err ? reject(err) : resolve(n))));
}

/** How much of a write at file offset `at` one write call takes: up to the next `writeCallBytes` boundary. */
function writeCallLength(at: number, remaining: number): number {
  return Math.min(remaining, writeCallBytes - (at % writeCallBytes));
}
