import { storeCommits } from '../lib/metrics';
import { Compare, KvEntry, Op, put, unchanged } from './catalog/catalog';
import { DurableForCommit } from './blobs/blobs';
import { StoreContext } from './context';
import { ArborError, assert, isDiskFull } from './errors';
import { EMPTY, Entry, asShared, hasBlob, zeroEntry } from './entry';
import { maxDirtyNodesPerVolume } from './limits';
import { MutableTree } from './mutable-tree';
import { decodeOwner } from './ownership';
import { VolumeRecord, decodeVolume, keys } from './records';
import { RwLock } from './rw-lock';
import { RangeStatus, lookupExtent, lookupRefNow, readExtentNow, readTree, treeStatus } from './tree';

const resolved = Promise.resolve();

export interface WriteOptions {
  /** Force unit access: durable before the call returns. */
  fua?: boolean;
}

export interface ZeroOptions {
  /** Keep the range allocated (as known zeros) instead of punching a hole. */
  noHole?: boolean;
  fua?: boolean;
  /** Refuse (code 'unsupported', nothing changed) if zeroing would mean writing zero bytes into data. */
  fast?: boolean;
}

type VolumeState = 'open' | 'closed' | 'deleted' | 'lost';

/**
 * What a snapshot or clone of the live volume adds to the commit of its capture: built
 * from the record about to be committed (its root already read-only), the keys it
 * takes (compared absent) and the ops that write them, and what to return.
 */
export type ShareBuilder<T> = (next: VolumeRecord) => Shared<T> | Promise<Shared<T>>;

/** What a ShareBuilder adds: it may wait (for what its ops depend on) while the lock is held, so only briefly. */
export interface Shared<T> {
  value: T;
  absent: string[];
  ops: Op[];
}

interface Capture {
  sequence: number;
  /** When it was taken (Date.now()). */
  at: number;
  shape: { root: Entry; depth: number; sizeBytes: number };
  sync: number[];
  free: number[];
}

let zeros: Buffer | undefined;
function zeroBuffer(length: number): Buffer {
  if (!zeros || zeros.length < length) zeros = Buffer.alloc(length);
  return zeros;
}

/**
 * An open volume head: its byte-granular I/O API and the owner-side operations that
 * change its catalog record (commit, snapshot, clone, resize, delete).
 *
 * Reads share the lock; everything that changes the tree holds it exclusively, so a
 * snapshot taken under it contains every write that completed before it and none that
 * started after. Only this object ever writes the volume's catalog record.
 */
export class Volume {
  private readonly lock = new RwLock();
  private readonly tree: MutableTree;
  private committed: KvEntry;
  private record: VolumeRecord;
  private state: VolumeState = 'open';
  /** When uncommitted changes first appeared (for the background commit). */
  private changedAt?: number;
  private flushing?: Promise<void>;
  /** Captures taken, and the newest one committed (commits never go back). */
  private captures = 0;
  private committedCapture = 0;
  private commits: Promise<void> = Promise.resolve();
  /** Captures taken and not yet committed, and when the newest committed one was taken. */
  private capturesInFlight = 0;
  private settledThrough = 0;

  /** When this process last committed the volume's record (a flush, a background commit, a snapshot). */
  private lastCommitAt?: number;

  /** Why this process no longer owns the volume, once it does not. */
  private lostReason?: string;

  /**
   * `guard`: where volumes have owners (a shared catalog), the owner key as this
   * process acquired it. Every commit compares it, so once another process has taken
   * the volume over (or the lease behind the key ended) no commit of ours can land.
   */
  constructor(
    private readonly ctx: StoreContext,
    committed: KvEntry,
    private readonly onBusy: (volume: Volume) => void = () => {},
    readonly guard?: Compare,
  ) {
    this.committed = committed;
    this.record = decodeVolume(committed);
    const r = this.record;
    this.tree = new MutableTree(r.root, r.depth, r.sizeBytes, r.extentSizeBytes, ctx.blobs, ctx.nodes, ctx.ids);
  }

  get id(): string {
    return this.record.id;
  }

  get name(): string {
    return this.record.name;
  }

  get sizeBytes(): number {
    return this.tree.sizeBytes;
  }

  get extentSizeBytes(): number {
    return this.record.extentSizeBytes;
  }

  get isOpen(): boolean {
    return this.state === 'open';
  }

