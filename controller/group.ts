import type { GroupControllerHandlers } from '../csi/generated/csi/v1/GroupController';
import { validateName } from '../store/names';
import { failedPrecondition, invalid, notFound } from '../csi/errors';
import { UnaryHandlers } from '../csi/server';
import { StoreApi } from '../store/api';
import { GroupSnapshotRecord, SnapshotRecord } from '../store/records';
import { groupMessage } from './messages';

/**
 * The CSI GroupController: snapshots of several volumes taken at one instant in one
 * catalog transaction (Olive's consistent branching), so the group is
 * crash-consistent across its volumes.
 */
export function groupControllerService(store: StoreApi): UnaryHandlers<GroupControllerHandlers> {
  const members = async (group: GroupSnapshotRecord): Promise<SnapshotRecord[]> =>
    (await Promise.all(group.snapshotIds.map((id) => store.findSnapshot({ id })))).filter((s): s is SnapshotRecord => !!s);

  /** The caller's snapshot_ids, when given, must be exactly the group's. */
  const checkMembers = (group: GroupSnapshotRecord, ids: string[]): void => {
    if (ids.length === 0) return;
    if ([...ids].sort().join() !== [...group.snapshotIds].sort().join()) {
      throw failedPrecondition(`snapshot_ids do not match group snapshot ${group.name}, which holds ${group.snapshotIds.join(', ')}`);
    }
  };

  return {
    async GroupControllerGetCapabilities() {
      return { capabilities: [{ rpc: { type: 'CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT' } }] };
    },

    async CreateVolumeGroupSnapshot(request) {
      if (!request.name) throw invalid('name is required');
      validateName(request.name, 'group snapshot', 'name');
      if (!request.source_volume_ids?.length) throw invalid('source_volume_ids is required');
      for (const key of Object.keys(request.parameters)) {
        if (!key.startsWith('csi.storage.k8s.io/')) throw invalid(`unknown group snapshot parameter ${JSON.stringify(key)}`);
      }
      for (const id of request.source_volume_ids) if (!(await store.findVolume({ id }))) throw notFound(`source volume ${id} does not exist`);
      const group = await store.createGroupSnapshot(
        request.name,
        request.source_volume_ids.map((id) => ({ id })),
      );
      return { group_snapshot: groupMessage(group, await members(group)) };
    },

    async GetVolumeGroupSnapshot(request) {
      if (!request.group_snapshot_id) throw invalid('group_snapshot_id is required');
      const group = await store.findGroupSnapshot({ id: request.group_snapshot_id });
      if (!group) throw notFound(`group snapshot ${request.group_snapshot_id} does not exist`);
      checkMembers(group, request.snapshot_ids);
      return { group_snapshot: groupMessage(group, await members(group)) };
    },

    async DeleteVolumeGroupSnapshot(request) {
      if (!request.group_snapshot_id) throw invalid('group_snapshot_id is required');
      const group = await store.findGroupSnapshot({ id: request.group_snapshot_id });
      if (!group) return {};
      checkMembers(group, request.snapshot_ids);
      await store.deleteGroupSnapshot({ id: group.id });
      return {};
    },
  };
}
