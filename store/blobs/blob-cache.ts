import fs from 'node:fs';
import path from 'node:path';
import { tryLock } from 'fs-native-extensions';
import { Lru } from '../../lib/lru';
import { Log } from '../../lib/logger';
import { ArborError, assert } from '../errors';
import { cacheTouchIntervalMs, maxOpenCacheFiles } from '../limits';

declare module 'fs-native-extensions' {
  /** An exclusive OFD lock (fcntl F_OFD_SETLK) on the file; false when another open file description holds it. */
  export function tryLock(fd: number, offset?: number, length?: number, options?: { shared?: boolean }): boolean;
}

interface StagedEntry {
  /** The highest offset written: the object's length once uploaded. */
  bytes: number;
  /** Included in a sync: its bytes are final, whether or not the upload has finished. */
  sealed: boolean;
}

interface CleanEntry {
  bytes: number;
  /** When the file's mtime was last set: its rank in the LRU after a restart. */
  touchedMs: number;
}

export type CacheState = 'staged' | 'sealed' | 'clean';

/**
 * The S3 backend's node-local directory: blobs written since their last sync
 * (staged, pinned until uploaded), and copies of objects (clean, evicted least
 * recently used first). Files, not memory: a cache of many GiB costs no heap, and the
 * page cache serves the hot part.
 *
 *   lock           an OFD lock held while a store uses the directory; holds its pid
 *   boot-id        the boot the clean entries were written in
 *   staged/<id>    sparse files of the bytes written so far
 *   clean/<xx>/<id> whole objects, xx = the id's low byte (256 directories, not one huge one)
 *   tmp/           objects being written into the cache
 *
 * Objects are written once and never change, so a clean entry is never stale and
 * nothing is ever invalidated: an entry is only dropped (evicted, or its blob deleted).
 *
 * No file here is fsynced: staged bytes become durable in S3, not here, and a clean
 * entry is only ever a copy. A process that dies leaves complete files (entries
 * appear by rename); a machine that crashes may leave torn ones, so clean entries
 * from another boot are discarded (boot-id), and staged ones are always discarded.
 *
 * I/O is synchronous, as in the file backend: while the data is in the page cache it
 * is the fastest path Node has, and it makes every state change here atomic with
 * respect to the store's concurrent operations.
 */
export class BlobCache {
  private readonly staged = new Map<number, StagedEntry>();
  /** Copies of objects, evicted (file removed) least recently used first while the cache is over its bound. */
  private readonly clean = new Lru<number, CleanEntry>({ capacity: Infinity, weigh: (entry) => entry.bytes, evicted: (id) => this.removeClean(id) });
  /** Open descriptors by blob id. */
  private readonly fds = new Lru<number, number>({ capacity: maxOpenCacheFiles, evicted: (_id, fd) => fs.closeSync(fd) });
  private readonly cleanDirs = new Set<string>();
  private stagedBytes = 0;
  private tmpSerial = 0;
  private evictions = 0;
  private warnedPinned = false;
  private lockFd: number | undefined;

  private constructor(
    readonly dir: string,
    readonly capacityBytes: number,
    private readonly log: Log,
    lockFd: number,
  ) {
    this.lockFd = lockFd;
  }

  /** Takes the directory's lock (refusing when another store holds it), discards staged leftovers, loads the clean entries. */
  static open(options: { dir: string; capacityBytes: number; log: Log }): BlobCache {
    const { dir, capacityBytes, log } = options;
    if (!Number.isSafeInteger(capacityBytes) || capacityBytes < 0) {
      throw new ArborError('invalid-argument', `blob cache size ${capacityBytes} must be a whole number of bytes`);
    }
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    const lockFd = lockDirectory(dir);
    try {
      const cache = new BlobCache(dir, capacityBytes, log, lockFd);
      cache.load();
      return cache;
    } catch (err) {
      fs.closeSync(lockFd);
      throw err;
    }
  }

