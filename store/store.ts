import assert from 'node:assert/strict';
import os from 'node:os';
import { settleBy } from '../lib/bounded';
import { Log, silentLog } from '../lib/logger';
import { BlobIdAllocator } from './allocator';
import { BlobStore } from './blobs/blobs';
import { Catalog, Compare, KvEntry, Op, absent, del, put, unchanged, writtenEntry } from './catalog/catalog';
import { Collector } from './collector';
import { StoreContext } from './context';
import { asShared } from './entry';
import { ArborError, isArborError } from './errors';
import { GcReport } from './gc';
import { validateExtentSize, validateVolumeSize } from './geometry';
import { GroupSnapshots } from './group-snapshots';
import {
  closeCatalogWithinMs,
  closeStepGraceMs,
  commitIntervalMs,
  defaultExtentSizeBytes,
  defaultOwnerLeaseTtlMs,
  maxSnapshotsPerTxn,
  seenSnapshotEntries,
  seenDetachedVolumeEntries,
} from './limits';
import { Lru } from '../lib/lru';
import { Ref, SnapshotRef, byName, notFound, snapshotEntry, volumeEntry, volumeIdOf } from './lookups';
import { openFormat } from './format';
import { NodeCache } from './node-cache';
import { OpenVolumes, VolumeHandle } from './open-volumes';
import { InlineAnswer, OwnerOp, OwnerRequests } from './owner-requests';
import { OwnedElsewhere, OwnerRecord, Ownership, decodeOwner, ownerKey } from './ownership';
import { PublicationRegistry, PublishOptions } from './publications';
import {
  GroupSnapshotRecord,
  LineageStep,
  NodeRecord,
  Publications,
  SnapshotRecord,
  VolumeRecord,
  decodeId,
  decodeSnapshot,
  decodeVolume,
  keys,
  cloneOfSnapshot,
  cloneRecordOf,
  describeStep,
  newVolumeRecord,
  snapshotDeletes,
  snapshotPuts,
  snapshotRecordOf,
  validateName,
} from './records';
import { Batches, Waiting } from './batches';
import { Page, PageOptions, recordsPage, snapshotsOfVolumePage } from './listing';
import { ReceivePlan, ReceiveStaging, Receives, isHiddenVolume } from './receive';
import { QosFollower, QosLimits, decodeQos, isUnlimited, qosKey, validateQos } from './qos';
import { SnapshotReader } from './snapshot-reader';
import { allocatedRanges, ByteRange, changedRanges } from './diff';
import { NodeSource, countExtents } from './tree';
import { SpaceReserve } from './space-reserve';
import { Volume } from './volume';

export type { Ref, SnapshotRef } from './lookups';
export type { Page, PageOptions } from './listing';

/** Where a snapshot's name is unique: among its volume's (the CLI, as rbd and zfs), or also across the store (CSI, as the spec asks). */
export type SnapshotScope = 'volume' | 'store';
export type { VolumeHandle } from './open-volumes';

export type CloneSource = { volume: Ref } | { snapshot: Ref };

export interface StoreOptions {
  /** This process's name in ownership records (default: the host name). */
  nodeId?: string;
  /** How long this process's owner lease lives without keep-alives. */
  leaseTtlMs?: number;
  /** Space held back on a local data directory's disk (the embedded store's). */
  space?: SpaceReserve;
}

export interface VolumeUsage {
  /** Bytes of extents the volume maps to data (shared or its own). */
  allocatedBytes: number;
  /** Bytes only this volume holds (whole extents, and the pages of partial extents' patches): what deleting it frees at once. */
  exclusiveBytes: number;
}

const backgroundTickMs = 1000;

/**
 * The copy-on-write volume store: volume heads, snapshots and clones over a catalog
 * and a blob store. Snapshot and clone are one catalog transaction each, whatever
 * the size of the volume; I/O goes through the open `Volume`, which is the only
 * writer of its head's record.
 */
export class Store {
  readonly ctx: StoreContext;
  private readonly volumes: OpenVolumes;
  private readonly collector: Collector;
  private readonly groups: GroupSnapshots;
  private readonly registry: PublicationRegistry;
  private readonly receives: Receives;
  /** The QoS limits of the volumes the NBD server here serves, kept current (store/qos.ts). */
  private readonly qos: QosFollower;
  /** Requests to and from other processes that own volumes (where volumes have owners). */
  private readonly requests?: OwnerRequests;
  /** Concurrent snapshots of one volume, made together (snapshotBatch). */
  private readonly snapshotBatches = new Batches<WantedSnapshot, SnapshotRecord>(
    maxSnapshotsPerTxn,
    (wanted) => wanted.name,
    (volumeId, batch) => this.snapshotBatch(volumeId, batch),
  );
  /**
   * Snapshot entries read lately by id (findSnapshot). A clone of one of them goes
   * straight to its transaction, which compares the entry unchanged and the name
   * absent: the CSI controller looks the source up (and the name) before it clones,
   * so the clone needs no read of its own. An entry gone stale (the snapshot deleted,
   * the name taken) fails that transaction and costs only the read it would have saved.
   */
  private readonly seenSnapshots = new Lru<string, KvEntry>({ capacity: seenSnapshotEntries });
  /**
   * Volumes this process last shared detached (a snapshot or a clone of one no process
   * had open), by id: the record's entry as that transaction left it, so that the next
   * snapshot of it goes straight to its transaction (snapshotBatch).
   */
  private readonly seenDetached = new Lru<string, KvEntry>({ capacity: seenDetachedVolumeEntries });
  private timers: NodeJS.Timeout[] = [];
  private closed = false;
  /** Set once the store is closing, where the catalog is shared: by then every wait on the catalog has ended. */
  private closeDeadline?: number;

