import fs from 'node:fs';
import path from 'node:path';
import { ArborError } from '../errors';
import { maxOpenBlobFiles, syncConcurrency } from '../limits';
import { BlobStore } from './blobs';

const fanOut = 256;

/**
 * Blobs as sparse files in the data directory, one file per blob, spread over 256
 * directories by the id's low byte. One file per blob makes freeing a blob give its
 * space back at once, and lets extents stay sparse.
 *
 * I/O is synchronous on the calling thread: while data is in the page cache this is
 * the fastest path Node has (a libuv hand-off costs ~20 µs per I/O on these VMs);
 * only fsync, which waits for the disk, goes to the thread pool.
 */
export class FileBlobStore implements BlobStore {
  /** Open descriptors, least recently used first. */
  private readonly fds = new Map<number, number>();
  /** Directories holding blobs created since their last sync. */
  private readonly newEntriesIn = new Set<number>();
  private closed = false;

  private constructor(private readonly root: string) {}

  static open(root: string): FileBlobStore {
    fs.mkdirSync(root, { recursive: true, mode: 0o700 });
    for (let dir = 0; dir < fanOut; dir++) fs.mkdirSync(path.join(root, dirName(dir)), { recursive: true, mode: 0o700 });
    return new FileBlobStore(root);
  }

  async read(id: number, offset: number, target: Buffer, targetOffset: number, length: number): Promise<void> {
    const fd = this.fd(id, false);
    let done = 0;
    while (done < length) {
      const n = fs.readSync(fd, target, targetOffset + done, length - done, offset + done);
      if (n === 0) break;
      done += n;
    }
    if (done < length) target.fill(0, targetOffset + done, targetOffset + length);
  }

  async write(id: number, offset: number, source: Buffer, sourceOffset: number, length: number): Promise<void> {
    const fd = this.fd(id, true);
    let done = 0;
    while (done < length) done += fs.writeSync(fd, source, sourceOffset + done, length - done, offset + done);
  }

  async sync(ids: Iterable<number>): Promise<void> {
    const work: Array<() => Promise<void>> = [];
    // Each sync opens its own descriptor: a cached one may be evicted and its number
    // reused while the fsync waits in the thread pool.
    for (const id of new Set(ids)) work.push(() => syncFile(this.pathOf(id)));
    const dirs = [...this.newEntriesIn];
    this.newEntriesIn.clear();
    for (const dir of dirs) work.push(() => syncDirectory(path.join(this.root, dirName(dir))));
    await runBounded(work, syncConcurrency);
  }

  async delete(ids: Iterable<number>): Promise<void> {
    for (const id of ids) {
      this.forget(id);
      try {
        fs.unlinkSync(this.pathOf(id));
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      }
    }
  }

  async list(): Promise<number[]> {
    const ids: number[] = [];
    for (let dir = 0; dir < fanOut; dir++) {
      for (const name of fs.readdirSync(path.join(this.root, dirName(dir)))) {
        const id = parseInt(name, 16);
        if (Number.isSafeInteger(id) && name === fileName(id)) ids.push(id);
      }
    }
    return ids;
  }

  async usage(): Promise<{ blobs: number; bytes: number }> {
    let blobs = 0;
    let bytes = 0;
    for (let dir = 0; dir < fanOut; dir++) {
      const dirPath = path.join(this.root, dirName(dir));
      for (const name of fs.readdirSync(dirPath)) {
        try {
          bytes += fs.statSync(path.join(dirPath, name)).blocks * 512;
          blobs++;
        } catch {
          // Freed while we looked.
        }
      }
    }
    return { blobs, bytes };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const fd of this.fds.values()) fs.closeSync(fd);
    this.fds.clear();
  }

  private fd(id: number, create: boolean): number {
    if (this.closed) throw new ArborError('unavailable', 'the blob store is closed');
    const cached = this.fds.get(id);
    if (cached !== undefined) {
      this.fds.delete(id);
      this.fds.set(id, cached);
      return cached;
    }
    let fd: number;
    try {
      fd = fs.openSync(this.pathOf(id), fs.constants.O_RDWR);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      if (!create) throw new ArborError('internal', `blob ${id} is missing from ${this.root}: the store is damaged`);
      fd = fs.openSync(this.pathOf(id), fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
      this.newEntriesIn.add(id % fanOut);
    }
    this.fds.set(id, fd);
    if (this.fds.size > maxOpenBlobFiles) {
      const [oldest, oldestFd] = this.fds.entries().next().value as [number, number];
      this.fds.delete(oldest);
      fs.closeSync(oldestFd);
    }
    return fd;
  }

  private forget(id: number): void {
    const fd = this.fds.get(id);
    if (fd !== undefined) {
      this.fds.delete(id);
      fs.closeSync(fd);
    }
  }

  private pathOf(id: number): string {
    return path.join(this.root, dirName(id % fanOut), fileName(id));
  }
}

function dirName(dir: number): string {
  return dir.toString(16).padStart(2, '0');
}

function fileName(id: number): string {
  return id.toString(16).padStart(12, '0');
}

async function syncFile(filePath: string): Promise<void> {
  const handle = await fs.promises.open(filePath, fs.constants.O_RDONLY);
  try {
    await handle.datasync();
  } finally {
    await handle.close();
  }
}

async function syncDirectory(dirPath: string): Promise<void> {
  const handle = await fs.promises.open(dirPath, fs.constants.O_RDONLY);
  try {
    await handle.sync();
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