  state(id: number): CacheState | undefined {
    const staged = this.staged.get(id);
    if (staged) return staged.sealed ? 'sealed' : 'staged';
    return this.clean.has(id) ? 'clean' : undefined;
  }

  /** Reads from a staged or clean entry (zeros past its end); false when the blob is not here. */
  read(id: number, offset: number, target: Buffer, targetOffset: number, length: number): boolean {
    const staged = this.staged.get(id);
    if (staged) {
      this.readFile(id, staged.bytes, offset, target, targetOffset, length);
      return true;
    }
    const clean = this.clean.get(id);
    if (!clean) return false;
    let fd: number;
    try {
      fd = this.fd(id, false);
    } catch (err) {
      // Someone removed the file under us: a miss, fetched again.
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      this.forgetClean(id);
      return false;
    }
    this.readFile(id, clean.bytes, offset, target, targetOffset, length);
    const now = Date.now();
    if (now - clean.touchedMs >= cacheTouchIntervalMs) {
      clean.touchedMs = now;
      fs.futimesSync(fd, now / 1000, now / 1000);
    }
    return true;
  }

  /** Writes into the blob's staged file, creating it. */
  writeStaged(id: number, offset: number, source: Buffer, sourceOffset: number, length: number): void {
    assert(!this.clean.has(id), `blob ${id} is staged only while it has no object`);
    let entry = this.staged.get(id);
    let fd: number;
    if (!entry) {
      assert(!this.fds.has(id), `blob ${id} has no open cache file before it is staged`);
      fd = this.fd(id, true);
      entry = { bytes: 0, sealed: false };
      this.staged.set(id, entry);
    } else {
      assert(!entry.sealed, `blob ${id} is written only before its sync`);
      fd = this.fd(id, false);
    }
    let done = 0;
    while (done < length) done += fs.writeSync(fd, source, sourceOffset + done, length - done, offset + done);
    const end = offset + length;
    if (end > entry.bytes) {
      this.stagedBytes += end - entry.bytes;
      entry.bytes = end;
      this.makeRoom();
    }
  }

  /** From now on the staged bytes are final: they are being uploaded. */
  seal(id: number): void {
    const entry = this.staged.get(id);
    assert(entry, `blob ${id} is staged when it is sealed`);
    entry.sealed = true;
  }

  /** The whole staged blob, for its upload. */
  stagedContents(id: number): Buffer {
    const entry = this.staged.get(id);
    assert(entry, `blob ${id} is staged when it is uploaded`);
    const bytes = Buffer.alloc(entry.bytes);
    this.readFile(id, entry.bytes, 0, bytes, 0, entry.bytes);
    return bytes;
  }

  /** The staged blob was uploaded: its file becomes a clean entry, evictable. */
  promote(id: number): void {
    const entry = this.staged.get(id);
    assert(entry?.sealed, `blob ${id} is staged and sealed when its upload completes`);
    fs.renameSync(this.stagedPath(id), this.cleanPath(id, true));
    this.staged.delete(id);
    this.stagedBytes -= entry.bytes;
    this.addClean(id, entry.bytes);
  }

  /** Keeps a copy of an object just fetched. */
  insertClean(id: number, data: Buffer): void {
    assert(this.state(id) === undefined, `blob ${id} is not cached when its object arrives`);
    // It would be the first thing evicted, before anyone reads it.
    if (data.length > this.capacityBytes - this.stagedBytes) return;
    const tmp = path.join(this.dir, 'tmp', `${hex(id)}.${this.tmpSerial++}`);
    fs.writeFileSync(tmp, data, { mode: 0o600 });
    fs.renameSync(tmp, this.cleanPath(id, true));
    this.addClean(id, data.length);
  }

  /** Forgets a blob, staged or clean. */
  drop(id: number): void {
    const staged = this.staged.get(id);
    if (staged) {
      this.closeFd(id);
      this.staged.delete(id);
      this.stagedBytes -= staged.bytes;
      fs.rmSync(this.stagedPath(id), { force: true });
    } else if (this.clean.has(id)) {
      this.forgetClean(id);
    }
  }

