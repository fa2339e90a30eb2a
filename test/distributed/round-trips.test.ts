import assert from 'node:assert/strict';
import path from 'node:path';
import { Etcd3 } from 'etcd3';
import { FileBlobStore } from '../../store/blobs/files';
import { EtcdCatalog, parseStoreUrl } from '../../store/catalog/etcd';
import { isArborError } from '../../store/errors';
import { Store } from '../../store/store';
import { etcdForSuite } from '../support/etcd';
import { RoundTrips } from '../support/round-trips';
import { SharedBlobs } from '../support/shared-blobs';
import { tempDir } from '../support/tmp';

const extentBytes = 64 * 1024;

/**
 * The catalog round trips of the controller's hot paths on a real etcd (issue 16:
 * each is a millisecond or more on a loaded machine), and that the shortcuts that
 * save them keep every answer: a detached snapshot reads once and commits once.
 */
describe('catalog round trips of snapshots and clones', function () {
  this.timeout(60_000);
  const suite = etcdForSuite();
  const stores: Store[] = [];
  const counter = new RoundTrips();
  let dir: { dir: string; cleanup: () => void };
  let blobs: FileBlobStore;
  let etcd: Etcd3;
  const hosts = () => suite.cluster.endpoints.map((e) => new URL(e).host);

  before(() => {
    dir = tempDir();
    blobs = FileBlobStore.open(path.join(dir.dir, 'blobs'), { serialsBelow: [], rewritable: false });
    etcd = new Etcd3({ hosts: suite.cluster.endpoints });
  });
  after(async () => {
    for (const store of stores) await store.close();
    etcd?.close();
    await blobs?.close();
    dir?.cleanup();
  });

  const open = async (nodeId: string, counted = false) => {
    const catalog = await EtcdCatalog.open(parseStoreUrl(`etcd://${hosts().join(',')}/round-trips`));
    const store = await Store.open(counted ? counter.wrap(catalog) : catalog, new SharedBlobs(blobs), undefined, { nodeId, leaseTtlMs: 5000 });
    stores.push(store);
    return store;
  };

  it('snapshots a detached volume in two round trips: one read, one transaction', async () => {
    const controller = await open('controller', true);
    const volume = await controller.createVolume('detached', { sizeBytes: 16 * extentBytes });
    const { value: snapshot, trips, calls } = await counter.during(() => controller.createSnapshot({ id: volume.id }, 'detached-1'));
    assert.equal(trips, 2, `round trips: ${calls.join(', ')}`);
    // A retry reads once and answers with the same snapshot.
    const retried = await counter.during(() => controller.createSnapshot({ id: volume.id }, 'detached-1'));
    assert.equal(retried.value.id, snapshot.id);
    assert.equal(retried.trips, 2, `a retry reads the name keys with the volume, then the snapshot: ${retried.calls.join(', ')}`);
    await assert.rejects(controller.createSnapshot({ id: 'no-such-volume' }, 'detached-2'), (err) => isArborError(err, 'not-found'));
  });
});