  /** The committed record, with the live size. */
  info(): VolumeRecord {
    return { ...this.record };
  }

  /** Milliseconds since uncommitted changes appeared, or undefined when there are none. */
  uncommittedForMs(now = Date.now()): number | undefined {
    return this.changedAt === undefined ? undefined : now - this.changedAt;
  }

  get dirtyNodeCount(): number {
    return this.tree.dirtyNodeCount;
  }

  /**
   * What is not committed yet (for `arbor status`): extents written since the last
   * capture, their bytes (whole extents: the unit a commit makes durable), map nodes
   * changed, and for how long; and when this process last committed the record.
   */
  uncommitted(now = Date.now()): { extents: number; bytes: number; mapNodes: number; forMs?: number; lastCommitAt?: number } {
    const extents = this.tree.unsyncedExtentCount;
    return {
      extents,
      bytes: extents * this.extentSizeBytes,
      mapNodes: this.tree.dirtyNodeCount,
      forMs: this.uncommittedForMs(now),
      lastCommitAt: this.lastCommitAt,
    };
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const target = Buffer.allocUnsafe(length);
    await this.readInto(offset, target, 0, length);
    return target;
  }

  readInto(offset: number, target: Buffer, targetOffset: number, length: number): Promise<void> {
    try {
      if (this.readIntoNow(offset, target, targetOffset, length)) return resolved;
    } catch (err) {
      return Promise.reject(err);
    }
    return this.readIntoLocked(offset, target, targetOffset, length);
  }

  /**
   * A read within one extent whose map path is in memory, from a blob store that can
   * read at once: done here, synchronously, holding the shared lock for no longer than
   * the call (nothing else runs meanwhile). False (nothing done) when it must take the
   * async path; throws where `readInto` would reject.
   */
  readIntoNow(offset: number, target: Buffer, targetOffset: number, length: number): boolean {
    const blobs = this.ctx.blobs;
    if (!blobs.readNow || length === 0) return false;
    const extentSize = this.extentSizeBytes;
    const extent = Math.floor(offset / extentSize);
    if (Math.floor((offset + length - 1) / extentSize) !== extent) return false;
    if (!this.lock.tryShared()) return false;
    try {
      this.checkRange(offset, length, 'read');
      const ref = lookupRefNow(this.tree, this.tree.root, this.tree.depth, extent);
      if (ref === undefined) return false;
      return readExtentNow(blobs, ref, extentSize, offset - extent * extentSize, target, targetOffset, length);
    } finally {
      this.lock.releaseShared();
    }
  }

  private async readIntoLocked(offset: number, target: Buffer, targetOffset: number, length: number): Promise<void> {
    await this.shared(async () => {
      this.checkRange(offset, length, 'read');
      await readTree(this.tree, this.ctx.blobs, this.tree.shape, offset, target, targetOffset, length);
    });
  }

  write(offset: number, data: Buffer, options: WriteOptions = {}): Promise<void> {
    try {
      if (!options.fua && this.writeNow(offset, data)) return resolved;
    } catch (err) {
      return Promise.reject(err);
    }
    return this.noticing(this.writeLocked(offset, data, options));
  }

  /** Passes a failure on, first letting the space reserve see it: a full disk gives the reserve back. */
  private noticing<T>(work: Promise<T>): Promise<T> {
    const space = this.ctx.space;
    return space ? work.catch((err: unknown) => (space.noticeFailure(err), Promise.reject(err))) : work;
  }

  /**
   * A write within one extent whose map path is in memory and this head's: done
   * synchronously (MutableTree.writeNow says when it can be), under the exclusive lock
   * for no longer than the call. False (nothing changed) when it must take the async
   * path; throws where `write` would reject.
   */
  writeNow(offset: number, data: Buffer): boolean {
    const extentSize = this.extentSizeBytes;
    const extent = Math.floor(offset / extentSize);
    if (data.length === 0 || Math.floor((offset + data.length - 1) / extentSize) !== extent) return false;
    if (!this.lock.tryExclusive()) return false;
    try {
      this.checkRange(offset, data.length, 'write');
      this.ctx.space?.checkWritable(this.name, data.length);
      if (this.tree.writeNow(extent, offset - extent * extentSize, data, 0, data.length) === undefined) return false;
      this.noteChange();
      return true;
    } catch (err) {
      this.ctx.space?.noticeFailure(err);
      throw err;
    } finally {
      this.lock.releaseExclusive();
    }
  }

