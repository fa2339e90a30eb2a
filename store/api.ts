import { Store } from './store';

/**
 * The store's calls that other processes may make (the CLI, a controller next to a
 * node plugin that holds the data directory): the same whether the store is open
 * in this process or reached through an admin socket.
 */
export type StoreMethod =
  | 'createVolume'
  | 'listVolumes'
  | 'volumesPage'
  | 'getVolume'
  | 'findVolume'
  | 'volumeUsage'
  | 'volumeQos'
  | 'setVolumeQos'
  | 'cloneVolume'
  | 'resizeVolume'
  | 'deleteVolume'
  | 'createSnapshot'
  | 'listSnapshots'
  | 'snapshotsPage'
  | 'getSnapshot'
  | 'findSnapshot'
  | 'deleteSnapshot'
  | 'diffSnapshots'
  | 'snapshotAllocated'
  | 'beginReceive'
  | 'finishReceive'
  | 'abortReceive'
  | 'collectGarbage'
  | 'createGroupSnapshot'
  | 'findGroupSnapshot'
  | 'listGroupSnapshots'
  | 'deleteGroupSnapshot'
  | 'publications'
  | 'publishVolume'
  | 'unpublishVolume'
  | 'availableBytes'
  | 'healthy'
  | 'registerNode'
  | 'findNode';

export type StoreApi = Pick<Store, StoreMethod>;
