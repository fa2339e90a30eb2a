/**
 * Receiving a snapshot sent from another store (or this one): the data lands in a
 * hidden staging volume, and the received snapshot appears only when the whole
 * stream was applied and checked, in one catalog transaction that also points the
 * target volume at it. A receive that fails or is killed leaves the staging volume
 * behind, hidden and holding nothing anyone reads; the next receive into the same
 * volume deletes it.
 *
 * A snapshot's identity across stores is its origin: the id it had where it was
 * first taken. An incremental stream names its base by origin, so it applies only
 * on top of that very snapshot, whatever the two stores call their volumes.
 */
import { Catalog, KvEntry, absent, del, put } from './catalog/catalog';
import { asShared } from './entry';
import { ArborError } from './errors';
import { validateExtentSize, validateVolumeSize } from './geometry';
import { Ref, SnapshotRef, volumeEntry } from './lookups';
import { ownerKey } from './ownership';
import { SnapshotRecord, VolumeRecord, cloneOfSnapshot, decodeVolume, keys, newVolumeRecord, snapshotPuts, snapshotRecordOf, validateName } from './records';
import { Volume } from './volume';
import { hiddenNamePrefix, isHiddenName } from './names';
import { Log } from '../lib/logger';
import { randomBytes } from 'node:crypto';

/** What a stream's header says it will make, as the receiver asks the store to prepare it. */
export interface ReceivePlan {
  /** The volume the snapshot is received into: created by a full stream, existing for an incremental one. */
  volume: string;
  snapshot: string;
  /** The sent snapshot's origin (see snapshotOrigin). */
  origin: string;
  sizeBytes: number;
  extentSizeBytes: number;
  /** An incremental stream's base: a snapshot of `volume` with this origin must exist. */
  base?: { name: string; origin: string };
  /** Receive even though the volume was written after its base: those writes are discarded. */
  force?: boolean;
  /** When the snapshot was taken where it was first taken (its point in time; the receive keeps it). */
  createdAt?: string;
}

/** The staging volume a receive writes into (by its name, as an NBD export or a volume). */
export interface ReceiveStaging {
  id: string;
  name: string;
}

/** The id a snapshot had where it was first taken: equal in every store it was received into. */
export function snapshotOrigin(snapshot: SnapshotRecord): string {
  return snapshot.origin ?? snapshot.id;
}

/**
 * Staging volumes' names start with a control character the CSI spec bans
 * (hiddenNamePrefix), which no user's volume name can hold: they never collide, and
 * lists skip them.
 */
const stagingPrefix = `${hiddenNamePrefix}receive-`;
const receiveLabel = 'arbor.receive/into';

export function isHiddenVolume(record: { name: string }): boolean {
  return isHiddenName(record.name);
}

/** What receiving needs of the store. */
export interface ReceiveDeps {
  catalog: Catalog;
  log: Log;
  /**
   * Used in this process: open with users, opening or closing. A volume open for no
   * one is let go first (committing what it held), so the receive changes no record
   * under an open copy.
   */
  inUse(volumeId: string): Promise<boolean>;
  /** True where volumes have owners (a shared catalog). */
  owned: boolean;
  listVolumes(): Promise<VolumeRecord[]>;
  listSnapshots(volumeRef: Ref): Promise<SnapshotRecord[]>;
  findSnapshot(ref: SnapshotRef): Promise<SnapshotRecord | undefined>;
  publishedTo(volumeId: string): Promise<string[]>;
  resizeVolume(ref: Ref, sizeBytes: number): Promise<unknown>;
  deleteVolume(ref: Ref): Promise<void>;
  /** Runs `fn` on the volume opened in this process (shared with any other user here). */
  withVolume<T>(ref: Ref, fn: (volume: Volume) => Promise<T>): Promise<T>;
  forget(volume: Volume): void;
}

export class Receives {
  constructor(private readonly deps: ReceiveDeps) {}

  /**
   * Checks that the plan can be received as it stands and makes its staging volume:
   * empty for a full stream, a clone of the base for an incremental one.
   */
  async begin(plan: ReceivePlan): Promise<ReceiveStaging> {
    validatePlan(plan);
    await this.removeAbandoned(plan.volume);
    const target = await this.checkTarget(plan);
    const name = `${stagingPrefix}${randomBytes(8).toString('hex')}`;
    const labels = { [receiveLabel]: plan.volume };
    const record = target ? cloneOfSnapshot(target.base, name, labels) : newVolumeRecord(name, plan.sizeBytes, plan.extentSizeBytes, labels);
    const result = await this.deps.catalog.txn([absent(keys.volumeName(name))], [put(keys.volume(record.id), record), put(keys.volumeName(name), record.id)]);
    if (!result.succeeded) throw new ArborError('aborted', `could not make a staging volume for the receive into ${plan.volume}; retry`);
    if (record.sizeBytes < plan.sizeBytes) await this.deps.resizeVolume({ id: record.id }, plan.sizeBytes);
    this.deps.log.info('receive started', { volume: plan.volume, snapshot: plan.snapshot, base: plan.base?.name, staging: name });
    return { id: record.id, name };
  }

