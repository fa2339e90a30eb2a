import fs from 'node:fs';
import path from 'node:path';
import { Log } from '../lib/logger';
import { ArborError, isDiskFull } from './errors';
import { spaceReserveBytes, spaceReserveMaxShare } from './limits';

/** While full, the free space is looked at no more often than this (a refused write is otherwise only a flag). */
const recheckMs = 250;
const zeros = Buffer.alloc(1024 * 1024);

/**
 * Space held back on the data directory's filesystem, so that a full disk never stops
 * the store from committing. A store whose disk filled up cannot free space without
 * a commit (a trim or a delete frees blobs only once the catalog says nothing uses
 * them), and a commit writes map nodes and the catalog: without room for those, every
 * flush fails and nothing the owner of the volume does can bring space back.
 *
 * So a file of zeros holds the reserve. The first write that meets ENOSPC gives it
 * back to the filesystem, and from then on writes are refused at once (ENOSPC, with
 * what to do) while flushes, trims and deletes go on in the room it left. Once the
 * free space is twice the reserve again (trims, deletes, or space freed outside
 * Arbor), the reserve is taken back and writes are accepted again.
 */
export class SpaceReserve {
  private full = false;
  private checkedAt = 0;

  private constructor(
    private readonly file: string,
    readonly bytes: number,
    private readonly log: Log,
  ) {}

  /** Holds the reserve in `dir` (the data directory), or starts out full when it does not fit. */
  static open(dir: string, log: Log, bytes?: number): SpaceReserve {
    const reserve = new SpaceReserve(path.join(dir, 'space-reserve'), bytes ?? defaultReserveBytes(dir), log);
    if (!reserve.take()) {
      reserve.full = true;
      reserve.checkedAt = Date.now();
      log.error('the disk under the store is too full to hold its reserve: writes are refused until space is freed', reserve.facts());
    }
    return reserve;
  }

  get isFull(): boolean {
    return this.full;
  }

  /** Throws, changing nothing, while the disk is full; looks whether space came back first. */
  checkWritable(volume: string): void {
    if (!this.full) return;
    const now = Date.now();
    if (now - this.checkedAt >= recheckMs) {
      this.checkedAt = now;
      if (this.freeBytes() >= 2 * this.bytes && this.take()) {
        this.full = false;
        this.log.info('the disk under the store has room again: writes are accepted', this.facts());
        return;
      }
    }
    throw new ArborError(
      'resource-exhausted',
      `volume ${volume}: the node's disk under the store is full (ENOSPC), so writes are refused; trim or delete volumes, or free space on that disk ` +
        `(writes resume once ${formatMiB(2 * this.bytes)} are free)`,
    );
  }

  /** Blobs were freed: the next write looks at the free space at once, not after the usual wait. */
  spaceFreed(): void {
    this.checkedAt = 0;
  }

  /** A write or commit met `err`: if the disk is full, gives the reserve back so that commits can go on. */
  noticeFailure(err: unknown): void {
    if (this.full || !isDiskFull(err)) return;
    this.full = true;
    this.checkedAt = Date.now();
    fs.rmSync(this.file, { force: true });
    this.log.error('the disk under the store is full: writes are refused, flushes, trims and deletes go on in the reserve given back', {
      ...this.facts(),
      error: (err as Error).message,
    });
  }

  /** Writes the reserve file whole (real blocks, not a sparse file); false, with nothing left, when it does not fit. */
  private take(): boolean {
    if (this.held()) return true;
    let fd: number | undefined;
    try {
      fd = fs.openSync(this.file, 'w');
      for (let at = 0; at < this.bytes; at += zeros.length) fs.writeSync(fd, zeros, 0, Math.min(zeros.length, this.bytes - at), at);
      fs.fsyncSync(fd);
      return true;
    } catch (err) {
      if (!isDiskFull(err)) throw err;
      if (fd !== undefined) fs.closeSync(fd);
      fd = undefined;
      fs.rmSync(this.file, { force: true });
      return false;
    } finally {
      if (fd !== undefined) fs.closeSync(fd);
    }
  }

  /** Whether the file of an earlier open is there whole (a process killed while writing it leaves it short). */
  private held(): boolean {
    try {
      const stats = fs.statSync(this.file);
      return stats.size === this.bytes && stats.blocks * 512 >= this.bytes;
    } catch {
      return false;
    }
  }

  private freeBytes(): number {
    const stats = fs.statfsSync(path.dirname(this.file));
    return stats.bavail * stats.bsize;
  }

  private facts(): Record<string, unknown> {
    return { dir: path.dirname(this.file), reserveBytes: this.bytes, freeBytes: this.freeBytes() };
  }
}

/** The reserve's size on the filesystem of `dir`: whole MiB, at least one. */
function defaultReserveBytes(dir: string): number {
  const stats = fs.statfsSync(dir);
  const share = Math.floor((stats.blocks * stats.bsize * spaceReserveMaxShare) / zeros.length) * zeros.length;
  return Math.max(zeros.length, Math.min(spaceReserveBytes, share));
}

function formatMiB(bytes: number): string {
  return `${(bytes / (1024 * 1024)).toFixed(0)} MiB`;
}
