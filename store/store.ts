import { Log, silentLog } from '../lib/logger';
import { gcFreedBlobs, gcLastSeconds, gcRuns } from '../lib/metrics';
import { BlobIdAllocator, committedMarks } from './allocator';
import { classOf, serialOf } from './blob-id';
import { BlobStore } from './blobs/blobs';
import { Catalog, Compare, KvEntry, Op, absent, del, put, unchanged } from './catalog/catalog';
import { StoreContext } from './context';
import { EMPTY, asShared } from './entry';
import { ArborError, isArborError } from './errors';
import { GcReport, markAndSweep } from './gc';
import { depthFor, extentCountFor, validateExtentSize, validateVolumeSize } from './geometry';
import { commitIntervalMs, defaultExtentSizeBytes } from './limits';
import { NodeCache } from './node-cache';
import {
  GroupSnapshotRecord,
  LineageStep,
  Publications,
  SnapshotRecord,
  VolumeRecord,
  formatVersion,
  keys,
  newGroupId,
  newSnapshotId,
  newVolumeId,
  validateName,
} from './records';
import { SnapshotReader } from './snapshot-reader';
import { NodeSource, countExtents } from './tree';
import { OwnedElsewhere, Ownership, ownerKey } from './ownership';
import { OwnerOp, OwnerRequests } from './owner-requests';
import { GroupMember, HeldForGroup, abortUnlessDecided, awaitOutcome, newGroupToken, outcomeInTransaction } from './group-holds';
import { Volume } from './volume';
import { defaultOwnerLeaseTtlMs } from './limits';
import os from 'node:os';

export type Ref = { name: string } | { id: string };

export type CloneSource = { volume: Ref } | { snapshot: Ref };

export interface StoreOptions {
  /** This process's name in ownership records (default: the host name). */
  nodeId?: string;
  /** How long this process's owner lease lives without keep-alives. */
  leaseTtlMs?: number;
}

/** A counted use of an open volume; the last release lets it go where volumes have owners. */
export interface VolumeHandle {
  volume: Volume;
  release(): Promise<void>;
}

export interface VolumeUsage {
  /** Bytes of extents the volume maps to data (shared or its own). */
  allocatedBytes: number;
  /** Bytes of extents only this volume holds: what deleting it frees at once. */
  exclusiveBytes: number;
}

const backgroundTickMs = 1000;

/** Present while a collector pass runs somewhere (where processes share the catalog). */
const gcPassKey = 'gc/pass';

/**
 * The copy-on-write volume store: volume heads, snapshots and clones over a catalog
 * and a blob store. Snapshot and clone are one catalog transaction each, whatever
 * the size of the volume; I/O goes through the open `Volume`, which is the only
 * writer of its head's record.
 */
export class Store {
  readonly ctx: StoreContext;
  private readonly open = new Map<string, Volume>();
  private readonly opening = new Map<string, Promise<Volume>>();
  /** Volumes being let go: a new user waits, then opens afresh. */
  private readonly closing = new Map<string, Promise<void>>();
  /** Uses of each open volume object (a volume lost and opened again is a new object, counted afresh). */
  private readonly users = new Map<Volume, number>();
  /** Opened with openVolume: kept until the store closes. */
  private readonly pinned = new Set<string>();
  private heldFrees?: number[];
  private gcPass?: Promise<GcReport>;
  /** Set while the collector takes its cut: no volume may open until it is taken. */
  private cutting?: Promise<void>;
  private timers: NodeJS.Timeout[] = [];
  private closed = false;

  private constructor(
    catalog: Catalog,
    blobs: BlobStore,
    private readonly log: Log,
    /** Present where the catalog is shared: volumes are owned, one process at a time. */
    readonly ownership?: Ownership,
  ) {
    this.ctx = {
      catalog,
      blobs,
      nodes: new NodeCache(blobs),
      ids: new BlobIdAllocator(catalog, ownership ? () => ownership.currentLease() : undefined),
      free: (ids) => this.free(ids),
    };
    this.timers.push(setInterval(() => void this.commitIdleVolumes(), backgroundTickMs).unref());
    ownership?.onLost((reason) => this.loseEveryVolume(reason));
    if (ownership) this.requests = new OwnerRequests(catalog, ownership, log);
  }

  /** Requests to and from other processes that own volumes (where volumes have owners). */
  private readonly requests?: OwnerRequests;

  static async open(catalog: Catalog, blobs: BlobStore, log: Log = silentLog, options: StoreOptions = {}): Promise<Store> {
    const format = await catalog.get(keys.format);
    if (!format) {
      await catalog.txn([absent(keys.format)], [put(keys.format, formatVersion)]);
    } else if (JSON.parse(format.value) !== formatVersion) {
      throw new ArborError('failed-precondition', `the store has format ${format.value}; this arbor reads format ${formatVersion}`);
    }
    const ownership = catalog.exclusive
      ? undefined
      : await Ownership.start(catalog, options.nodeId ?? os.hostname(), options.leaseTtlMs ?? defaultOwnerLeaseTtlMs, log);
    const store = new Store(catalog, blobs, log, ownership);
    await store.requests?.serve((op) => store.runForAsker(op));
    return store;
  }