  /**
   * Makes the received snapshot (and the volume, for a full stream) appear, in one
   * transaction that checks nothing changed since `begin`: the target volume as it
   * was, the snapshot name free. The staging volume's tree becomes theirs.
   */
  async finish(staging: ReceiveStaging, plan: ReceivePlan): Promise<SnapshotRecord> {
    validatePlan(plan);
    // Checked here, not at begin: a damaged header is the digest's to refuse, with its own message.
    if (plan.createdAt !== undefined && Number.isNaN(Date.parse(plan.createdAt))) {
      throw new ArborError('invalid-argument', `the received snapshot's creation time ${JSON.stringify(plan.createdAt)} is not a date`);
    }
    const stagingRecord = await this.stagingRecord(staging, plan);
    const received = await this.deps.withVolume({ id: stagingRecord.id }, async (volume) => {
      for (;;) {
        const target = await this.checkTarget(plan);
        const done = await volume.withCommitted(async (_committed, source) => {
          if (source.sizeBytes !== plan.sizeBytes) {
            throw new ArborError('internal', `the staging volume of the receive into ${plan.volume} is ${source.sizeBytes} bytes, not ${plan.sizeBytes}`);
          }
          const volumeRecord: VolumeRecord = target
            ? { ...target.record, root: asShared(source.root), depth: source.depth, sizeBytes: source.sizeBytes }
            : { ...newVolumeRecord(plan.volume, source.sizeBytes, source.extentSizeBytes), root: asShared(source.root), depth: source.depth };
          const snapshot: SnapshotRecord = {
            ...snapshotRecordOf(volumeRecord, plan.snapshot),
            origin: plan.origin,
            ...(plan.createdAt ? { createdAt: plan.createdAt } : {}),
          };
          const ok = await volume.commitWith({
            share: true,
            compares: target ? [target.entry] : [],
            absent: [keys.volumeSnapshotName(volumeRecord.id, plan.snapshot), ...(target ? [ownerKey(target.record.id)] : [keys.volumeName(plan.volume)])],
            ops: [
              put(keys.volume(volumeRecord.id), volumeRecord),
              ...(target ? [] : [put(keys.volumeName(plan.volume), volumeRecord.id)]),
              ...snapshotPuts(snapshot),
            ],
          });
          return ok ? snapshot : undefined;
        });
        if (done) {
          // Its root is shared now: deleting it frees nothing the snapshot holds.
          await volume.delete([del(keys.volume(volume.id)), del(keys.volumeName(volume.name))]);
          this.deps.forget(volume);
          return done;
        }
      }
    });
    this.deps.log.info('snapshot received', { volume: plan.volume, snapshot: plan.snapshot, id: received.id, origin: plan.origin, base: plan.base?.name });
    return received;
  }

  /** Deletes the staging volume of a receive that failed. */
  async abort(staging: ReceiveStaging): Promise<void> {
    const entry = await volumeEntry(this.deps.catalog, { id: staging.id });
    if (!entry) return;
    const record = decodeVolume(entry);
    if (record.name !== staging.name || !record.name.startsWith(stagingPrefix)) {
      throw new ArborError('invalid-argument', `volume ${record.name} is not the staging volume ${staging.name} of a receive`);
    }
    await this.deps.deleteVolume({ id: staging.id });
    this.deps.log.info('receive abandoned', { staging: staging.name, volume: record.labels?.[receiveLabel] });
  }

