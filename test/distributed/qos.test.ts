import assert from 'node:assert/strict';
import path from 'node:path';
import { FileBlobStore } from '../../store/blobs/files';
import { EtcdCatalog, parseStoreUrl } from '../../store/catalog/etcd';
import { QosLimits } from '../../store/qos';
import { Store } from '../../store/store';
import { etcdForSuite } from '../support/etcd';
import { tempDir } from '../support/tmp';

const until = async (what: string, check: () => boolean, timeoutMs = 5000) => {
  const end = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
};

/**
 * Two stores on one etcd, as two nodes: limits set through one (the controller's)
 * reach the NBD server of the other (the volume's owner) through its watch on qos/.
 */
describe('per-volume QoS on etcd: a limit set on one node reaches the node that serves the volume', function () {
  this.timeout(60_000);
  const suite = etcdForSuite();
  const stores: Store[] = [];
  let dir: { dir: string; cleanup: () => void };
  before(() => (dir = tempDir()));
  after(async () => {
    for (const store of stores) await store.close();
    dir?.cleanup();
  });

  const open = async (nodeId: string) => {
    const catalog = await EtcdCatalog.open(parseStoreUrl(`etcd://${suite.cluster.endpoints.map((e) => new URL(e).host).join(',')}/qos`));
    const store = await Store.open(catalog, FileBlobStore.open(path.join(dir.dir, nodeId), { serialsBelow: [] }), undefined, { nodeId, leaseTtlMs: 5000 });
    stores.push(store);
    return store;
  };

  it('the owner follows the limits another node sets, changes and lifts, and a deleted volume leaves none', async () => {
    const owner = await open('node-a');
    const controller = await open('node-b');
    const record = await controller.createVolume('shared', { sizeBytes: 1024 * 1024 });
    await controller.setVolumeQos({ id: record.id }, { maxIops: 500 });
    const seen: QosLimits[] = [];
    const handle = await owner.acquireVolume({ id: record.id });
    const stop = await owner.followVolumeQos(record.id, (limits) => seen.push(limits));
    assert.deepEqual(seen, [{ maxIops: 500 }], 'the follower starts from the stored limits');

    await controller.setVolumeQos({ name: 'shared' }, { maxIops: 2000, maxBandwidthBytes: 1 << 20, burstSeconds: 1 });
    await until('the change', () => seen.length === 2);
    assert.deepEqual(seen[1], { maxIops: 2000, maxBandwidthBytes: 1 << 20, burstSeconds: 1 });
    await controller.setVolumeQos({ name: 'shared' }, {});
    await until('the limits lifted', () => seen.length === 3);
    assert.deepEqual(seen[2], {});
    assert.deepEqual(await owner.volumeQos({ name: 'shared' }), {});

    await controller.setVolumeQos({ name: 'shared' }, { maxIops: 7 });
    await until('the last change', () => seen.length === 4);
    stop();
    await handle.release();
    // Deleted through its owner (an owner request, or here the store that opens it): the key goes with it.
    await controller.deleteVolume({ name: 'shared' });
    assert.deepEqual(await stores[0].ctx.catalog.list('qos/'), [], 'no limits outlive their volume');
    await assert.rejects(controller.setVolumeQos({ name: 'shared' }, { maxIops: 1 }), /volume .*shared.* (does not exist|not found)/i);
  });
});