  /** Runs what another process asked of a volume this one owns. */
  private async runForAsker(op: OwnerOp): Promise<unknown> {
    const ref = { id: op.volumeId };
    switch (op.op) {
      case 'createSnapshot':
        return this.createSnapshot(ref, op.name);
      case 'cloneVolume':
        return this.cloneVolume(op.name, { volume: ref }, { labels: op.labels });
      case 'resizeVolume':
        return this.resizeVolume(ref, op.sizeBytes);
      case 'deleteVolume':
        return this.deleteVolume(ref);
      case 'volumeUsage':
        return this.volumeUsage(ref);
      case 'holdForGroup':
        return this.holdForGroup(op.volumeId, op.token);
    }
  }

  /**
   * Runs `local` on the volume opened here; where another live process owns it, asks
   * that process instead (`remote`), and tries again here if it let go meanwhile.
   */
  private async onOwner<T>(ref: Ref, local: (volume: Volume) => Promise<T>, remote: (volumeId: string) => OwnerOp): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.withVolume(ref, local);
      } catch (err) {
        if (!(err instanceof OwnedElsewhere) || !this.requests) throw err;
        const record = await this.getVolume(ref);
        try {
          return (await this.requests.ask(err.owner, remote(record.id))) as T;
        } catch (asked) {
          if (isArborError(asked, 'aborted') && attempt < 3) continue;
          throw asked;
        }
      }
    }
  }

  /** The node id this store owns volumes as, where volumes have owners. */
  get nodeId(): string | undefined {
    return this.ownership?.nodeId;
  }

  /** Runs the collector every `gcIntervalMs` in the background. */
  collectPeriodically(gcIntervalMs: number): void {
    this.timers.push(
      setInterval(() => {
        this.collectGarbage().catch((err) => this.log.error('background garbage collection failed', { error: (err as Error).message }));
      }, gcIntervalMs).unref(),
    );
  }

  // ---- volumes ----

  async createVolume(name: string, options: { sizeBytes: number; extentSizeBytes?: number; labels?: Record<string, string> }): Promise<VolumeRecord> {
    validateName(name, 'volume');
    const extentSizeBytes = options.extentSizeBytes ?? defaultExtentSizeBytes;
    validateVolumeSize(options.sizeBytes, `volume ${name}`);
    validateExtentSize(extentSizeBytes, `volume ${name}`);
    for (;;) {
      const existing = await this.findVolume({ name });
      if (existing) {
        if (existing.sizeBytes === options.sizeBytes && existing.extentSizeBytes === extentSizeBytes && existing.lineage.length === 0) return existing;
        throw new ArborError(
          'already-exists',
          `volume ${name} already exists with size ${existing.sizeBytes} and extent size ${existing.extentSizeBytes}${existing.lineage.length ? ` (cloned from ${describeStep(existing.lineage[0])})` : ''}`,
        );
      }
      const record: VolumeRecord = {
        id: newVolumeId(),
        name,
        sizeBytes: options.sizeBytes,
        extentSizeBytes,
        depth: depthFor(extentCountFor(options.sizeBytes, extentSizeBytes)),
        root: EMPTY,
        createdAt: new Date().toISOString(),
        lineage: [],
        ...(options.labels ? { labels: options.labels } : {}),
      };
      const result = await this.ctx.catalog.txn([absent(keys.volumeName(name))], [put(keys.volume(record.id), record), put(keys.volumeName(name), record.id)]);
      if (result.succeeded) {
        this.log.info('volume created', { volume: name, id: record.id, sizeBytes: record.sizeBytes, extentSizeBytes });
        return record;
      }
    }
  }

  /** A new volume sharing every block of a snapshot, or of a volume as it is now. O(1). */
  async cloneVolume(name: string, source: CloneSource, options: { labels?: Record<string, string> } = {}): Promise<VolumeRecord> {
    validateName(name, 'volume');
    for (;;) {
      const sourceDescription = 'snapshot' in source ? await this.snapshotStep(source.snapshot) : await this.volumeStep(source.volume);
      const existing = await this.findVolume({ name });
      if (existing) {
        const step = existing.lineage[0];
        if (step && step.volumeId === sourceDescription.volumeId && step.snapshotId === sourceDescription.snapshotId) return existing;
        throw new ArborError(
          'already-exists',
          `volume ${name} already exists${step ? ` as a clone of ${describeStep(step)}` : ''}; it is not a clone of ${describeStep(sourceDescription)}`,
        );
      }
      const created =
        'snapshot' in source
          ? await this.cloneSnapshot(name, source.snapshot, options.labels)
          : await this.cloneLiveVolume(name, source.volume, options.labels);
      if (created) {
        this.log.info('volume cloned', { volume: name, id: created.id, from: describeStep(created.lineage[0]) });
        return created;
      }
    }
  }

  private async cloneSnapshot(name: string, ref: Ref, labels?: Record<string, string>): Promise<VolumeRecord | undefined> {
    const entry = await this.snapshotEntry(ref);
    const snapshot = JSON.parse(entry.value) as SnapshotRecord;
    const record: VolumeRecord = {
      id: newVolumeId(),
      name,
      sizeBytes: snapshot.sizeBytes,
      extentSizeBytes: snapshot.extentSizeBytes,
      depth: snapshot.depth,
      root: asShared(snapshot.root),
      createdAt: new Date().toISOString(),
      lineage: [{ volumeId: snapshot.volumeId, volumeName: snapshot.volumeName, snapshotId: snapshot.id, snapshotName: snapshot.name }, ...snapshot.lineage],
      ...(labels ? { labels } : {}),
    };
    const result = await this.ctx.catalog.txn(
      [unchanged(entry), absent(keys.volumeName(name))],
      [put(keys.volume(record.id), record), put(keys.volumeName(name), record.id)],
    );
    return result.succeeded ? record : undefined;
  }

  private async cloneLiveVolume(name: string, ref: Ref, labels?: Record<string, string>): Promise<VolumeRecord | undefined> {
    const entry = await this.findVolumeEntry(ref);
    if (entry && !(await this.findVolume({ name }))) {
      const record = cloneRecordOf(JSON.parse(entry.value) as VolumeRecord, name, labels);
      if (await this.shareDetached(entry, [keys.volumeName(name)], [put(keys.volume(record.id), record), put(keys.volumeName(name), record.id)])) return record;
    }
    return this.onOwner(
      ref,
      (volume) => this.cloneOpenVolume(volume, name, labels),
      (volumeId) => ({ op: 'cloneVolume', volumeId, name, labels }),
    );
  }

  /**
   * Shares the root of a volume that no process has open, in one transaction with
   * `ops`: its record unchanged and (where volumes have owners) no owner key, so no
   * write can be in flight anywhere. Three catalog round trips instead of opening
   * the volume. False when the volume is open, here or elsewhere, or changed.
   */
  private async shareDetached(entry: KvEntry, absentKeys: string[], ops: Op[]): Promise<boolean> {
    const source = JSON.parse(entry.value) as VolumeRecord;
    if (this.open.has(source.id) || this.opening.has(source.id) || this.closing.has(source.id)) return false;
    const compares: Compare[] = [unchanged(entry), absent(ownerKey(source.id)), ...absentKeys.map(absent)];
    // No await between the check above and the transaction: nothing in this process can open the volume in between.
    const result = await this.ctx.catalog.txn(compares, [put(keys.volume(source.id), { ...source, root: asShared(source.root) }), ...ops]);
    return result.succeeded;
  }

  private async cloneOpenVolume(volume: Volume, name: string, labels?: Record<string, string>): Promise<VolumeRecord | undefined> {
    return volume.withCommitted(async (_committed, source) => {
      const record = cloneRecordOf(source, name, labels);
      const done = await volume.commitWith({
        absent: [keys.volumeName(name)],
        ops: [put(keys.volume(record.id), record), put(keys.volumeName(name), record.id)],
        share: true,
      });
      return done ? record : undefined;
    });
  }

  async resizeVolume(ref: Ref, sizeBytes: number): Promise<VolumeRecord> {
    return this.onOwner(
      ref,
      async (volume) => {
        validateVolumeSize(sizeBytes, `volume ${volume.name}`);
        await volume.resize(sizeBytes);
        this.log.info('volume resized', { volume: volume.name, sizeBytes });
        return volume.info();
      },
      (volumeId) => ({ op: 'resizeVolume', volumeId, sizeBytes }),
    );
  }

  async deleteVolume(ref: Ref): Promise<void> {
    const record = await this.getVolume(ref);
    const published = Object.keys((await this.publications(record.id)).nodes);
    if (published.length > 0) {
      throw new ArborError('failed-precondition', `volume ${record.name} is published to node ${published.join(', ')}; unpublish it first`);
    }
    await this.onOwner(
      { id: record.id },
      async (volume) => {
        await volume.delete([del(keys.volume(volume.id)), del(keys.volumeName(volume.name))]);
        if (this.open.get(volume.id) === volume) this.open.delete(volume.id);
        this.pinned.delete(volume.id);
        this.log.info('volume deleted', { volume: volume.name, id: volume.id });
      },
      (volumeId) => ({ op: 'deleteVolume', volumeId }),
    );
  }

  async getVolume(ref: Ref): Promise<VolumeRecord> {
    const record = await this.findVolume(ref);
    if (!record) throw notFound('volume', ref);
    return record;
  }

  async findVolume(ref: Ref): Promise<VolumeRecord | undefined> {
    const entry = await this.findVolumeEntry(ref);
    return entry && (JSON.parse(entry.value) as VolumeRecord);
  }

  async listVolumes(): Promise<VolumeRecord[]> {
    return (await this.ctx.catalog.list(keys.volumes)).map((entry) => JSON.parse(entry.value) as VolumeRecord).sort(byName);
  }

  /** The volume's I/O handle, opened once and kept open (owned) until the store closes. */
  async openVolume(ref: Ref): Promise<Volume> {
    const { volume } = await this.acquireVolume(ref);
    this.pinned.add(volume.id);
    return volume;
  }

  /**
   * A counted use of the volume, opened once and shared by every user. Where volumes
   * have owners, opening takes ownership (OwnedElsewhere when a live process has it)
   * and the last release commits and lets go, so another node can take it.
   */
  async acquireVolume(ref: Ref): Promise<VolumeHandle> {
    this.checkOpen();
    if (this.cutting) await this.cutting;
    const entry = await this.findVolumeEntry(ref);
    if (!entry) throw notFound('volume', ref);
    const { id, name } = JSON.parse(entry.value) as VolumeRecord;
    const volume = await this.openShared(id, name, ref);
    this.users.set(volume, (this.users.get(volume) ?? 0) + 1);
    let released = false;
    return {
      volume,
      release: async () => {
        if (released) return;
        released = true;
        await this.releaseUse(id, volume);
      },
    };
  }

  /** Runs `fn` on the volume, opened here; see acquireVolume. */
  private async withVolume<T>(ref: Ref, fn: (volume: Volume) => Promise<T>): Promise<T> {
    const handle = await this.acquireVolume(ref);
    try {
      return await fn(handle.volume);
    } finally {
      await handle.release();
    }
  }

  private async openShared(id: string, name: string, ref: Ref): Promise<Volume> {
    for (;;) {
      const closing = this.closing.get(id);
      if (closing) await closing;
      const open = this.open.get(id);
      if (open) return open;
      let opening = this.opening.get(id);
      if (!opening) {
        opening = (async () => {
          const guard = this.ownership ? await this.ownership.acquire(id, name) : undefined;
          try {
            // Read after acquiring: the last owner's final commit is in.
            const fresh = await this.ctx.catalog.get(keys.volume(id));
            if (!fresh) throw notFound('volume', ref);
            const volume = new Volume(this.ctx, fresh, (busy) => void busy.commitInBackground(), guard);
            this.open.set(id, volume);
            return volume;
          } catch (err) {
            if (guard) await this.ownership!.release(guard);
            throw err;
          }
        })().finally(() => this.opening.delete(id));
        this.opening.set(id, opening);
      }
      const volume = await opening;
      if (!this.closing.has(id)) return volume;
    }
  }

  private async releaseUse(id: string, volume: Volume): Promise<void> {
    const left = (this.users.get(volume) ?? 1) - 1;
    if (left > 0) {
      this.users.set(volume, left);
      return;
    }
    this.users.delete(volume);
    // The embedded store owns everything: volumes stay open. Elsewhere, let go.
    if (!this.ownership || this.pinned.has(id) || this.open.get(id) !== volume) return;
    const letGo = (async () => {
      try {
        if (volume.isOpen) await volume.close();
      } finally {
        this.open.delete(id);
        if (volume.guard)
          await this.ownership!.release(volume.guard).catch((err) =>
            this.log.warn('letting go of a volume failed; retrying in the background', { volume: volume.name, error: (err as Error).message }),
          );
      }
    })().finally(() => this.closing.delete(id));
    this.closing.set(id, letGo);
    await letGo;
  }

  /** The owner lease ended: nothing this process held is its own any more. */
  private loseEveryVolume(reason: string): void {
    this.ctx.ids.abandonBatches();
    for (const volume of this.open.values()) volume.markLost(reason);
    this.open.clear();
    this.users.clear();
    this.pinned.clear();
  }

  async volumeUsage(ref: Ref): Promise<VolumeUsage> {
    const record = await this.getVolume(ref);
    const volume = this.open.get(record.id);
    if (volume) await volume.flush();
    else if (this.ownership) {
      // Another process may hold writes of it that are not committed yet: ask it to commit.
      const owner = await this.ownership.ownerOf(record.id);
      if (owner && owner.lease !== (await this.ownership.currentLease()).id)
        return (await this.requests!.ask(owner, { op: 'volumeUsage', volumeId: record.id })) as VolumeUsage;
    }
    const current = await this.getVolume({ id: record.id });
    const counts = await countExtents(this.nodeSource(), current.root, current.depth);
    return { allocatedBytes: counts.data * current.extentSizeBytes, exclusiveBytes: counts.owned * current.extentSizeBytes };
  }

  // ---- snapshots ----

  /** A consistent point-in-time snapshot: every write completed before the call, none after it. */
  async createSnapshot(volumeRef: Ref, name: string): Promise<SnapshotRecord> {
    validateName(name, 'snapshot');
    const entry = await this.findVolumeEntry(volumeRef);
    if (!entry) throw notFound('volume', volumeRef);
    const existing = await this.findSnapshot({ name });
    if (existing) {
      if (existing.volumeId === (JSON.parse(entry.value) as VolumeRecord).id) return existing;
      throw new ArborError('already-exists', `snapshot name ${name} is already used by volume ${existing.volumeName}; snapshot names are unique in the store`);
    }
    // A detached volume: one transaction. Otherwise through the volume's owner.
    {
      const record = snapshotRecordOf(JSON.parse(entry.value) as VolumeRecord, name);
      if (await this.shareDetached(entry, [keys.snapshotName(name)], [put(keys.snapshot(record.id), record), put(keys.snapshotName(name), record.id)])) {
        this.log.info('snapshot created', { volume: record.volumeName, snapshot: name, id: record.id });
        return record;
      }
    }
    return this.onOwner(
      volumeRef,
      (volume) => this.snapshotOpenVolume(volume, name),
      (volumeId) => ({ op: 'createSnapshot', volumeId, name }),
    );
  }

  private async snapshotOpenVolume(volume: Volume, name: string): Promise<SnapshotRecord> {
    for (;;) {
      const existing = await this.findSnapshot({ name });
      if (existing) {
        if (existing.volumeId === volume.id) return existing;
        throw new ArborError(
          'already-exists',
          `snapshot name ${name} is already used by volume ${existing.volumeName}; snapshot names are unique in the store`,
        );
      }
      const created = await volume.withCommitted(async (_committed, source) => {
        const record = snapshotRecordOf(source, name);
        const done = await volume.commitWith({
          absent: [keys.snapshotName(name)],
          ops: [put(keys.snapshot(record.id), record), put(keys.snapshotName(name), record.id)],
          share: true,
        });
        return done ? record : undefined;
      });
      if (created) {
        this.log.info('snapshot created', { volume: volume.name, snapshot: name, id: created.id });
        return created;
      }
    }
  }

  /** Forgets the snapshot; the blobs only it held are reclaimed by the next collector pass. */
  async deleteSnapshot(ref: Ref): Promise<void> {
    for (;;) {
      const entry = await this.findSnapshotEntry(ref);
      if (!entry) throw notFound('snapshot', ref);
      const record = JSON.parse(entry.value) as SnapshotRecord;
      if (record.groupId) {
        throw new ArborError('failed-precondition', `snapshot ${record.name} belongs to group snapshot ${record.groupId}; delete the group snapshot`);
      }
      const result = await this.ctx.catalog.txn([unchanged(entry)], [del(keys.snapshot(record.id)), del(keys.snapshotName(record.name))]);
      if (result.succeeded) {
        this.log.info('snapshot deleted', { snapshot: record.name, id: record.id });
        return;
      }
    }
  }

  async getSnapshot(ref: Ref): Promise<SnapshotRecord> {
    const record = await this.findSnapshot(ref);
    if (!record) throw notFound('snapshot', ref);
    return record;
  }

  async findSnapshot(ref: Ref): Promise<SnapshotRecord | undefined> {
    const entry = await this.findSnapshotEntry(ref);
    return entry && (JSON.parse(entry.value) as SnapshotRecord);
  }

  /** Every snapshot, or those taken of one volume. */
  async listSnapshots(volumeRef?: Ref): Promise<SnapshotRecord[]> {
    const all = (await this.ctx.catalog.list(keys.snapshots)).map((entry) => JSON.parse(entry.value) as SnapshotRecord);
    if (!volumeRef) return all.sort(byName);
    const matches = 'id' in volumeRef ? (s: SnapshotRecord) => s.volumeId === volumeRef.id : (s: SnapshotRecord) => s.volumeName === volumeRef.name;
    return all.filter(matches).sort(byName);
  }

  async openSnapshot(ref: Ref): Promise<SnapshotReader> {
    return new SnapshotReader(await this.getSnapshot(ref), this.nodeSource(), this.ctx.blobs);
  }

  // ---- group snapshots ----

  /**
   * Snapshots of several volumes at one instant: every volume is held (in id order)
   * and committed, then one catalog transaction writes every snapshot, shares every
   * root and records the group. A crash leaves all of it or none of it.
   */
  async createGroupSnapshot(name: string, volumeRefs: Ref[]): Promise<GroupSnapshotRecord> {
    validateName(name, 'group snapshot');
    if (volumeRefs.length === 0) throw new ArborError('invalid-argument', `group snapshot ${name}: give at least one volume`);
    const ids = [...new Set((await Promise.all(volumeRefs.map((ref) => this.getVolume(ref)))).map((v) => v.id))].sort();
    for (;;) {
      const existing = await this.findGroupSnapshot({ name });
      if (existing) {
        if ([...existing.volumeIds].sort().join() === ids.join()) return existing;
        throw new ArborError('already-exists', `group snapshot ${name} already exists with other volumes`);
      }
      const created = await this.snapshotGroupOnce(name, ids);
      if (created) {
        this.log.info('group snapshot created', { group: name, id: created.id, volumes: created.volumeIds });
        return created;
      }
    }
  }

  /**
   * Holds every volume of the group (in id order): those open here or detached are
   * held here; those another process owns are held by their owners, who wait for the
   * group's outcome. Then one transaction, or none.
   */
  private async snapshotGroupOnce(name: string, ids: string[]): Promise<GroupSnapshotRecord | undefined> {
    const token = newGroupToken();
    const members: GroupMember[] = [];
    let remote = false;
    try {
      for (const id of ids) {
        try {
          members.push(await this.holdMember(await this.acquireVolume({ id })));
        } catch (err) {
          if (!(err instanceof OwnedElsewhere) || !this.requests) throw err;
          remote = true;
          const held = (await this.requests.ask(err.owner, { op: 'holdForGroup', volumeId: id, token })) as HeldForGroup;
          // The owner applies the outcome and releases the volume itself.
          members.push({ volumeId: id, volumeName: held.next.name, compares: held.compares, next: held.next, committed: () => {}, release: () => {} });
        }
      }
      return await this.snapshotTogether(name, members, remote ? token : undefined);
    } finally {
      // Owners still holding learn the outcome: committed, or aborted now.
      if (remote)
        await abortUnlessDecided(this.ctx.catalog, token).catch((err) =>
          this.log.warn('could not decide a group snapshot outcome; owners decide it after their timeout', { error: (err as Error).message }),
        );
      for (const member of members) member.release();
    }
  }

  /** Another process asks this one, which owns the volume, to hold it for a group snapshot. */
  private async holdForGroup(volumeId: string, token: string): Promise<HeldForGroup> {
    const member = await this.holdMember(await this.acquireVolume({ id: volumeId }));
    awaitOutcome(this.ctx.catalog, token, member, this.log);
    return { compares: member.compares, next: member.next };
  }

  /** Holds an open volume: writes wait, acknowledged ones are committed; release lets go of both. */
  private async holdMember(handle: VolumeHandle): Promise<GroupMember> {
    const volume = handle.volume;
    let unhold: () => void;
    try {
      unhold = await volume.hold();
    } catch (err) {
      await handle.release();
      throw err;
    }
    try {
      await volume.flushWhileHeld();
      const share = volume.prepareShare();
      return {
        volumeId: volume.id,
        volumeName: volume.name,
        compares: share.compares,
        next: share.next,
        committed: share.committed,
        release: () => {
          unhold();
          void handle.release();
        },
      };
    } catch (err) {
      unhold();
      await handle.release();
      throw err;
    }
  }

  private async snapshotTogether(name: string, members: GroupMember[], token?: string): Promise<GroupSnapshotRecord | undefined> {
    const group: GroupSnapshotRecord = {
      id: newGroupId(),
      name,
      volumeIds: members.map((m) => m.volumeId),
      snapshotIds: [],
      createdAt: new Date().toISOString(),
    };
    const compares: Compare[] = [absent(keys.groupName(name))];
    const ops: Op[] = [];
    members.forEach((member, i) => {
      const snapshot: SnapshotRecord = {
        id: newSnapshotId(),
        name: `${name}.${i}`,
        volumeId: member.volumeId,
        volumeName: member.volumeName,
        sizeBytes: member.next.sizeBytes,
        extentSizeBytes: member.next.extentSizeBytes,
        depth: member.next.depth,
        root: member.next.root,
        createdAt: group.createdAt,
        lineage: member.next.lineage,
        groupId: group.id,
      };
      group.snapshotIds.push(snapshot.id);
      compares.push(...member.compares, absent(keys.snapshotName(snapshot.name)));
      ops.push(put(keys.volume(member.volumeId), member.next), put(keys.snapshot(snapshot.id), snapshot), put(keys.snapshotName(snapshot.name), snapshot.id));
    });
    ops.push(put(keys.group(group.id), group), put(keys.groupName(name), group.id));
    if (token) {
      const outcome = outcomeInTransaction(token);
      compares.push(outcome.compare);
      ops.push(outcome.op);
    }
    const result = await this.ctx.catalog.txn(compares, ops);
    if (!result.succeeded) {
      for (let i = 0; i < members.length; i++) {
        if (await this.findSnapshot({ name: `${name}.${i}` })) {
          throw new ArborError('already-exists', `snapshot name ${name}.${i}, which group snapshot ${name} needs, is taken`);
        }
      }
      return undefined;
    }
    for (const member of members) member.committed(result.revision);
    return group;
  }

  async findGroupSnapshot(ref: Ref): Promise<GroupSnapshotRecord | undefined> {
    const id = 'id' in ref ? ref.id : await this.idForName(keys.groupName(ref.name));
    const entry = id === undefined ? undefined : await this.ctx.catalog.get(keys.group(id));
    return entry && (JSON.parse(entry.value) as GroupSnapshotRecord);
  }

  async listGroupSnapshots(): Promise<GroupSnapshotRecord[]> {
    return (await this.ctx.catalog.list(keys.groups)).map((e) => JSON.parse(e.value) as GroupSnapshotRecord).sort(byName);
  }

  /** Deletes a group snapshot and every snapshot in it, in one transaction. */
  async deleteGroupSnapshot(ref: Ref): Promise<void> {
    for (;;) {
      const id = 'id' in ref ? ref.id : await this.idForName(keys.groupName(ref.name));
      const entry = id === undefined ? undefined : await this.ctx.catalog.get(keys.group(id));
      if (!entry) throw notFound('group snapshot', ref);
      const group = JSON.parse(entry.value) as GroupSnapshotRecord;
      const ops: Op[] = [del(keys.group(group.id)), del(keys.groupName(group.name))];
      const compares: Compare[] = [unchanged(entry)];
      for (const snapshotId of group.snapshotIds) {
        const snapshot = await this.ctx.catalog.get(keys.snapshot(snapshotId));
        if (!snapshot) continue;
        compares.push(unchanged(snapshot));
        ops.push(del(keys.snapshot(snapshotId)), del(keys.snapshotName((JSON.parse(snapshot.value) as SnapshotRecord).name)));
      }
      if ((await this.ctx.catalog.txn(compares, ops)).succeeded) {
        this.log.info('group snapshot deleted', { group: group.name, id: group.id });
        return;
      }
    }
  }

  // ---- nodes ----

  /** A node plugin announces itself, so a publication to an unknown node can be refused. */
  async registerNode(nodeId: string, info: { topology: Record<string, string> }): Promise<void> {
    if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/.test(nodeId)) throw new ArborError('invalid-argument', `node id ${JSON.stringify(nodeId)} is not valid`);
    await this.ctx.catalog.txn([], [put(keys.node(nodeId), { nodeId, ...info, registeredAt: new Date().toISOString() })]);
  }

  async findNode(nodeId: string): Promise<{ nodeId: string; topology: Record<string, string> } | undefined> {
    const entry = await this.ctx.catalog.get(keys.node(nodeId));
    return entry && JSON.parse(entry.value);
  }

  // ---- publications ----

  /** Where a volume is published. */
  async publications(volumeId: string): Promise<Publications> {
    const entry = await this.ctx.catalog.get(keys.publications(volumeId));
    return entry ? (JSON.parse(entry.value) as Publications) : { nodes: {} };
  }

  /**
   * Records that a volume is published to a node. A volume published for one node
   * at a time cannot be published to a second; publishing again to the same node
   * with the same read-only setting is a no-op, with another it is a conflict.
   */
  async publishVolume(volumeId: string, nodeId: string, options: { readOnly: boolean; multiNode: boolean }): Promise<void> {
    const volume = await this.getVolume({ id: volumeId });
    for (;;) {
      const entry = await this.ctx.catalog.get(keys.publications(volumeId));
      const current: Publications = entry ? JSON.parse(entry.value) : { nodes: {} };
      const mine = current.nodes[nodeId];
      if (mine) {
        if (mine.readOnly === options.readOnly && mine.multiNode === options.multiNode) return;
        throw new ArborError(
          'already-exists',
          `volume ${volume.name} is already published to node ${nodeId} ${mine.readOnly ? 'read-only' : 'read-write'}; unpublish it to change that`,
        );
      }
      const others = Object.entries(current.nodes);
      const exclusive = others.find(([, p]) => !p.multiNode) ?? (options.multiNode ? undefined : others[0]);
      if (exclusive) {
        throw new ArborError('failed-precondition', `volume ${volume.name} is published to node ${exclusive[0]} for one node only; unpublish it there first`);
      }
      current.nodes[nodeId] = { readOnly: options.readOnly, multiNode: options.multiNode, publishedAt: new Date().toISOString() };
      const result = await this.ctx.catalog.txn(
        [
          entry ? unchanged(entry) : absent(keys.publications(volumeId)),
          { key: keys.volume(volumeId), modRevision: (await this.ctx.catalog.get(keys.volume(volumeId)))?.modRevision ?? 0 },
        ],
        [put(keys.publications(volumeId), current)],
      );
      if (result.succeeded) return;
    }
  }

  /** Forgets a publication (all of them when `nodeId` is not given); unknown ones are fine. */
  async unpublishVolume(volumeId: string, nodeId?: string): Promise<void> {
    for (;;) {
      const entry = await this.ctx.catalog.get(keys.publications(volumeId));
      if (!entry) return;
      const current = JSON.parse(entry.value) as Publications;
      if (nodeId !== undefined && !current.nodes[nodeId]) return;
      if (nodeId !== undefined) delete current.nodes[nodeId];
      const empty = nodeId === undefined || Object.keys(current.nodes).length === 0;
      const result = await this.ctx.catalog.txn([unchanged(entry)], [empty ? del(keys.publications(volumeId)) : put(keys.publications(volumeId), current)]);
      if (result.succeeded) return;
    }
  }

  /** Space left for new data (the data directory's free space in the embedded store). */
  async availableBytes(): Promise<number | undefined> {
    return this.ctx.blobs.availableBytes();
  }

  /** True when the store is open and its catalog answers. */
  async healthy(): Promise<boolean> {
    if (this.closed) return false;
    await this.ctx.catalog.get(keys.format);
    return true;
  }

  // ---- garbage collection ----

  /**
   * One mark-and-sweep pass. It starts on a consistent cut: every open volume held
   * and committed, the allocator's watermark read, the catalog's roots listed; then
   * marking and sweeping run while volumes take writes again. Blobs that volumes free
   * meanwhile are held back until the pass ends, so every node the mark reads exists.
   */
  async collectGarbage(): Promise<GcReport> {
    this.checkOpen();
    this.gcPass ??= this.runGcPass().finally(() => (this.gcPass = undefined));
    return this.gcPass;
  }

  private async runGcPass(): Promise<GcReport> {
    this.heldFrees = [];
    // Where processes share the catalog: one collector at a time, announced by a key
    // that lives with this process's lease; while it is there, every process holds its frees.
    const lease = this.ownership ? await this.ownership.currentLease() : undefined;
    if (
      lease &&
      !(await this.ctx.catalog.txn([absent(gcPassKey)], [put(gcPassKey, { nodeId: this.nodeId, startedAt: new Date().toISOString() }, lease)])).succeeded
    ) {
      const running = await this.ctx.catalog.get(gcPassKey);
      this.heldFrees = undefined;
      throw new ArborError(
        'busy',
        `node ${running ? (JSON.parse(running.value) as { nodeId: string }).nodeId : 'another node'} is collecting garbage now; try again when it is done`,
      );
    }
    try {
      const { roots, allocatedAfter } = await this.takeCut();
      const report = await markAndSweep(this.ctx, roots, allocatedAfter);
      this.log.info('garbage collected', { ...report });
      gcRuns.inc();
      gcFreedBlobs.inc(report.freedBlobs);
      gcLastSeconds.set(report.durationMs / 1000);
      return report;
    } finally {
      const held = this.heldFrees;
      this.heldFrees = undefined;
      await this.ctx.blobs.delete(held);
      if (lease) await this.ctx.catalog.txn([], [del(gcPassKey)]).catch(() => {});
    }
  }

  private async takeCut(): Promise<{ roots: Array<{ root: number; depth: number }>; allocatedAfter: (id: number) => boolean }> {
    let cutTaken!: () => void;
    this.cutting = new Promise((resolve) => (cutTaken = resolve));
    const releases: Array<() => void> = [];
    try {
      while (this.opening.size > 0) await Promise.allSettled([...this.opening.values()]);
      const volumes = [...this.open.values()].sort((a, b) => (a.id < b.id ? -1 : 1));
      for (const volume of volumes) releases.push(await volume.hold());
      for (const volume of volumes) await volume.flushWhileHeld();
      let allocatedAfter = await this.ctx.ids.watermark();
      if (this.ownership) {
        // Other processes hand out ids too: anything at or above the committed marks
        // (read first), or inside a batch some process still holds (listed after), may
        // be in a tree not committed yet.
        const marks = await committedMarks(this.ctx.catalog);
        const held = await BlobIdAllocator.recordedBatches(this.ctx.catalog, (await this.ownership.currentLease()).id);
        const local = allocatedAfter;
        allocatedAfter = (id) => local(id) || serialOf(id) >= marks[classOf(id)] || held(id);
      }
      const records = [
        ...(await this.ctx.catalog.list(keys.volumes)).map((e) => JSON.parse(e.value) as VolumeRecord),
        ...(await this.ctx.catalog.list(keys.snapshots)).map((e) => JSON.parse(e.value) as SnapshotRecord),
      ];
      return { roots: records.map((r) => ({ root: r.root, depth: r.depth })), allocatedAfter };
    } finally {
      for (const release of releases) release();
      this.cutting = undefined;
      cutTaken();
    }
  }

  private async free(ids: number[]): Promise<void> {
    if (ids.length === 0) return;
    if (this.heldFrees) {
      this.heldFrees.push(...ids);
      return;
    }
    // A collector elsewhere may be marking from a cut that still reaches these blobs:
    // its key was written before it listed the roots, so if the key is absent now
    // (after our commit), any later pass lists roots that no longer reach them.
    if (this.ownership && (this.frozenFrees.length > 0 || (await this.ctx.catalog.get(gcPassKey)))) {
      this.frozenFrees.push(...ids);
      return;
    }
    await this.ctx.blobs.delete(ids);
  }

  /** Frees held while another node's collector ran; deleted once it is done. */
  private frozenFrees: number[] = [];

  private async releaseFrozenFrees(): Promise<void> {
    if (this.frozenFrees.length === 0 || (await this.ctx.catalog.get(gcPassKey))) return;
    const ids = this.frozenFrees.splice(0);
    await this.ctx.blobs.delete(ids);
  }

  // ---- life cycle ----

  private readonly closedListeners: Array<() => void> = [];

  /** Runs `fn` once the store has closed its backends. */
  onClosed(fn: () => void): void {
    this.closedListeners.push(fn);
  }

  /** Commits every open volume and closes the backends. */
  async close(): Promise<void> {
    if (this.closed) return;
    for (const timer of this.timers) clearInterval(timer);
    if (this.gcPass) await this.gcPass.catch(() => {});
    this.requests?.stop();
    for (const volume of this.open.values()) {
      await volume.close();
      if (volume.guard) await this.ownership!.release(volume.guard).catch(() => {});
    }
    await this.ownership?.close();
    await this.ctx.ids.release();
    this.closed = true;
    this.open.clear();
    await this.ctx.blobs.close();
    await this.ctx.catalog.close();
    for (const fn of this.closedListeners) fn();
  }

  private async commitIdleVolumes(): Promise<void> {
    const now = Date.now();
    for (const volume of this.open.values()) {
      const age = volume.uncommittedForMs(now);
      if (age !== undefined && age >= commitIntervalMs) await volume.commitInBackground();
    }
    if (this.ownership && !this.closed) {
      const volumes = [...this.open.values()];
      await this.ctx.ids.forgetSettledBatches((spentAt) => volumes.every((v) => v.settledSince(spentAt))).catch(() => {});
      await this.releaseFrozenFrees().catch(() => {});
    }
  }

  private nodeSource(): NodeSource {
    const nodes = this.ctx.nodes;
    return { cached: (id) => nodes.get(id), load: (id) => nodes.load(id) };
  }

  private async findVolumeEntry(ref: Ref): Promise<KvEntry | undefined> {
    const id = 'id' in ref ? ref.id : await this.idForName(keys.volumeName(ref.name));
    return id === undefined ? undefined : this.ctx.catalog.get(keys.volume(id));
  }

  private async findSnapshotEntry(ref: Ref): Promise<KvEntry | undefined> {
    const id = 'id' in ref ? ref.id : await this.idForName(keys.snapshotName(ref.name));
    return id === undefined ? undefined : this.ctx.catalog.get(keys.snapshot(id));
  }

  private async idForName(nameKey: string): Promise<string | undefined> {
    const entry = await this.ctx.catalog.get(nameKey);
    return entry && (JSON.parse(entry.value) as string);
  }

  private async snapshotEntry(ref: Ref): Promise<KvEntry> {
    const entry = await this.findSnapshotEntry(ref);
    if (!entry) throw notFound('snapshot', ref);
    return entry;
  }

  private async snapshotStep(ref: Ref): Promise<LineageStep> {
    const s = await this.getSnapshot(ref);
    return { volumeId: s.volumeId, volumeName: s.volumeName, snapshotId: s.id, snapshotName: s.name };
  }

  private async volumeStep(ref: Ref): Promise<LineageStep> {
    const v = await this.getVolume(ref);
    return { volumeId: v.id, volumeName: v.name };
  }

  private checkOpen(): void {
    if (this.closed) throw new ArborError('unavailable', 'the store is closed');
  }
}

