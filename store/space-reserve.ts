import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Log } from '../lib/logger';
import { ArborError, isDiskFull } from './errors';
import { spaceReserveBytes, spaceReserveMaxShare } from './limits';

/** While full, the free space is looked at no more often than this (a refused write is otherwise only a flag). */
const recheckMs = 250;
/** While not full, the free space is looked at again at least this often (other writers share the disk). */
const refreshMs = 1000;
/**
 * The reserve file's contents: random, so that a compressing or deduplicating
 * filesystem (btrfs, ZFS) cannot store it in less than its size.
 */
const fill = crypto.randomBytes(1024 * 1024);
/** The reserve file, in the data directory. */
const fileName = 'space-reserve';

/**
 * Room kept on the data directory's filesystem so that a full disk never stops the
 * store from committing. A store whose disk filled up cannot free space without a
 * commit (a trim or a delete frees blobs only once the catalog says nothing uses
 * them), and a commit writes map nodes and the catalog: without room for those every
 * flush fails, and nothing the volume's user does brings space back.
 *
 * Two layers. Writes are refused (ENOSPC, saying what to do) before they would leave
 * less than the reserve free: the free space is looked up with statfs when what this
 * process wrote since the last look might bring it near, and every second. Flushes,
 * trims, zeroing and deletes go on. And a file of the reserve's size is held on the
 * disk: should anything still meet a full disk (another program filled it, a commit
 * larger than the margin), it is given back at once, so that the next commit fits.
 * Writes resume once twice the reserve is free (the file held again).
 */
export class SpaceReserve {
  private full = false;
  /** Whether the reserve file is on the disk. */
  private held = false;
  private checkedAt = 0;
  private freeAtCheck = 0;
  /** Bytes writes were let through for since the last look: taken off its free space. */
  private claimedSinceCheck = 0;

  private constructor(
    private readonly file: string,
    readonly bytes: number,
    private readonly log: Log,
  ) {}

  /**
   * Once the store's lock is held, before it writes anything else: with less than the
   * reserve free (the disk filled while no process held it), the reserve file is given
   * back at once, so that opening and committing can write.
   */
  static open(dir: string, log: Log, bytes?: number): SpaceReserve {
    const reserve = new SpaceReserve(path.join(dir, fileName), bytes ?? defaultReserveBytes(dir), log);
    reserve.held = reserve.fileWhole();
    reserve.look(Date.now());
    if (!reserve.held && reserve.freeAtCheck >= 2 * reserve.bytes) {
      reserve.held = reserve.take();
      reserve.look(Date.now());
    }
    if (!reserve.held || reserve.freeAtCheck < reserve.bytes) {
      if (reserve.freeAtCheck < reserve.bytes) reserve.giveBack();
      reserve.becomeFull('the disk under the store was full when it opened');
    }
    return reserve;
  }

  /** Removes the reserve file in `dir` if there is one (for a store that cannot even open): whether there was. */
  static giveBackIn(dir: string): boolean {
    const file = path.join(dir, fileName);
    if (!fs.existsSync(file)) return false;
    fs.rmSync(file, { force: true });
    return true;
  }

  /** Whether the reserve file is on the disk (not given back to a full one). */
  get isHeld(): boolean {
    return this.held;
  }

  /** Before a write of `length` bytes: throws, changing nothing, when the disk is (or the write would make it) full. */
  checkWritable(volume: string, length: number): void {
    const now = Date.now();
    if (this.full) {
      if (now - this.checkedAt < recheckMs) throw this.refusal(volume);
      this.look(now);
      if (this.freeAtCheck < 2 * this.bytes) throw this.refusal(volume);
      if (!this.held) {
        this.held = this.take();
        if (!this.held) throw this.refusal(volume);
        this.look(now);
      }
      this.full = false;
      this.log.info('the disk under the store has room again: writes are accepted', this.facts());
    }
    if (this.freeAtCheck - this.claimedSinceCheck - length < this.bytes || now - this.checkedAt >= refreshMs) {
      this.look(now);
      if (this.freeAtCheck - length < this.bytes) {
        this.becomeFull('the disk under the store is full');
        throw this.refusal(volume);
      }
    }
    this.claimedSinceCheck += length;
  }

  /** Blobs were freed: the next write looks at the free space at once, not after the usual wait. */
  spaceFreed(): void {
    this.checkedAt = 0;
  }

  /** Something of the store failed with `err`: if the disk is full, the reserve goes back to it, so that the next commit fits. */
  noticeFailure(err: unknown): void {
    if (!isDiskFull(err)) return;
    if (!this.full) this.becomeFull('the disk under the store filled up under a write or a commit');
    if (this.held) {
      this.giveBack();
      this.log.error('the store gave its space reserve back to the full disk, for commits', { ...this.facts(), error: (err as Error).message });
    }
  }

  private becomeFull(why: string): void {
    this.full = true;
    this.checkedAt = Date.now();
    this.log.error(`${why}: writes are refused until ${formatMiB(2 * this.bytes)} are free; flushes, trims and deletes go on`, this.facts());
  }

  private refusal(volume: string): ArborError {
    return new ArborError(
      'resource-exhausted',
      `volume ${volume}: the node's disk under the store is full (ENOSPC), so writes are refused; trim or delete volumes, or free space on that disk ` +
        `(writes resume once ${formatMiB(2 * this.bytes)} are free)`,
    );
  }

  private giveBack(): void {
    fs.rmSync(this.file, { force: true });
    this.held = false;
  }

  /** Writes the reserve file whole (real blocks); false, and no file, when it does not fit. */
  private take(): boolean {
    const fd = fs.openSync(this.file, 'w');
    let written = false;
    try {
      for (let at = 0; at < this.bytes; at += fill.length) fs.writeSync(fd, fill, 0, Math.min(fill.length, this.bytes - at), at);
      fs.fsyncSync(fd);
      written = true;
    } catch (err) {
      if (!isDiskFull(err)) throw err;
    } finally {
      fs.closeSync(fd);
      if (!written) fs.rmSync(this.file, { force: true });
    }
    return written;
  }

  /** Whether the file of an earlier open is there whole (a process killed while writing it leaves it short). */
  private fileWhole(): boolean {
    try {
      const stats = fs.statSync(this.file);
      return stats.size === this.bytes && stats.blocks * 512 >= this.bytes;
    } catch {
      return false;
    }
  }

  private look(now: number): void {
    const stats = fs.statfsSync(path.dirname(this.file));
    this.freeAtCheck = stats.bavail * stats.bsize;
    this.claimedSinceCheck = 0;
    this.checkedAt = now;
  }

  private facts(): Record<string, unknown> {
    return { dir: path.dirname(this.file), reserveBytes: this.bytes, freeBytes: this.freeAtCheck, reserveHeld: this.held };
  }
}

/** The reserve's size on the filesystem of `dir`: whole MiB, at least one. */
function defaultReserveBytes(dir: string): number {
  const stats = fs.statfsSync(dir);
  const share = Math.floor((stats.blocks * stats.bsize * spaceReserveMaxShare) / fill.length) * fill.length;
  return Math.max(fill.length, Math.min(spaceReserveBytes, share));
}

function formatMiB(bytes: number): string {
  return `${(bytes / (1024 * 1024)).toFixed(0)} MiB`;
}