  private async writeLocked(offset: number, data: Buffer, options: WriteOptions): Promise<void> {
    await this.exclusive(async () => {
      this.checkRange(offset, data.length, 'write');
      this.ctx.space?.checkWritable(this.name, data.length);
      const touched: number[] = [];
      const extentSize = this.extentSizeBytes;
      for (let done = 0; done < data.length;) {
        const at = offset + done;
        const extent = Math.floor(at / extentSize);
        const inExtent = at - extent * extentSize;
        const whole = inExtent === 0 ? Math.floor((data.length - done) / extentSize) : 0;
        if (whole > 0) {
          touched.push(...(await this.tree.writeWholeExtents(extent, whole, data, done)));
          done += whole * extentSize;
          continue;
        }
        const n = Math.min(extentSize - inExtent, data.length - done);
        touched.push(await this.tree.writeExtent(extent, inExtent, data, done, n));
        done += n;
      }
      this.noteChange();
      if (options.fua) await this.makeDurable(touched);
    });
  }

  /**
   * Discards a range: whole extents become holes (and are freed when this head owns
   * them); the partial extents at either end have their bytes zeroed.
   */
  async trim(offset: number, length: number): Promise<void> {
    await this.noticing(this.zeroRange(offset, length, EMPTY, 'trim', false));
  }

  /** Goes on while the disk is full, as trims do: whole extents become zero entries, which hold no blob. */
  async writeZeroes(offset: number, length: number, options: ZeroOptions = {}): Promise<void> {
    await this.noticing(this.zeroRange(offset, length, options.noHole ? zeroEntry : EMPTY, 'write-zeroes', options.fua ?? false, options.fast ?? false));
  }

  async blockStatus(offset: number, length: number): Promise<RangeStatus[]> {
    return this.shared(async () => {
      this.checkRange(offset, length, 'block status');
      return treeStatus(this.tree, this.tree.shape, offset, length);
    });
  }

  /**
   * Makes every write that completed before this call durable. The tree is captured
   * under the lock (quick: dirty nodes are written as new blobs); the fsyncs and the
   * catalog commit then run while writes go on, so a flush or a background commit
   * never stalls the volume for the time the disk takes.
   */
  async flush(): Promise<void> {
    try {
      await this.flushOnce();
    } catch (err) {
      // A commit that met a full disk gave the space reserve back (noticeFailure): the next one fits.
      if (!isDiskFull(err) || !this.ctx.space || this.ctx.space.isHeld) throw err;
      await this.flushOnce();
    }
  }

  private async flushOnce(): Promise<void> {
    const captured = await this.exclusive(() => this.capture());
    if (captured) await this.serialCommit(() => this.completeCommit(captured));
  }

  /** Runs `fn` with the volume drained of writes and its state committed: the owner's side of snapshot and clone. */
  async withCommitted<T>(fn: (committed: KvEntry, record: VolumeRecord) => Promise<T>): Promise<T> {
    return this.exclusive(async () => {
      await this.flushLocked();
      return fn(this.committed, this.record);
    });
  }

  /**
   * A snapshot or clone of the live volume, in one transaction: under the lock, the
   * writes completed before the call are captured and their blobs made durable, then
   * one commit writes the captured root, read-only, with what `build` adds (instead of
   * a flush's commit and then the share's own). Undefined when that transaction failed
   * on `build`'s compares (a name taken): the capture is then committed on its own, as
   * a flush would, and nothing is shared. The guards (the record's revision, the owner
   * key's) are compared as in every commit.
   */
  async commitShared<T>(build: ShareBuilder<T>): Promise<T | undefined> {
    return this.exclusive(async () => {
      this.checkOpen();
      const captured = await this.capture();
      assert(captured !== undefined, 'an open volume always captures');
      return this.serialCommit(() => this.completeCommit(captured, build));
    });
  }

  /**
   * Commits a transaction that also rewrites this volume's record (a snapshot or a
   * clone sharing its root, a resize): the extra ops and compares ride along, and
   * the record's root becomes read-only when `share` is set. Call inside withCommitted.
   */
  async commitWith(extra: { compares?: KvEntry[]; absent?: string[]; ops: Op[]; share?: boolean }): Promise<boolean> {
    return this.serialCommit(async () => {
      assert(this.tree.dirtyNodeCount === 0, 'commitWith runs on a committed tree');
      if (extra.share) this.tree.shareRoot();
      const done = await this.commitRecord({ root: this.tree.root, depth: this.tree.depth, sizeBytes: this.tree.sizeBytes }, ++this.captures, extra);
      if (!done && extra.share) this.tree.root = this.record.root;
      return done;
    });
  }