  private constructor(
    catalog: Catalog,
    blobs: BlobStore,
    private readonly log: Log,
    /** Present where the catalog is shared: volumes are owned, one process at a time. */
    readonly ownership?: Ownership,
    space?: SpaceReserve,
  ) {
    this.ctx = {
      catalog,
      blobs,
      space,
      nodes: new NodeCache(blobs),
      ids: new BlobIdAllocator(catalog, ownership ? () => ownership.currentLease() : undefined),
      log,
      free: async (ids) => {
        await this.collector.frees.free(ids);
        if (ids.length > 0) space?.spaceFreed();
      },
    };
    this.volumes = new OpenVolumes((id) => this.openOne(id), log, ownership);
    this.collector = new Collector(this.ctx, this.volumes, log, ownership);
    if (ownership) this.requests = new OwnerRequests(catalog, ownership, log);
    this.groups = new GroupSnapshots({
      ctx: this.ctx,
      log,
      requests: this.requests,
      acquire: (ref) => this.acquireVolume(ref),
      getVolume: (ref) => this.getVolume(ref),
    });
    this.registry = new PublicationRegistry(this.ctx, (id) => this.getVolume({ id }));
    this.receives = new Receives({
      catalog,
      log,
      inUse: async (id) => !(await this.volumes.letGoUnused(id)),
      owned: ownership !== undefined,
      listVolumes: () => this.allVolumes(),
      listSnapshots: (ref) => this.listSnapshots(ref),
      findSnapshot: (ref) => this.findSnapshot(ref),
      publishedTo: async (id) => Object.keys((await this.publications(id)).nodes),
      resizeVolume: (ref, sizeBytes) => this.resizeVolume(ref, sizeBytes),
      deleteVolume: (ref) => this.deleteVolume(ref),
      withVolume: (ref, fn) => this.withVolume(ref, fn),
      forget: (volume) => this.volumes.forget(volume),
    });
    this.qos = new QosFollower(catalog);
    this.onClosed(() => this.qos.close());
    this.timers.push(setInterval(() => void this.commitIdleVolumes(), backgroundTickMs).unref());
    ownership?.onLost((reason) => this.loseEveryVolume(reason));
  }

  static async open(catalog: Catalog, blobs: BlobStore, log: Log = silentLog, options: StoreOptions = {}): Promise<Store> {
    await openFormat(catalog, log);
    const ownership = catalog.exclusive
      ? undefined
      : await Ownership.start(catalog, options.nodeId ?? os.hostname(), options.leaseTtlMs ?? defaultOwnerLeaseTtlMs, log);
    const store = new Store(catalog, blobs, log, ownership, options.space);
    await store.requests?.serve((op, inline) => store.runForAsker(op, inline));
    return store;
  }

  /** Runs what another process asked of a volume this one owns; a snapshot of a volume open here answers in its own commit (`inline`). */
  private async runForAsker(op: OwnerOp, inline?: InlineAnswer): Promise<unknown> {
    const ref = { id: op.volumeId };
    switch (op.op) {
      case 'createSnapshot': {
        const scope = op.scope === 'volume' ? 'volume' : 'store';
        // The asker found the volume owned here and the name free a moment ago: where the
        // volume is still open here, go straight to it (the transaction settles the name).
        if (!this.volumes.get(op.volumeId)?.isOpen) return this.createSnapshot(ref, op.name, scope);
        return this.onOwner(
          ref,
          (volume) => this.snapshotOpenVolume(volume, op.name, scope, inline),
          (volumeId) => ({ op: 'createSnapshot', volumeId, name: op.name, scope }),
        );
      }
      case 'cloneVolume':
        return this.cloneVolume(op.name, { volume: ref }, { labels: op.labels });
      case 'resizeVolume':
        return this.resizeVolume(ref, op.sizeBytes);
      case 'deleteVolume':
        return this.deleteVolume(ref);
      case 'volumeUsage':
        return this.volumeUsage(ref);
      case 'holdForGroup':
        return this.groups.holdForAsker(op.volumeId, op.token);
    }
  }

