/**
 * Group snapshots: snapshots of several volumes at one instant. Every volume is held
 * (in id order) and committed, then one catalog transaction writes every snapshot,
 * shares every root and records the group; a crash leaves all of it or none of it.
 * Volumes another process owns are held by their owners (group-holds.ts), who wait
 * for the group's outcome.
 */
import { Log } from '../lib/logger';
import { Compare, Op, absent, del, put, unchanged } from './catalog/catalog';
import { StoreContext } from './context';
import { ArborError } from './errors';
import { GroupMember, HeldForGroup, abortUnlessDecided, awaitOutcome, newGroupToken, outcomeInTransaction } from './group-holds';
import { Ref, byName, groupEntry, notFound, snapshotEntry } from './lookups';
import { VolumeHandle } from './open-volumes';
import { OwnerRequests } from './owner-requests';
import { OwnedElsewhere } from './ownership';
import {
  GroupSnapshotRecord,
  SnapshotRecord,
  VolumeRecord,
  decodeGroup,
  decodeSnapshot,
  keys,
  newGroupId,
  newSnapshotId,
  snapshotDeletes,
  snapshotPuts,
  validateName,
} from './records';

export interface GroupSnapshotsOptions {
  ctx: StoreContext;
  log: Log;
  acquire(ref: Ref): Promise<VolumeHandle>;
  getVolume(ref: Ref): Promise<VolumeRecord>;
  /** Present where volumes have owners. */
  requests?: OwnerRequests;
}

export class GroupSnapshots {
  constructor(private readonly options: GroupSnapshotsOptions) {}

  async create(name: string, volumeRefs: Ref[]): Promise<GroupSnapshotRecord> {
    validateName(name, 'group snapshot');
    if (volumeRefs.length === 0) throw new ArborError('invalid-argument', `group snapshot ${name}: give at least one volume`);
    const ids = [...new Set((await Promise.all(volumeRefs.map((ref) => this.options.getVolume(ref)))).map((v) => v.id))].sort();
    for (;;) {
      const existing = await this.find({ name });
      if (existing) {
        if ([...existing.volumeIds].sort().join() === ids.join()) return existing;
        throw new ArborError('already-exists', `group snapshot ${name} already exists with other volumes`);
      }
      const created = await this.snapshotOnce(name, ids);
      if (created) {
        this.options.log.info('group snapshot created', { group: name, id: created.id, volumes: created.volumeIds });
        return created;
      }
    }
  }

  async find(ref: Ref): Promise<GroupSnapshotRecord | undefined> {
    const entry = await groupEntry(this.options.ctx.catalog, ref);
    return entry && decodeGroup(entry);
  }

  async list(): Promise<GroupSnapshotRecord[]> {
    return (await this.options.ctx.catalog.list(keys.groups)).map(decodeGroup).sort(byName);
  }

  /** Deletes a group snapshot and every snapshot in it, in one transaction. */
  async delete(ref: Ref): Promise<void> {
    const { catalog } = this.options.ctx;
    for (;;) {
      const entry = await groupEntry(catalog, ref);
      if (!entry) throw notFound('group snapshot', ref);
      const group = decodeGroup(entry);
      const ops: Op[] = [del(keys.group(group.id)), del(keys.groupName(group.name))];
      const compares: Compare[] = [unchanged(entry)];
      for (const snapshotId of group.snapshotIds) {
        const snapshot = await catalog.get(keys.snapshot(snapshotId));
        if (!snapshot) continue;
        compares.push(unchanged(snapshot));
        const record = decodeSnapshot(snapshot);
        ops.push(...snapshotDeletes(record), del(keys.snapshotName(record.name)));
      }
      if ((await catalog.txn(compares, ops)).succeeded) {
        this.options.log.info('group snapshot deleted', { group: group.name, id: group.id });
        return;
      }
    }
  }

  /** Another process asks this one, which owns the volume, to hold it for a group snapshot. */
  async holdForAsker(volumeId: string, token: string): Promise<HeldForGroup> {
    const member = await this.holdMember(await this.options.acquire({ id: volumeId }));
    awaitOutcome(this.options.ctx.catalog, token, member, this.options.log);
    return { compares: member.compares, next: member.next };
  }

  /**
   * Holds every volume of the group (in id order): those open here or detached are
   * held here; those another process owns are held by their owners, who wait for the
   * group's outcome. Then one transaction, or none.
   */
  private async snapshotOnce(name: string, ids: string[]): Promise<GroupSnapshotRecord | undefined> {
    const { requests } = this.options;
    const token = newGroupToken();
    const members: GroupMember[] = [];
    let remote = false;
    try {
      for (const id of ids) {
        try {
          members.push(await this.holdMember(await this.options.acquire({ id })));
        } catch (err) {
          if (!(err instanceof OwnedElsewhere) || !requests) throw err;
          remote = true;
          const held = (await requests.ask(err.owner, { op: 'holdForGroup', volumeId: id, token })) as HeldForGroup;
          // The owner applies the outcome and releases the volume itself.
          members.push({ volumeId: id, volumeName: held.next.name, compares: held.compares, next: held.next, committed: () => {}, release: () => {} });
        }
      }
      return await this.snapshotTogether(name, members, remote ? token : undefined);
    } finally {
      // Owners still holding learn the outcome: committed, or aborted now.
      if (remote)
        await abortUnlessDecided(this.options.ctx.catalog, token).catch((err) =>
          this.options.log.warn('could not decide a group snapshot outcome; owners decide it after their timeout', { error: (err as Error).message }),
        );
      for (const member of members) member.release();
    }
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
    const { catalog } = this.options.ctx;
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
      const names = [keys.snapshotName(snapshot.name), keys.volumeSnapshotName(snapshot.volumeId, snapshot.name)];
      compares.push(...member.compares, ...names.map((key) => absent(key)));
      ops.push(put(keys.volume(member.volumeId), member.next), ...snapshotPuts(snapshot), put(keys.snapshotName(snapshot.name), snapshot.id));
    });
    ops.push(put(keys.group(group.id), group), put(keys.groupName(name), group.id));
    if (token) {
      const outcome = outcomeInTransaction(token);
      compares.push(outcome.compare);
      ops.push(outcome.op);
    }
    const result = await catalog.txn(compares, ops);
    if (!result.succeeded) {
      for (let i = 0; i < members.length; i++) {
        const memberName = `${name}.${i}`;
        // Taken store-wide, or among the member volume's own snapshots (made by the CLI).
        if ((await snapshotEntry(catalog, { name: memberName })) || (await snapshotEntry(catalog, { volume: { id: members[i].volumeId }, name: memberName }))) {
          throw new ArborError('already-exists', `snapshot name ${name}.${i}, which group snapshot ${name} needs, is taken`);
        }
      }
      return undefined;
    }
    for (const member of members) member.committed(result.revision);
    return group;
  }
}