  stagedIds(): number[] {
    return [...this.staged.keys()];
  }

  stats(): { stagedBlobs: number; stagedBytes: number; cleanBlobs: number; cleanBytes: number; evictions: number } {
    return {
      stagedBlobs: this.staged.size,
      stagedBytes: this.stagedBytes,
      cleanBlobs: this.clean.size,
      cleanBytes: this.clean.totalWeight,
      evictions: this.evictions,
    };
  }

  /** Discards what is still staged (never acknowledged as durable) and lets go of the directory. */
  close(): void {
    if (this.lockFd === undefined) return;
    for (const id of [...this.staged.keys()]) this.drop(id);
    this.fds.clear();
    // Closing the descriptor releases the lock. The file stays: removing it would let a
    // newcomer lock a fresh file while a third process waits on the old one.
    fs.closeSync(this.lockFd);
    this.lockFd = undefined;
  }

  private load(): void {
    for (const sub of ['staged', 'clean', 'tmp']) fs.mkdirSync(path.join(this.dir, sub), { recursive: true, mode: 0o700 });
    const leftovers = fs.readdirSync(path.join(this.dir, 'staged'));
    for (const name of leftovers) fs.rmSync(path.join(this.dir, 'staged', name), { recursive: true, force: true });
    if (leftovers.length > 0) {
      this.log.info('discarded blobs a previous process staged and never synced; the collector reclaims their ids', { dir: this.dir, blobs: leftovers.length });
    }
    for (const name of fs.readdirSync(path.join(this.dir, 'tmp'))) fs.rmSync(path.join(this.dir, 'tmp', name), { recursive: true, force: true });

    const bootFile = path.join(this.dir, 'boot-id');
    const boot = currentBootId();
    let written: string | undefined;
    try {
      written = fs.readFileSync(bootFile, 'utf8').trim();
    } catch {
      written = undefined;
    }
    if (boot === undefined || written !== boot) {
      // Unsynced files of another boot may be torn: start empty.
      fs.rmSync(path.join(this.dir, 'clean'), { recursive: true, force: true });
      fs.mkdirSync(path.join(this.dir, 'clean'), { mode: 0o700 });
      if (boot !== undefined) fs.writeFileSync(bootFile, `${boot}\n`, { mode: 0o600 });
      return;
    }

    const found: Array<{ id: number; bytes: number; mtimeMs: number }> = [];
    for (const sub of fs.readdirSync(path.join(this.dir, 'clean'))) {
      const subDir = path.join(this.dir, 'clean', sub);
      if (!/^[0-9a-f]{2}$/.test(sub)) continue;
      this.cleanDirs.add(sub);
      for (const name of fs.readdirSync(subDir)) {
        const id = /^[0-9a-f]{12}$/.test(name) ? parseInt(name, 16) : undefined;
        if (id === undefined || subdirOf(id) !== sub) continue;
        const stats = fs.statSync(path.join(subDir, name));
        if (stats.isFile()) found.push({ id, bytes: stats.size, mtimeMs: stats.mtimeMs });
      }
    }
    found.sort((a, b) => a.mtimeMs - b.mtimeMs);
    for (const entry of found) {
      this.clean.set(entry.id, { bytes: entry.bytes, touchedMs: entry.mtimeMs });
    }
    this.makeRoom();
    this.log.debug('blob cache opened', { dir: this.dir, cleanBlobs: this.clean.size, cleanBytes: this.clean.totalWeight });
  }

  private addClean(id: number, bytes: number): void {
    this.clean.set(id, { bytes, touchedMs: Date.now() });
    this.makeRoom();
  }

  private forgetClean(id: number): void {
    if (this.clean.delete(id) !== undefined) this.removeClean(id);
  }

  /** The clean entry left the map (forgotten or evicted): its file goes too. */
  private removeClean(id: number): void {
    this.closeFd(id);
    fs.rmSync(this.cleanPath(id, false), { force: true });
  }