function notFound(what: 'volume' | 'snapshot' | 'group snapshot', ref: Ref): ArborError {
  return new ArborError('not-found', 'id' in ref ? `${what} with id ${ref.id} does not exist` : `${what} ${ref.name} does not exist`);
}

/** A snapshot of `source` as it is now: its root, read-only. */
function snapshotRecordOf(source: VolumeRecord, name: string): SnapshotRecord {
  return {
    id: newSnapshotId(),
    name,
    volumeId: source.id,
    volumeName: source.name,
    sizeBytes: source.sizeBytes,
    extentSizeBytes: source.extentSizeBytes,
    depth: source.depth,
    root: asShared(source.root),
    createdAt: new Date().toISOString(),
    lineage: source.lineage,
  };
}

/** A new volume sharing every block of `source` as it is now. */
function cloneRecordOf(source: VolumeRecord, name: string, labels?: Record<string, string>): VolumeRecord {
  return {
    id: newVolumeId(),
    name,
    sizeBytes: source.sizeBytes,
    extentSizeBytes: source.extentSizeBytes,
    depth: source.depth,
    root: asShared(source.root),
    createdAt: new Date().toISOString(),
    lineage: [{ volumeId: source.id, volumeName: source.name }, ...source.lineage],
    ...(labels ? { labels } : {}),
  };
}

function describeStep(step: LineageStep): string {
  return step.snapshotName ? `snapshot ${step.volumeName}@${step.snapshotName}` : `volume ${step.volumeName}`;
}

function byName(a: { name: string }, b: { name: string }): number {
  return a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
}