  /** Writes the record with a new tree shape, compare-and-swap on the last commit. */
  private async commitRecord(
    shape: { root: Entry; depth: number; sizeBytes: number },
    sequence: number,
    extra: { compares?: KvEntry[]; absent?: string[]; ops: Op[] } = { ops: [] },
  ): Promise<boolean> {
    const next: VolumeRecord = { ...this.record, ...shape };
    const value = JSON.stringify(next);
    this.unconfirmed.set(value, sequence);
    for (;;) {
      const compares = [...this.guards(), ...(extra.compares ?? []).map(unchanged), ...(extra.absent ?? []).map((key) => ({ key, modRevision: 0 }))];
      const result = await this.ctx.catalog.txn(compares, [put(keys.volume(this.id), next), ...extra.ops]);
      if (result.succeeded) {
        this.adopt({ key: this.committed.key, value, modRevision: result.revision }, sequence);
        return true;
      }
      await this.checkStillOwned();
      // Still ours, yet the record moved: if to a commit of ours whose answer was lost, that is the committed state.
      const current = await this.ctx.catalog.get(keys.volume(this.id));
      const landed = current && current.modRevision !== this.committed.modRevision ? this.unconfirmed.get(current.value) : undefined;
      if (landed === undefined) return false;
      this.adopt(current!, landed);
      if (landed === sequence) return true;
      this.unconfirmed.set(value, sequence);
    }
  }

  /**
   * Records of commits whose outcome this process did not see, with their capture
   * sequence. A transaction that failed may still land (etcd took it, then lost quorum
   * and committed it when quorum came back; or its answer was lost and the client sent
   * it again): the next commit then finds the record moved to one of these, and
   * continues from it instead of failing for ever. Cleared at every commit: once the
   * record's revision moved, no older transaction (they all compare it) can land.
   */
  private readonly unconfirmed = new Map<string, number>();

  private adopt(committed: KvEntry, sequence: number): void {
    this.record = decodeVolume(committed);
    this.committed = committed;
    this.committedCapture = Math.max(this.committedCapture, sequence);
    this.unconfirmed.clear();
    this.lastCommitAt = Date.now();
  }

  /**
   * For a transaction that snapshots several volumes at once: while held and
   * flushed, the compare and the record that share this volume's root, and what to
   * do once that transaction committed.
   */
  prepareShare(): { compares: Compare[]; next: VolumeRecord; committed: (revision: number) => void } {
    assert(this.tree.dirtyNodeCount === 0, 'prepareShare runs on a committed tree');
    const next: VolumeRecord = { ...this.record, root: asShared(this.tree.root) };
    return {
      compares: this.guards(),
      next,
      committed: (revision) => {
        this.tree.shareRoot();
        this.record = next;
        this.committed = { key: this.committed.key, value: JSON.stringify(next), modRevision: revision };
        this.committedCapture = ++this.captures;
      },
    };
  }

  /** Grows the volume; the new range reads as zeros. Committed before it returns. */
  async resize(sizeBytes: number): Promise<void> {
    await this.exclusive(async () => {
      if (sizeBytes < this.tree.sizeBytes) {
        throw new ArborError(
          'out-of-range',
          `volume ${this.name}: requested size ${sizeBytes} is smaller than its current size ${this.tree.sizeBytes}; shrinking is not supported`,
        );
      }
      if (sizeBytes === this.tree.sizeBytes) return;
      await this.tree.growTo(sizeBytes);
      this.noteChange();
      await this.flushLocked();
    });
  }

  /**
   * Removes the head and frees what it owns. Called with the catalog ops that
   * delete its keys; blobs shared with snapshots or clones are left to the collector.
   */
  async delete(ops: Op[]): Promise<void> {
    await this.exclusive(async () => {
      // A commit still running outside the lock would race the delete's compare.
      await this.serialCommit(async () => {});
      const result = await this.ctx.catalog.txn(this.guards(), ops);
      if (!result.succeeded) {
        await this.checkStillOwned();
        throw new ArborError('aborted', `volume ${this.name} changed while it was being deleted; retry`);
      }
      this.state = 'deleted';
      const owned = await this.tree.ownedBlobs();
      await this.ctx.free([...owned, ...this.tree.discardChanges()]);
      for (const id of owned) this.ctx.nodes.delete(id);
      this.changedAt = undefined;
    });
  }