  /**
   * Runs `local` on the volume opened here; where another live process owns it, asks
   * that process instead (`remote`), and tries again here if it let go meanwhile.
   * `knownOwner`: another live process the caller just read in the owner key; the first
   * try asks it at once instead of trying to take the volume here (three round trips).
   */
  private async onOwner<T>(ref: Ref, local: (volume: Volume) => Promise<T>, remote: (volumeId: string) => OwnerOp, knownOwner?: OwnerRecord): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      let owner = attempt === 0 ? knownOwner : undefined;
      if (!owner) {
        try {
          return await this.withVolume(ref, local);
        } catch (err) {
          if (!(err instanceof OwnedElsewhere) || !this.requests) throw err;
          owner = err.owner;
        }
      }
      if (!this.requests) throw new ArborError('internal', 'a volume owner was asked for where volumes have no owners');
      try {
        const volumeId = 'id' in ref ? ref.id : (await this.getVolume(ref)).id;
        return (await this.requests.ask(owner, remote(volumeId))) as T;
      } catch (asked) {
        if (isArborError(asked, 'aborted') && attempt < 3) continue;
        throw asked;
      }
    }
  }

  /** The volumes this process has open, with what each holds not yet committed (for `arbor status`). */
  openVolumeStatus(): Array<{ id: string; name: string } & ReturnType<Volume['uncommitted']>> {
    return this.volumes.volumes().map((volume) => ({ id: volume.id, name: volume.name, ...volume.uncommitted() }));
  }

  /** The last garbage collection this process completed, if any. */
  get lastCollection(): { endedAt: number; report: GcReport } | undefined {
    return this.collector.lastPass;
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
      const record = newVolumeRecord(name, options.sizeBytes, extentSizeBytes, options.labels);
      const result = await this.ctx.catalog.txn([absent(keys.volumeName(name))], [put(keys.volume(record.id), record), put(keys.volumeName(name), record.id)]);
      if (result.succeeded) {
        this.log.info('volume created', { volume: name, id: record.id, sizeBytes: record.sizeBytes, extentSizeBytes });
        return record;
      }
    }
  }

  /**
   * A new volume sharing every block of a snapshot, or of a volume as it is now. O(1).
   * A volume of the name that is already this clone is the answer to a retry, unless
   * `exclusive`: then it is already-exists too, for a caller that judges retries itself
   * and so need not read the name first.
   */
  async cloneVolume(name: string, source: CloneSource, options: { labels?: Record<string, string>; exclusive?: boolean } = {}): Promise<VolumeRecord> {
    validateName(name, 'volume');
    // A snapshot just looked up here (its entry seen): try the transaction at once.
    const seen = 'snapshot' in source && 'id' in source.snapshot ? this.seenSnapshots.get(source.snapshot.id) : undefined;
    if (seen) {
      const created = await this.cloneSnapshot(name, seen, options.labels);
      if (created) {
        this.log.info('volume cloned', { volume: name, id: created.id, from: describeStep(created.lineage[0]) });
        return created;
      }
      this.seenSnapshots.delete(decodeSnapshot(seen).id);
    }
    for (;;) {
      // The source and the name, read at once.
      const [sourceEntry, existing] =
        'snapshot' in source ? await this.snapshotAndVolumeNamed(source.snapshot, name) : [undefined, await this.findVolume({ name })];
      const sourceDescription = 'snapshot' in source ? stepOf(decodeSnapshot(sourceEntry!)) : await this.volumeStep(source.volume);
      if (existing) {
        const step = existing.lineage[0];
        const sameClone = step && step.volumeId === sourceDescription.volumeId && step.snapshotId === sourceDescription.snapshotId;
        if (sameClone && !options.exclusive) return existing;
        throw new ArborError(
          'already-exists',
          sameClone
            ? `volume ${name} already exists as a clone of ${describeStep(step)}`
            : `volume ${name} already exists${step ? ` as a clone of ${describeStep(step)}` : ''}; it is not a clone of ${describeStep(sourceDescription)}`,
        );
      }
      const created =
        'snapshot' in source ? await this.cloneSnapshot(name, sourceEntry!, options.labels) : await this.cloneLiveVolume(name, source.volume, options.labels);
      if (created) {
        this.log.info('volume cloned', { volume: name, id: created.id, from: describeStep(created.lineage[0]) });
        return created;
      }
    }
  }

  /** A snapshot's entry (not-found when there is none) and the volume called `name`, if any: one round trip for a snapshot named by id and a free name. */
  private async snapshotAndVolumeNamed(ref: Ref, name: string): Promise<[KvEntry, VolumeRecord | undefined]> {
    if (!('id' in ref)) return Promise.all([this.snapshotEntry(ref), this.findVolume({ name })]);
    const [entry, nameEntry] = await this.ctx.catalog.getMany([keys.snapshot(ref.id), keys.volumeName(name)]);
    if (!entry) throw notFound('snapshot', ref);
    return [entry, nameEntry && (await this.findVolume({ id: decodeId(nameEntry) }))];
  }

  /** One transaction: the snapshot's record unchanged (it was not deleted meanwhile) and the name free. */
  private async cloneSnapshot(name: string, entry: KvEntry, labels?: Record<string, string>): Promise<VolumeRecord | undefined> {
    const record = cloneOfSnapshot(decodeSnapshot(entry), name, labels);
    const result = await this.ctx.catalog.txn(
      [unchanged(entry), absent(keys.volumeName(name))],
      [put(keys.volume(record.id), record), put(keys.volumeName(name), record.id)],
    );
    return result.succeeded ? record : undefined;
  }

  private async cloneLiveVolume(name: string, ref: Ref, labels?: Record<string, string>): Promise<VolumeRecord | undefined> {
    const entry = await volumeEntry(this.ctx.catalog, ref);
    if (entry && !(await this.findVolume({ name }))) {
      const record = cloneRecordOf(decodeVolume(entry), name, labels);
      const shared = await this.shareDetached(entry, [keys.volumeName(name)], [put(keys.volume(record.id), record), put(keys.volumeName(name), record.id)]);
      if (shared.succeeded) return record;
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
   * the volume. Not succeeded when the volume is open, here or elsewhere, or changed;
   * then, if the transaction ran, with what it read of `orRead` instead.
   */
  private async shareDetached(
    entry: KvEntry,
    absentKeys: string[],
    ops: Op[],
    orRead?: string[],
  ): Promise<{ succeeded: true; revision: number } | { succeeded: false; read?: Array<KvEntry | undefined> }> {
    const source = decodeVolume(entry);
    if (this.volumes.busy(source.id)) return { succeeded: false };
    const compares: Compare[] = [unchanged(entry), absent(ownerKey(source.id)), ...absentKeys.map(absent)];
    const shared = { ...source, root: asShared(source.root) };
    // No await between the check above and the transaction: nothing in this process can open the volume in between.
    const written = [put(keys.volume(source.id), shared), ...ops];
    const result = await this.ctx.catalog.txn(compares, written, orRead);
    if (!result.succeeded) return { succeeded: false, read: result.read };
    this.seenDetached.set(source.id, writtenEntry(written, entry.key, result.revision));
    return { succeeded: true, revision: result.revision };
  }

  private async cloneOpenVolume(volume: Volume, name: string, labels?: Record<string, string>): Promise<VolumeRecord | undefined> {
    return volume.commitShared((source) => {
      const record = cloneRecordOf(source, name, labels);
      return { value: record, absent: [keys.volumeName(name)], ops: [put(keys.volume(record.id), record), put(keys.volumeName(name), record.id)] };
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
        await volume.delete([del(keys.volume(volume.id)), del(keys.volumeName(volume.name)), del(qosKey(volume.id))]);
        this.volumes.forget(volume);
        this.log.info('volume deleted', { volume: volume.name, id: volume.id });
      },
      (volumeId) => ({ op: 'deleteVolume', volumeId }),
    );
  }

  // ---- QoS: I/O limits per volume, in their own key (store/qos.ts says why) ----

  /** The volume's I/O limits ({} when it has none). */
  async volumeQos(ref: Ref): Promise<QosLimits> {
    const record = await this.getVolume(ref);
    const entry = await this.ctx.catalog.get(qosKey(record.id));
    return entry ? decodeQos(entry) : {};
  }

  /**
   * Sets all of the volume's I/O limits ({} for none). Any process may: one
   * transaction that holds only while the volume exists (its name key unchanged, so
   * a volume deleted meanwhile leaves no limits behind; commits do not touch that
   * key, so writes do not make it retry). The NBD server here applies the limits at
   * once; one in another process learns them through its watch.
   */
  async setVolumeQos(ref: Ref, limits: QosLimits): Promise<QosLimits> {
    this.checkOpen();
    for (let attempt = 1; ; attempt++) {
      const record = await this.getVolume(ref);
      const checked = validateQos(limits, record.name);
      const nameEntry = await this.ctx.catalog.get(keys.volumeName(record.name));
      if (nameEntry && decodeId(nameEntry) === record.id) {
        const op = isUnlimited(checked) ? del(qosKey(record.id)) : put(qosKey(record.id), checked);
        const result = await this.ctx.catalog.txn([unchanged(nameEntry)], [op]);
        if (result.succeeded) {
          this.qos.apply(record.id, checked, result.revision);
          this.log.info('volume QoS set', { volume: record.name, ...checked });
          return checked;
        }
      }
      // The name key changes only when the volume goes (or another takes its name): look again.
      if (attempt >= 3) throw new ArborError('aborted', `volume ${record.name} changed while its QoS limits were being set; try again`);
    }
  }

  /** Calls `listener` with the volume's limits now and whenever they change (the NBD server's throttle); returns how to stop. */
  followVolumeQos(volumeId: string, listener: (limits: QosLimits) => void): Promise<() => void> {
    return this.qos.follow(volumeId, listener);
  }

  async getVolume(ref: Ref): Promise<VolumeRecord> {
    const record = await this.findVolume(ref);
    if (!record) throw notFound('volume', ref);
    return record;
  }

  async findVolume(ref: Ref): Promise<VolumeRecord | undefined> {
    const entry = await volumeEntry(this.ctx.catalog, ref);
    return entry && decodeVolume(entry);
  }

  /** Every volume users made (not the hidden staging volumes of receives in progress). */
  async listVolumes(): Promise<VolumeRecord[]> {
    return (await this.allVolumes()).filter((v) => !isHiddenVolume(v));
  }

  /** A page of the volumes users made, in id order: what a page reads does not grow with the store (listing.ts). */
  async volumesPage(options: PageOptions = {}): Promise<Page<VolumeRecord>> {
    return recordsPage(this.ctx.catalog, keys.volumes, decodeVolume, (v) => !isHiddenVolume(v), options);
  }

  private async allVolumes(): Promise<VolumeRecord[]> {
    return (await this.ctx.catalog.list(keys.volumes)).map(decodeVolume).sort(byName);
  }

  /** The volume's I/O handle, opened once and kept open (owned) until the store closes. */
  async openVolume(ref: Ref): Promise<Volume> {
    const { volume } = await this.acquireVolume(ref);
    this.volumes.pin(volume.id);
    return volume;
  }

  /**
   * A counted use of the volume, opened once and shared by every user. Where volumes
   * have owners, opening takes ownership (OwnedElsewhere when a live process has it)
   * and the last release commits and lets go, so another node can take it.
   */
  async acquireVolume(ref: Ref): Promise<VolumeHandle> {
    this.checkOpen();
    await this.collector.cutTaken();
    // Open here already: this process owns it and is the only writer of its record (a
    // delete goes through it too), so there is nothing to look up.
    if ('id' in ref && this.volumes.get(ref.id)?.isOpen) return this.volumes.acquire(ref.id);
    const entry = await volumeEntry(this.ctx.catalog, ref);
    if (!entry) throw notFound('volume', ref);
    return this.volumes.acquire(decodeVolume(entry).id);
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

  /** Opens a volume for OpenVolumes: takes ownership where volumes have owners, then reads its committed record. */
  private async openOne(id: string): Promise<Volume> {
    const name = (await this.getVolume({ id })).name;
    const guard = this.ownership ? await this.ownership.acquire(id, name) : undefined;
    try {
      // Read after acquiring: the last owner's final commit is in.
      const fresh = await this.ctx.catalog.get(keys.volume(id));
      if (!fresh) throw notFound('volume', { id });
      return new Volume(this.ctx, fresh, (busy) => void busy.commitInBackground(), guard);
    } catch (err) {
      if (guard) await this.ownership!.release(guard);
      throw err;
    }
  }

  /** The owner lease ended: nothing this process held is its own any more. */
  private loseEveryVolume(reason: string): void {
    this.ctx.ids.abandonBatches();
    this.volumes.loseAll(reason);
  }

  async volumeUsage(ref: Ref): Promise<VolumeUsage> {
    const record = await this.getVolume(ref);
    const volume = this.volumes.get(record.id);
    if (volume) await volume.flush();
    else if (this.ownership) {
      // Another process may hold writes of it that are not committed yet: ask it to commit.
      const owner = await this.ownership.ownerOf(record.id);
      if (owner && owner.lease !== (await this.ownership.currentLease()).id)
        return (await this.requests!.ask(owner, { op: 'volumeUsage', volumeId: record.id })) as VolumeUsage;
    }
    const current = await this.getVolume({ id: record.id });
    const counts = await countExtents(this.nodeSource(), current.root, current.depth, current.extentSizeBytes);
    return { allocatedBytes: counts.dataBytes, exclusiveBytes: counts.ownedBytes };
  }

  // ---- snapshots ----

  /**
   * A consistent point-in-time snapshot: every write completed before the call, none
   * after it. Its name is unique among its volume's snapshots, and with scope 'store'
   * (CSI's, the default) across the whole store too.
   */
  async createSnapshot(volumeRef: Ref, name: string, scope: SnapshotScope = 'store'): Promise<SnapshotRecord> {
    validateName(name, 'snapshot');
    if (scope !== 'store' && scope !== 'volume') throw new ArborError('invalid-argument', `scope must be 'store' or 'volume', got ${JSON.stringify(scope)}`);
    // By id, the batch finds whether the volume exists (snapshotBatch): one read fewer per snapshot.
    const volumeId = await volumeIdOf(this.ctx.catalog, volumeRef);
    if (volumeId === undefined) throw notFound('volume', volumeRef);
    return this.snapshotBatches.add(volumeId, { name, scope });
  }

  /**
   * Makes a batch of snapshots of one volume (concurrent creates, distinct names) in
   * one transaction: one commit and one fsync for all. They share one instant, after
   * every write each caller's create followed, so each is still a consistent
   * point-in-time snapshot; each caller gets its own record, or its own error (a
   * name taken, answered by the record a retry asks for, or refused).
   */
  private async snapshotBatch(volumeId: string, batch: Array<Waiting<WantedSnapshot, SnapshotRecord>>): Promise<void> {
    let todo = batch;
    const nameKeysOfBatch = (of: typeof batch) => of.map(({ request }) => nameKeysOf(volumeId, request.name, request.scope));
    const keysToRead = (nameKeys: string[][]) => [keys.volume(volumeId), ownerKey(volumeId), ...nameKeys.flat()];
    // What a failed transaction read in the stead of the first read below.
    let read: Array<KvEntry | undefined> | undefined;
    const seen = this.seenDetached.get(volumeId);
    if (seen) {
      // Detached when this process last snapshotted it: one transaction, no read first.
      // Its compares fail on anything since (a commit, an owner, a name taken), and it
      // then reads what the loop reads first, in the same round trip.
      this.seenDetached.delete(volumeId);
      const detached = snapshotBatchOps(decodeVolume(seen), todo);
      const tried = await this.shareDetached(seen, detached.absent, detached.ops, keysToRead(nameKeysOfBatch(todo)));
      if (tried.succeeded) return this.answerBatch(todo, detached.records, { ops: detached.ops, revision: tried.revision });
      read = tried.read;
    }
    for (;;) {
      // The record, who owns the volume and every name key of the batch, in one round trip.
      const nameKeys = nameKeysOfBatch(todo);
      const [entry, ownerEntry, ...nameEntries] = read ?? (await this.ctx.catalog.getMany(keysToRead(nameKeys)));
      read = undefined;
      if (!entry) {
        for (const waiting of todo) waiting.reject(notFound('volume', { id: volumeId }));
        return;
      }
      let at = 0;
      const namedBy = nameKeys.map((keysOfOne) => nameEntries.slice(at, (at += keysOfOne.length)));
      todo = await this.unanswered(decodeVolume(entry), todo, namedBy);
      if (todo.length === 0) return;
      const owner = ownerEntry && decodeOwner(ownerEntry);
      // An owner key that is not this process's own is another live process's (it goes with its lease): ask it directly.
      let elsewhere = owner && this.ownership && owner.lease !== (await this.ownership.currentLease()).id ? owner : undefined;
      if (!elsewhere) {
        if (!owner) {
          // A detached volume: one transaction. Otherwise on the volume, opened here.
          const detached = snapshotBatchOps(decodeVolume(entry), todo);
          const shared = await this.shareDetached(entry, detached.absent, detached.ops);
          if (shared.succeeded) return this.answerBatch(todo, detached.records, { ops: detached.ops, revision: shared.revision });
        }
        let created: SnapshotRecord[] | undefined;
        try {
          // One transaction commits what was written before the call and the snapshots of it.
          created = await this.withVolume({ id: volumeId }, (volume) =>
            volume.commitShared((source) => {
              const made = snapshotBatchOps(source, todo);
              return { value: made.records, absent: made.absent, ops: made.ops };
            }),
          );
        } catch (err) {
          if (!(err instanceof OwnedElsewhere) || !this.requests) throw err;
          elsewhere = err.owner;
        }
        if (created) return this.answerBatch(todo, created);
        // A name was taken meanwhile, or the record moved: look again.
        if (!elsewhere) continue;
      }
      // Another process owns the volume: ask it, one by one (it batches them on its side).
      const knownOwner = elsewhere;
      await Promise.all(todo.map((waiting) => this.snapshotOnOwner(volumeId, waiting.request, knownOwner).then(waiting.resolve, waiting.reject)));
      return;
    }
  }

  /**
   * Answers the requests whose name is already used (the snapshot a retry asks for, or
   * already-exists); returns the others. `nameEntries`: each request's name keys (as
   * nameKeysOf lists them), read with the volume's record.
   */
  private async unanswered(
    volume: VolumeRecord,
    batch: Array<Waiting<WantedSnapshot, SnapshotRecord>>,
    nameEntries: Array<Array<KvEntry | undefined>>,
  ): Promise<Array<Waiting<WantedSnapshot, SnapshotRecord>>> {
    assert(nameEntries.length === batch.length, 'the name keys of every request of the batch were read');
    const answered = await Promise.all(
      batch.map(async (waiting, i) => {
        try {
          const { name, scope } = waiting.request;
          const existing = settleExisting(volume, name, await this.snapshotsNamedBy(scope, nameEntries[i]));
          if (existing) waiting.resolve(existing);
          return existing !== undefined;
        } catch (err) {
          waiting.reject(err);
          return true;
        }
      }),
    );
    return batch.filter((_, i) => !answered[i]);
  }

  /** `written`: the transaction that made them, where known, so that a clone of one needs no read of it (seenSnapshots). */
  private answerBatch(batch: Array<Waiting<WantedSnapshot, SnapshotRecord>>, records: SnapshotRecord[], written?: { ops: Op[]; revision: number }): void {
    batch.forEach((waiting, i) => {
      if (written) this.seenSnapshots.set(records[i].id, writtenEntry(written.ops, keys.snapshot(records[i].id), written.revision));
      this.log.info('snapshot created', { volume: records[i].volumeName, snapshot: records[i].name, id: records[i].id, scope: waiting.request.scope });
      waiting.resolve(records[i]);
    });
  }

  /** One snapshot through the volume's owner (or here, should it have let go meanwhile). */
  private snapshotOnOwner(volumeId: string, { name, scope }: WantedSnapshot, knownOwner?: OwnerRecord): Promise<SnapshotRecord> {
    return this.onOwner(
      { id: volumeId },
      (volume) => this.snapshotOpenVolume(volume, name, scope),
      (id) => ({ op: 'createSnapshot', volumeId: id, name, scope }),
      knownOwner,
    );
  }

  /** The snapshot a retry of this create asks for, or undefined when the name is free; already-exists when it is taken. */
  private async existingSnapshot(volume: { id: string; name: string }, name: string, scope: SnapshotScope): Promise<SnapshotRecord | undefined> {
    return settleExisting(volume, name, await this.snapshotsNamed(volume.id, name, scope));
  }

  /** The snapshots that hold `name`: among the volume's, and (scope 'store') store-wide; the name keys read in one round trip. */
  private async snapshotsNamed(volumeId: string, name: string, scope: SnapshotScope): Promise<SnapshotsNamed> {
    return this.snapshotsNamedBy(scope, await this.ctx.catalog.getMany(nameKeysOf(volumeId, name, scope)));
  }

  /** The records of the snapshots the name keys (as nameKeysOf lists them) hold, read only where a key is there (a retry, or a clash). */
  private async snapshotsNamedBy(scope: SnapshotScope, [mineKey, storeWideKey]: Array<KvEntry | undefined>): Promise<SnapshotsNamed> {
    const recordOf = async (key: KvEntry | undefined) => (key ? this.findSnapshot({ id: decodeId(key) }) : undefined);
    const [mine, storeWide] = await Promise.all([recordOf(mineKey), recordOf(storeWideKey)]);
    return { scope, mine, storeWide };
  }

  /** `inline`: where another process asked, its answer rides in the snapshot's transaction. */
  private async snapshotOpenVolume(volume: Volume, name: string, scope: SnapshotScope, inline?: InlineAnswer): Promise<SnapshotRecord> {
    // The caller has just looked for the name (the asker, or createSnapshot here): try
    // at once, and look again only when the transaction finds a name key taken.
    for (let attempt = 0; ; attempt++) {
      if (attempt > 0) {
        const existing = await this.existingSnapshot(volume, name, scope);
        if (existing) return existing;
      }
      // One transaction commits what was written before the call and the snapshot of it.
      const created = await volume.commitShared(async (source) => {
        const made = snapshotBatchOps(source, [{ request: { name, scope } }]);
        const answer = inline ? await inline.ops(made.records[0]) : [];
        return { value: made.records[0], absent: made.absent, ops: [...made.ops, ...answer] };
      });
      if (created) {
        inline?.committed();
        this.log.info('snapshot created', { volume: volume.name, snapshot: name, id: created.id });
        return created;
      }
    }
  }

  /** Forgets the snapshot; the blobs only it held are reclaimed by the next collector pass. */
  async deleteSnapshot(ref: SnapshotRef): Promise<void> {
    for (;;) {
      const entry = await snapshotEntry(this.ctx.catalog, ref);
      if (!entry) throw notFound('snapshot', ref);
      const record = decodeSnapshot(entry);
      if (record.groupId) {
        throw new ArborError('failed-precondition', `snapshot ${record.name} belongs to group snapshot ${record.groupId}; delete the group snapshot`);
      }
      // The store-wide name may belong to another volume's snapshot made through CSI.
      const storeWide = await this.ctx.catalog.get(keys.snapshotName(record.name));
      const ownsStoreWide = storeWide !== undefined && decodeId(storeWide) === record.id;
      const result = await this.ctx.catalog.txn(
        [unchanged(entry), storeWide ? unchanged(storeWide) : absent(keys.snapshotName(record.name))],
        [...snapshotDeletes(record), ...(ownsStoreWide ? [del(keys.snapshotName(record.name))] : [])],
      );
      if (result.succeeded) {
        this.seenSnapshots.delete(record.id);
        this.log.info('snapshot deleted', { snapshot: record.name, id: record.id });
        return;
      }
    }
  }

  async getSnapshot(ref: SnapshotRef): Promise<SnapshotRecord> {
    const record = await this.findSnapshot(ref);
    if (!record) throw notFound('snapshot', ref);
    return record;
  }

  /**
   * The snapshot, or undefined. `mayBeStale`: by id, the entry this store last read or
   * made of it will do, with no read, for a caller whose next step checks it anyway (a
   * clone's transaction compares it unchanged); it may be of a snapshot deleted since.
   */
  async findSnapshot(ref: SnapshotRef, options: { mayBeStale?: boolean } = {}): Promise<SnapshotRecord | undefined> {
    const seen = options.mayBeStale && 'id' in ref ? this.seenSnapshots.get(ref.id) : undefined;
    if (seen) return decodeSnapshot(seen);
    const entry = await snapshotEntry(this.ctx.catalog, ref);
    if (!entry) {
      if ('id' in ref) this.seenSnapshots.delete(ref.id);
      return undefined;
    }
    const record = decodeSnapshot(entry);
    if ('id' in ref) this.seenSnapshots.set(record.id, entry);
    return record;
  }

  /** Every snapshot, or those taken of one volume (by id: of that volume; by name: of every volume that had the name), by name. */
  async listSnapshots(volumeRef?: Ref): Promise<SnapshotRecord[]> {
    if (volumeRef && 'id' in volumeRef) return (await snapshotsOfVolumePage(this.ctx.catalog, volumeRef.id, {})).items.sort(byName);
    const all = (await this.ctx.catalog.list(keys.snapshots)).map(decodeSnapshot);
    if (!volumeRef) return all.sort(byName);
    return all.filter((s) => s.volumeName === volumeRef.name).sort(byName);
  }

  /**
   * A page of snapshots in id order (all, or those of the volume `volumeId`, which
   * may be gone): what a page reads does not grow with the store (listing.ts).
   */
  async snapshotsPage(options: PageOptions & { volumeId?: string } = {}): Promise<Page<SnapshotRecord>> {
    const { volumeId, ...page } = options;
    if (volumeId !== undefined) {
      if (typeof volumeId !== 'string' || volumeId === '')
        throw new ArborError('invalid-argument', `volumeId must be a non-empty id, got ${JSON.stringify(volumeId)}`);
      return snapshotsOfVolumePage(this.ctx.catalog, volumeId, page);
    }
    return recordsPage(this.ctx.catalog, keys.snapshots, decodeSnapshot, () => true, page);
  }

  async openSnapshot(ref: SnapshotRef): Promise<SnapshotReader> {
    return new SnapshotReader(await this.getSnapshot(ref), this.nodeSource(), this.ctx.blobs);
  }

  /** The byte ranges whose contents differ between two snapshots (diff.ts): the cost follows the map nodes that differ. */
  async diffSnapshots(from: Ref, to: Ref): Promise<ByteRange[]> {
    const [a, b] = [await this.getSnapshot(from), await this.getSnapshot(to)];
    if (a.extentSizeBytes !== b.extentSizeBytes) {
      throw new ArborError(
        'invalid-argument',
        `snapshots ${a.volumeName}@${a.name} and ${b.volumeName}@${b.name} have extent sizes ${a.extentSizeBytes} and ${b.extentSizeBytes}: they are not of one lineage`,
      );
    }
    return changedRanges(this.nodeSource(), this.ctx.blobs, a, b);
  }

  /** The byte ranges a snapshot maps (data or allocated zeros). */
  async snapshotAllocated(ref: Ref): Promise<ByteRange[]> {
    return allocatedRanges(this.nodeSource(), await this.getSnapshot(ref));
  }

  // ---- receiving snapshots from other stores (receive.ts) ----

  /** Checks a received stream can apply and makes the hidden volume its data is written to. */
  beginReceive(plan: ReceivePlan): Promise<ReceiveStaging> {
    this.checkOpen();
    return this.receives.begin(plan);
  }

  /** Makes the received snapshot appear, once the whole stream was written to `staging` and checked. */
  finishReceive(staging: ReceiveStaging, plan: ReceivePlan): Promise<SnapshotRecord> {
    this.checkOpen();
    return this.receives.finish(staging, plan);
  }

  /** Discards what a failed receive wrote. */
  abortReceive(staging: ReceiveStaging): Promise<void> {
    return this.receives.abort(staging);
  }

  // ---- group snapshots (group-snapshots.ts) ----

  createGroupSnapshot(name: string, volumeRefs: Ref[]): Promise<GroupSnapshotRecord> {
    return this.groups.create(name, volumeRefs);
  }

  findGroupSnapshot(ref: Ref): Promise<GroupSnapshotRecord | undefined> {
    return this.groups.find(ref);
  }

  listGroupSnapshots(): Promise<GroupSnapshotRecord[]> {
    return this.groups.list();
  }

  deleteGroupSnapshot(ref: Ref): Promise<void> {
    return this.groups.delete(ref);
  }

  // ---- nodes and publications (publications.ts) ----

  registerNode(nodeId: string, info: { topology: Record<string, string>; nbdAddress?: string }): Promise<void> {
    return this.registry.registerNode(nodeId, info);
  }

  findNode(nodeId: string): Promise<NodeRecord | undefined> {
    return this.registry.findNode(nodeId);
  }

  publications(volumeId: string): Promise<Publications> {
    return this.registry.publications(volumeId);
  }

  publishVolume(volumeId: string, nodeId: string, options: PublishOptions): Promise<void> {
    return this.registry.publish(volumeId, nodeId, options);
  }

  unpublishVolume(volumeId: string, nodeId?: string): Promise<void> {
    return this.registry.unpublish(volumeId, nodeId);
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

  // ---- garbage collection (collector.ts) ----

  /** One mark-and-sweep pass on a consistent cut of the store. */
  async collectGarbage(): Promise<GcReport> {
    this.checkOpen();
    return this.collector.collect(this.nodeId);
  }

  // ---- life cycle ----

  private readonly closedListeners: Array<() => void> = [];

  /** Runs `fn` once the store has closed its backends. */
  onClosed(fn: () => void): void {
    this.closedListeners.push(fn);
  }

  /**
   * The process is stopping (a daemon calls this on SIGTERM, before its connections
   * drain; close calls it too). Where the catalog is shared, from now on every wait on
   * it ends within closeCatalogWithinMs: the flushes still running, then close's
   * commits and releases. Without quorum each would otherwise take up to three etcd
   * deadlines, and a pod being stopped has a grace period.
   */
  stopping(): void {
    if (!this.ownership || this.closeDeadline !== undefined) return;
    this.closeDeadline = Date.now() + closeCatalogWithinMs;
    this.ctx.catalog.closeBy(this.closeDeadline);
  }

  /**
   * Commits every open volume, lets go of what this process holds and closes the
   * backends. Where the catalog is shared each step ends by the deadline `stopping`
   * set, and what a step could not do is logged and given up; nothing given up is
   * lost for good: owner keys, id batches and the lease itself end with the lease,
   * and writes never committed were never acknowledged by a flush.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    for (const timer of this.timers) clearInterval(timer);
    this.stopping();
    await this.closeStep('waiting for the collector', () => this.collector.idle(), 'its pass is left unfinished; a later pass collects what it would have');
    this.requests?.stop();
    await this.closeStep(
      'committing and letting go of the open volumes',
      () => this.volumes.closeAll(),
      'a volume not committed keeps what its last flush made durable; an owner key not deleted goes when the lease ends',
    );
    await this.closeStep('revoking the owner lease', async () => this.ownership?.close(), 'etcd ends it when its TTL runs out, and every key on it');
    await this.closeStep('giving back unused blob ids', () => this.ctx.ids.release(), 'their serials are skipped (ids are never reused)');
    this.closed = true;
    await this.ctx.blobs.close();
    await this.ctx.catalog.close();
    for (const fn of this.closedListeners) fn();
  }

  /** One step of close: timed, bounded by the close deadline where there is one, and logged when it fails or is given up. */
  private async closeStep(what: string, step: () => Promise<void>, givenUp: string): Promise<void> {
    const started = Date.now();
    const result = await settleBy(step(), this.closeDeadline === undefined ? Infinity : Math.max(this.closeDeadline, started + closeStepGraceMs));
    const ms = Date.now() - started;
    if (result.outcome === 'done') this.log.debug('closing the store', { step: what, ms });
    else if (result.outcome === 'failed') this.log.warn(`closing the store: ${what} failed; ${givenUp}`, { ms, error: (result.error as Error).message });
    else this.log.warn(`closing the store: ${what} did not finish in the time left to close; ${givenUp}`, { ms });
  }

  private async commitIdleVolumes(): Promise<void> {
    const now = Date.now();
    for (const volume of this.volumes.volumes()) {
      const age = volume.uncommittedForMs(now);
      if (age !== undefined && age >= commitIntervalMs) await volume.commitInBackground();
    }
    if (this.ownership && !this.closed) {
      const volumes = this.volumes.volumes();
      // Both retry at the next tick: an unreachable catalog is not this tick's to report.
      await this.ctx.ids.forgetSettledBatches((spentAt) => volumes.every((v) => v.settledSince(spentAt))).catch(() => {});
      await this.collector.frees.release().catch(() => {});
    }
  }

  private nodeSource(): NodeSource {
    const nodes = this.ctx.nodes;
    return { cached: (id) => nodes.get(id), load: (id) => nodes.load(id) };
  }

  private async snapshotEntry(ref: Ref): Promise<KvEntry> {
    const entry = await snapshotEntry(this.ctx.catalog, ref);
    if (!entry) throw notFound('snapshot', ref);
    return entry;
  }

  private async volumeStep(ref: Ref): Promise<LineageStep> {
    const v = await this.getVolume(ref);
    return { volumeId: v.id, volumeName: v.name };
  }

  private checkOpen(): void {
    if (this.closed) throw new ArborError('unavailable', 'the store is closed');
  }
}

/** The lineage step of a clone of snapshot `s`. */
function stepOf(s: SnapshotRecord): LineageStep {
  return { volumeId: s.volumeId, volumeName: s.volumeName, snapshotId: s.id, snapshotName: s.name };
}

/** The keys that hold a snapshot name: among the volume's, and for scope 'store' store-wide. */
function nameKeysOf(volumeId: string, name: string, scope: SnapshotScope): string[] {
  return [keys.volumeSnapshotName(volumeId, name), ...(scope === 'store' ? [keys.snapshotName(name)] : [])];
}

/** The snapshots found under a new snapshot's name (see Store.snapshotsNamed). */
interface SnapshotsNamed {
  scope: SnapshotScope;
  mine?: SnapshotRecord;
  storeWide?: SnapshotRecord;
}

/** The snapshot a retry of a create asks for, or undefined when the name is free; already-exists when it is taken. */
function settleExisting(volume: { id: string; name: string }, name: string, { scope, mine, storeWide }: SnapshotsNamed): SnapshotRecord | undefined {
  if (scope === 'volume') return mine;
  if (storeWide && storeWide.volumeId !== volume.id) {
    throw new ArborError(
      'already-exists',
      `snapshot name ${name} is already used by volume ${storeWide.volumeName}; snapshot names made through CSI are unique in the store`,
    );
  }
  if (mine && storeWide?.id !== mine.id) {
    throw new ArborError(
      'already-exists',
      `volume ${volume.name} already has a snapshot ${name} made outside CSI; snapshot names made through CSI are unique in the store: use another name`,
    );
  }
  return mine ?? storeWide;
}

/** What a snapshot of one volume asks for. */
interface WantedSnapshot {
  name: string;
  scope: SnapshotScope;
}

/**
 * The records of snapshots of `source` as it is now, and the transaction's part
 * that makes them: their keys (snapshotPuts), the store-wide name for scope
 * 'store', each name key compared absent.
 */
function snapshotBatchOps(source: VolumeRecord, batch: Array<{ request: WantedSnapshot }>): { records: SnapshotRecord[]; absent: string[]; ops: Op[] } {
  const records: SnapshotRecord[] = [];
  const absentKeys: string[] = [];
  const ops: Op[] = [];
  for (const { request } of batch) {
    const record = snapshotRecordOf(source, request.name);
    records.push(record);
    absentKeys.push(keys.volumeSnapshotName(record.volumeId, record.name));
    ops.push(...snapshotPuts(record));
    if (request.scope === 'store') {
      absentKeys.push(keys.snapshotName(record.name));
      ops.push(put(keys.snapshotName(record.name), record.id));
    }
  }
  assert(new Set(absentKeys).size === absentKeys.length, 'a batch of snapshots holds each name once');
  return { records, absent: absentKeys, ops };
}