  /** Evicts clean entries, least recently used first, until the cache fits its bound. */
  private makeRoom(): void {
    this.evictions += this.clean.trim(() => this.stagedBytes + this.clean.totalWeight > this.capacityBytes);
    if (this.stagedBytes > this.capacityBytes && !this.warnedPinned) {
      // Staged blobs cannot be evicted before they are uploaded: go on above the bound.
      this.warnedPinned = true;
      this.log.warn('blobs staged for upload alone exceed the blob cache size; going on above it (flush more often or give the cache more room)', {
        dir: this.dir,
        stagedBytes: this.stagedBytes,
        capacityBytes: this.capacityBytes,
      });
    }
  }

  /** Reads `length` bytes at `offset` of a file holding `fileBytes`; zeros past its end. */
  private readFile(id: number, fileBytes: number, offset: number, target: Buffer, targetOffset: number, length: number): void {
    const available = Math.max(0, Math.min(length, fileBytes - offset));
    if (available > 0) {
      const fd = this.fd(id, false);
      let done = 0;
      while (done < available) {
        const n = fs.readSync(fd, target, targetOffset + done, available - done, offset + done);
        assert(n > 0, `blob ${id}'s cache file in ${this.dir} holds ${fileBytes} bytes`);
        done += n;
      }
    }
    if (available < length) target.fill(0, targetOffset + available, targetOffset + length);
  }

  /** The blob's descriptor: a new staged file when `create`, else its staged or clean file. */
  private fd(id: number, create: boolean): number {
    const cached = this.fds.get(id);
    if (cached !== undefined) return cached;
    const staged = create || this.staged.has(id);
    const flags = staged ? fs.constants.O_RDWR | (create ? fs.constants.O_CREAT | fs.constants.O_TRUNC : 0) : fs.constants.O_RDONLY;
    const fd = fs.openSync(staged ? this.stagedPath(id) : this.cleanPath(id, false), flags, 0o600);
    return this.fds.set(id, fd);
  }

  private closeFd(id: number): void {
    const fd = this.fds.delete(id);
    if (fd !== undefined) fs.closeSync(fd);
  }

  private stagedPath(id: number): string {
    return path.join(this.dir, 'staged', hex(id));
  }

  private cleanPath(id: number, create: boolean): string {
    const sub = subdirOf(id);
    if (create && !this.cleanDirs.has(sub)) {
      fs.mkdirSync(path.join(this.dir, 'clean', sub), { recursive: true, mode: 0o700 });
      this.cleanDirs.add(sub);
    }
    return path.join(this.dir, 'clean', sub, hex(id));
  }
}

/**
 * An OFD lock, not a pid file: the kernel drops it when the holder dies, so there is
 * no stale lock to detect and no pid reuse to fool the check; and it is per open
 * file description, so a second store in the same process is refused as well.
 */
function lockDirectory(dir: string): number {
  const file = path.join(dir, 'lock');
  const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
  let locked = false;
  try {
    locked = tryLock(fd);
  } finally {
    if (!locked) fs.closeSync(fd);
  }
  if (!locked) {
    let holder = '';
    try {
      holder = fs.readFileSync(file, 'utf8').trim();
    } catch {
      // Only for the message.
    }
    throw new ArborError(
      'busy',
      `blob cache directory ${dir} is in use by another blob store${/^\d+$/.test(holder) ? ` (pid ${holder})` : ''}; every store needs a cache directory of its own`,
    );
  }
  fs.ftruncateSync(fd, 0);
  fs.writeSync(fd, `${process.pid}\n`, 0);
  return fd;
}

function currentBootId(): string | undefined {
  try {
    return fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim() || undefined;
  } catch {
    return undefined;
  }
}

/** A blob id as 12 hex digits: ids stay below 2^45. */
export function hex(id: number): string {
  return id.toString(16).padStart(12, '0');
}

function subdirOf(id: number): string {
  return (id % 256).toString(16).padStart(2, '0');
}