  /** Commits what is pending and refuses further I/O. */
  async close(): Promise<void> {
    if (this.state !== 'open') return;
    await this.exclusive(async () => {
      await this.flushLocked();
      this.state = 'closed';
    });
  }

  /**
   * Holds every change off until the returned function is called; the collector
   * holds every open volume at once to read a consistent cut of the whole store.
   */
  async hold(): Promise<() => void> {
    const wait = this.lock.exclusive();
    if (wait) await wait;
    return () => this.lock.releaseExclusive();
  }

  /** Commits pending changes; only while held. */
  async flushWhileHeld(): Promise<void> {
    await this.flushLocked();
  }

  /** Background commit: cheap when there is nothing to do, never throws. */
  async commitInBackground(): Promise<void> {
    if (this.flushing || this.changedAt === undefined || this.state !== 'open') return;
    // No caller waits for this commit: its failure is logged here (the next flush retries, and reports it).
    this.flushing = this.flush()
      .catch((err) => this.ctx.log.warn('a background commit failed; the next one retries it', { volume: this.name, error: (err as Error).message }))
      .finally(() => (this.flushing = undefined));
    await this.flushing;
  }

  private async zeroRange(offset: number, length: number, wholeExtents: Entry, what: string, fua: boolean, fast = false): Promise<void> {
    await this.exclusive(async () => {
      this.checkRange(offset, length, what);
      if (length === 0) return;
      const extentSize = this.extentSizeBytes;
      // The bytes past the end of the last extent always read as zeros, so a range
      // that reaches the end of the volume covers its last extent whole.
      const end = offset + length === this.tree.sizeBytes ? Math.ceil(this.tree.sizeBytes / extentSize) * extentSize : offset + length;
      const firstWhole = Math.ceil(offset / extentSize);
      const endWhole = Math.floor(end / extentSize);
      const touched: number[] = [];
      if (fast) await this.checkZeroingIsFast(offset, end, firstWhole, endWhole);
      if (firstWhole >= endWhole) {
        await this.zeroBytes(offset, length, touched);
      } else {
        if (offset < firstWhole * extentSize) await this.zeroBytes(offset, firstWhole * extentSize - offset, touched);
        await this.tree.replaceExtents(firstWhole, endWhole - 1, wholeExtents);
        if (endWhole * extentSize < end) await this.zeroBytes(endWhole * extentSize, offset + length - endWhole * extentSize, touched);
      }
      this.noteChange();
      if (fua) await this.makeDurable(touched);
    });
  }

  /** Zeroing is a map update unless a partial extent at either end holds data. */
  private async checkZeroingIsFast(offset: number, end: number, firstWhole: number, endWhole: number): Promise<void> {
    const extentSize = this.extentSizeBytes;
    const partial: number[] = [];
    if (firstWhole >= endWhole) {
      for (let e = Math.floor(offset / extentSize); e * extentSize < end; e++) partial.push(e);
    } else {
      if (offset < firstWhole * extentSize) partial.push(firstWhole - 1);
      if (endWhole * extentSize < end) partial.push(endWhole);
    }
    for (const extent of partial) {
      if (hasBlob(await lookupExtent(this.tree, this.tree.root, this.tree.depth, extent))) {
        throw new ArborError('unsupported', `volume ${this.name}: zeroing part of extent ${extent} means writing zeros; not fast`);
      }
    }
  }

  /** Zeroes bytes extent by extent; nothing to do where an extent already reads as zeros. */
  private async zeroBytes(offset: number, length: number, touched: number[]): Promise<void> {
    const extentSize = this.extentSizeBytes;
    for (let done = 0; done < length;) {
      const at = offset + done;
      const extent = Math.floor(at / extentSize);
      const n = Math.min(extentSize - (at - extent * extentSize), length - done);
      const entry = await lookupExtent(this.tree, this.tree.root, this.tree.depth, extent);
      if (hasBlob(entry)) touched.push(await this.tree.writeExtent(extent, at - extent * extentSize, zeroBuffer(n), 0, n));
      done += n;
    }
  }