  /**
   * The target volume and the base snapshot an incremental stream applies on, or
   * undefined for a full stream, after checking the store is as the plan needs it.
   */
  private async checkTarget(plan: ReceivePlan): Promise<{ entry: KvEntry; record: VolumeRecord; base: SnapshotRecord } | undefined> {
    // Snapshot names are unique among their volume's (the CLI's rule, as in zfs).
    const named = await this.deps.findSnapshot({ volume: { name: plan.volume }, name: plan.snapshot });
    if (named) {
      const replay = snapshotOrigin(named) === plan.origin;
      throw new ArborError(
        'already-exists',
        replay
          ? `snapshot ${plan.volume}@${plan.snapshot} was already received (this stream was applied before); nothing changed`
          : `volume ${plan.volume} already has a snapshot ${plan.snapshot}: receive as another name (VOLUME@NEWNAME)`,
      );
    }
    const entry = await volumeEntry(this.deps.catalog, { name: plan.volume });
    if (!plan.base) {
      if (entry) {
        throw new ArborError(
          'already-exists',
          `volume ${plan.volume} already exists; a full stream makes a new volume: receive it under another name, or send an incremental stream from a snapshot ${plan.volume} holds`,
        );
      }
      return undefined;
    }
    if (!entry) {
      throw new ArborError(
        'not-found',
        `volume ${plan.volume} does not exist; this stream is incremental from @${plan.base.name}: receive the full stream first`,
      );
    }
    const record = decodeVolume(entry);
    const snapshots = await this.deps.listSnapshots({ id: record.id });
    const base = snapshots.find((s) => snapshotOrigin(s) === plan.base!.origin);
    if (!base) {
      const sameName = snapshots.find((s) => s.name === plan.base!.name);
      throw new ArborError(
        'failed-precondition',
        sameName
          ? `the stream's base ${plan.base.name} is not the snapshot ${plan.volume}@${sameName.name} here (origin ${plan.base.origin}, here ${snapshotOrigin(sameName)}): they hold different data; send from a snapshot both stores share`
          : `the stream's base ${plan.base.name} (origin ${plan.base.origin}) is not a snapshot of volume ${plan.volume} here; receive it first, or send from a snapshot both stores share`,
      );
    }
    if (base.extentSizeBytes !== plan.extentSizeBytes) {
      throw new ArborError('failed-precondition', `the stream's extent size ${plan.extentSizeBytes} differs from its base's here (${base.extentSizeBytes})`);
    }
    if (plan.sizeBytes < base.sizeBytes) {
      throw new ArborError(
        'failed-precondition',
        `the stream's snapshot is ${plan.sizeBytes} bytes, smaller than its base ${base.name} (${base.sizeBytes}): volumes only grow`,
      );
    }
    const published = await this.deps.publishedTo(record.id);
    if (published.length > 0) {
      throw new ArborError('failed-precondition', `volume ${plan.volume} is published to node ${published.join(', ')}; unpublish it before receiving into it`);
    }
    if ((await this.deps.inUse(record.id)) || (this.deps.owned && (await this.deps.catalog.get(ownerKey(record.id))))) {
      throw new ArborError('failed-precondition', `volume ${plan.volume} is in use (open for I/O); stop its users before receiving into it`);
    }
    // Letting go of an idle open copy committed what it held: judge the volume as it is now.
    const current = await volumeEntry(this.deps.catalog, { id: record.id });
    if (!current) throw new ArborError('not-found', `volume ${plan.volume} was deleted during the receive`);
    if (decodeVolume(current).root !== asShared(base.root) && !plan.force) {
      throw new ArborError(
        'failed-precondition',
        `volume ${plan.volume} was written after @${base.name}; receiving would discard those writes: snapshot them first, or receive with --force to discard them`,
      );
    }
    return { entry: current, record: decodeVolume(current), base };
  }

  private async stagingRecord(staging: ReceiveStaging, plan: ReceivePlan): Promise<VolumeRecord> {
    const entry = await volumeEntry(this.deps.catalog, { id: staging.id });
    const record = entry && decodeVolume(entry);
    if (!record || record.name !== staging.name || record.labels?.[receiveLabel] !== plan.volume) {
      throw new ArborError(
        'not-found',
        `the staging volume ${staging.name} of the receive into ${plan.volume} is gone (another receive into ${plan.volume} removed it?); receive again`,
      );
    }
    return record;
  }

  /** Staging volumes of earlier receives into `volume` that nobody has open: a receive was killed. */
  private async removeAbandoned(volume: string): Promise<void> {
    for (const record of await this.deps.listVolumes()) {
      if (!record.name.startsWith(stagingPrefix) || record.labels?.[receiveLabel] !== volume || (await this.deps.inUse(record.id))) continue;
      if (this.deps.owned && (await this.deps.catalog.get(ownerKey(record.id)))) continue;
      await this.deps.deleteVolume({ id: record.id });
      this.deps.log.info('removed the staging volume of an abandoned receive', { staging: record.name, volume });
    }
  }
}

function validatePlan(plan: ReceivePlan): void {
  validateName(plan.volume, 'volume');
  validateName(plan.snapshot, 'snapshot');
  validateVolumeSize(plan.sizeBytes, `the received snapshot ${plan.volume}@${plan.snapshot}`);
  validateExtentSize(plan.extentSizeBytes, `the received snapshot ${plan.volume}@${plan.snapshot}`);
  if (!plan.origin) throw new ArborError('invalid-argument', 'a receive needs the origin of the snapshot it receives');
  if (plan.base && (!plan.base.name || !plan.base.origin)) throw new ArborError('invalid-argument', 'an incremental receive names its base by name and origin');
}