  /** FUA: when only data changed in place, syncing those extents is enough; otherwise commit. */
  private async makeDurable(touched: number[]): Promise<void> {
    if (this.tree.needsCommit(this.record.root)) {
      await this.flushLocked();
      return;
    }
    await this.ctx.blobs.sync(touched);
    if (this.state === 'lost') throw this.lostError();
    this.tree.markSynced(touched);
    if (!this.tree.hasUnsyncedData) this.changedAt = undefined;
  }

  /** A flush with the lock held from start to end: the record matches the live tree when it returns. */
  private async flushLocked(): Promise<void> {
    const captured = await this.capture();
    if (captured) await this.serialCommit(() => this.completeCommit(captured));
    else await this.serialCommit(async () => {});
  }

  /**
   * Under the lock: writes dirty nodes back and takes what the commit needs: the
   * shape to commit, the blobs to make durable first, the blobs to free after.
   */
  private async capture(): Promise<Capture | undefined> {
    // A flush on a volume this process lost must fail: its writes never became durable.
    if (this.state === 'lost') throw this.lostError();
    if (this.state !== 'open') return undefined;
    const taken = await this.noticing(this.tree.capture());
    this.capturesInFlight++;
    const captured: Capture = { sequence: ++this.captures, at: Date.now(), ...taken };
    this.changedAt = undefined;
    return captured;
  }

  /**
   * Durable blobs first, then the record, then the frees. A capture older than the
   * last commit does not commit (the record never goes back), but its blobs are
   * still synced and its frees are still safe: a newer tree no longer uses them.
   */
  private async completeCommit<T>(captured: Capture, share?: ShareBuilder<T>): Promise<T | undefined> {
    const timer = storeCommits.startTimer();
    try {
      const shared = await this.completeCommitTimed(captured, share);
      this.settledThrough = Math.max(this.settledThrough, captured.at);
      return shared;
    } finally {
      this.capturesInFlight--;
      timer();
    }
  }

  /**
   * Whether every blob this volume took before `time` is now in its committed tree or
   * freed: a commit of a later capture completed, or nothing is pending at all.
   */
  settledSince(time: number): boolean {
    if (this.state !== 'open') return true;
    return this.settledThrough > time || (this.changedAt === undefined && this.capturesInFlight === 0 && this.tree.dirtyNodeCount === 0);
  }

  private async completeCommitTimed<T>(captured: Capture, share?: ShareBuilder<T>): Promise<T | undefined> {
    // What an earlier commit that failed (etcd or S3 unreachable) left to do rides along:
    // its blobs are in the live tree, and its frees are still safe after a later commit.
    const sync = [...captured.sync, ...this.pendingSync.splice(0)];
    const free = this.tree.frees.takeForCommit(captured.free);
    const r = this.record;
    const { shape } = captured;
    const changed = shape.root !== r.root || shape.depth !== r.depth || shape.sizeBytes !== r.sizeBytes;
    let shared: T | undefined;
    try {
      // What the blob store needs the commit to carry (the index of blobs it packed) rides in each transaction below.
      const durable = await this.syncForCommit(sync);
      // Lost while its blobs were synced: nothing may commit, and what the capture would free is
      // in the tree the new owner took over (committing nothing is not success: the flush fails).
      if (this.state === 'lost') throw this.lostError();
      if (share) {
        // Taken under the lock held since the capture (commitShared): the tree is the captured one, and no commit is newer.
        assert(this.tree.root === shape.root && this.tree.dirtyNodeCount === 0, 'a shared commit commits the tree as captured');
        assert(captured.sequence > this.committedCapture, 'a shared commit is of the newest capture');
        const sharedShape = { ...shape, root: asShared(shape.root) };
        const built = await share({ ...this.record, ...sharedShape });
        if (await this.commitRecord(sharedShape, captured.sequence, { absent: built.absent, ops: [...built.ops, ...durable.ops] })) {
          this.tree.shareRoot();
          shared = built.value;
          durable.committed();
        } else if (changed) {
          if (!(await this.commitRecord(shape, captured.sequence, { ops: durable.ops }))) {
            throw new ArborError('aborted', `volume ${this.name}: its catalog record changed under its owner; reopen the store`);
          }
          durable.committed();
        }
      } else if (changed && captured.sequence > this.committedCapture && this.state === 'open') {
        if (!(await this.commitRecord(shape, captured.sequence, { ops: durable.ops }))) {
          throw new ArborError('aborted', `volume ${this.name}: its catalog record changed under its owner; reopen the store`);
        }
        durable.committed();
      } else if (changed && this.state === 'open') {
        // A newer commit went first; the next one carries what this one would have (its blobs are synced: nothing to upload).
        this.pendingSync.push(...sync);
      }
    } catch (err) {
      // Every commit (flush, snapshot, clone, resize, close) passes a full disk on to the reserve.
      this.ctx.space?.noticeFailure(err);
      if (this.state === 'open') {
        this.pendingSync.push(...sync);
        this.tree.frees.retryLater(free);
        this.changedAt ??= Date.now();
      }
      throw err;
    }
    if (!changed) {
      // Nothing was committed: the committed tree may still use what earlier captures
      // dropped. (This capture's own frees, if any, are blobs taken and dropped since
      // the last commit, as when a volume written and then trimmed whole is back at its
      // committed shape: never in a committed tree, but they wait all the same.)
      this.tree.frees.retryLater(free);
      return shared;
    }
    await this.ctx.free(free);
    return shared;
  }

  private async syncForCommit(ids: number[]): Promise<DurableForCommit> {
    if (this.ctx.blobs.syncForCommit) return this.ctx.blobs.syncForCommit(ids);
    await this.ctx.blobs.sync(ids);
    return { ops: [], committed() {} };
  }

  /** Blobs of captures whose commit failed: synced with the next commit (their frees wait in the tree's AfterCommit). */
  private readonly pendingSync: number[] = [];

  /** Commits happen one at a time, in the order they were asked for. */
  private serialCommit<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.commits.then(fn);
    this.commits = run.then(
      () => undefined,
      () => undefined,
    );
    return run;
  }

  private noteChange(): void {
    this.changedAt ??= Date.now();
    if (this.tree.dirtyNodeCount > maxDirtyNodesPerVolume) this.onBusy(this);
  }

  private checkRange(offset: number, length: number, what: string): void {
    this.checkOpen();
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new ArborError('invalid-argument', `volume ${this.name}: ${what} needs a non-negative whole offset and length, got ${offset} and ${length}`);
    }
    if (offset + length > this.tree.sizeBytes) {
      throw new ArborError(
        'out-of-range',
        `volume ${this.name}: ${what} of ${length} bytes at offset ${offset} ends past the end of the volume (${this.tree.sizeBytes} bytes)`,
      );
    }
  }

  /** What every commit of this volume compares: its last committed record, and its owner key. */
  private guards(): Compare[] {
    return this.guard ? [unchanged(this.committed), this.guard] : [unchanged(this.committed)];
  }

  /** After a failed commit: if the owner key moved, this process lost the volume and stops serving it. */
  private async checkStillOwned(): Promise<void> {
    if (!this.guard) return;
    const owner = await this.ctx.catalog.get(this.guard.key);
    if (owner?.modRevision === this.guard.modRevision) return;
    this.markLost(owner ? `node ${decodeOwner(owner).nodeId} owns it now` : 'its owner lease ended');
    throw this.lostError();
  }

  /**
   * This process no longer owns the volume: every later call fails, and nothing it
   * held back is committed. Writes acknowledged but never flushed are lost, as
   * NBD allows; a flush or FUA write could not have been acknowledged.
   */
  markLost(reason: string): void {
    if (this.state !== 'open') return;
    this.state = 'lost';
    this.lostReason = reason;
    // Not ours to free: another process owns the volume and its tree now.
    this.tree.discardChanges();
    this.changedAt = undefined;
  }

  private lostError(): ArborError {
    return new ArborError(
      'unavailable',
      `volume ${this.name}: this node lost its ownership (${this.lostReason ?? 'unknown'}); writes since the last flush were not made durable`,
    );
  }

  private checkOpen(): void {
    if (this.state === 'lost') throw this.lostError();
    if (this.state === 'deleted') throw new ArborError('not-found', `volume ${this.name} was deleted`);
    if (this.state === 'closed') throw new ArborError('unavailable', `volume ${this.name} is closed`);
  }

  private async shared<T>(fn: () => Promise<T>): Promise<T> {
    const wait = this.lock.shared();
    if (wait) await wait;
    try {
      return await fn();
    } finally {
      this.lock.releaseShared();
    }
  }

  private async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const wait = this.lock.exclusive();
    if (wait) await wait;
    try {
      return await fn();
    } finally {
      this.lock.releaseExclusive();
    }
  }
}
