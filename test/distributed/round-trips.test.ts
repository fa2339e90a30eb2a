import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import path from 'node:path';
import { Etcd3 } from 'etcd3';
import * as grpc from '@grpc/grpc-js';
import { controllerService } from '../../controller/service';
import { toGrpcError } from '../../csi/errors';
import { FileBlobStore } from '../../store/blobs/files';
import { EtcdCatalog, parseStoreUrl } from '../../store/catalog/etcd';
import { isArborError } from '../../store/errors';
import { keys } from '../../store/records';
import { Store } from '../../store/store';
import { etcdForSuite } from '../support/etcd';
import { RoundTrips } from '../support/round-trips';
import { SharedBlobs } from '../support/shared-blobs';
import { tempDir } from '../support/tmp';

const extentBytes = 64 * 1024;
const prefix = '/round-trips/arbor/';

/**
 * The catalog round trips of the controller's hot paths on a real etcd (issue 16:
 * each is a millisecond or more on a loaded machine), and that the shortcuts that
 * save them keep every answer: a detached snapshot reads once and commits once; a
 * clone of a snapshot the controller just made or looked up commits at once, and still
 * answers right when the snapshot went or the name was taken meanwhile; an owner
 * answers a snapshot in the snapshot's own transaction.
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

  const cloneRequest = (name: string, snapshotId: string) =>
    ({
      name,
      parameters: {},
      mutable_parameters: {},
      secrets: {},
      volume_capabilities: [{ access_mode: { mode: 'SINGLE_NODE_WRITER' }, block: {} }],
      volume_content_source: { snapshot: { snapshot_id: snapshotId } },
    }) as unknown as Parameters<NonNullable<ReturnType<typeof controllerService>['CreateVolume']>>[0];

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

  it('snapshots a volume it last snapshotted detached in one transaction, and never of a record that changed since', async () => {
    const controller = stores[0];
    const other = await open('writer');
    const volume = await controller.createVolume('again', { sizeBytes: 16 * extentBytes });
    await controller.createSnapshot({ id: volume.id }, 'again-1');
    const second = await counter.during(() => controller.createSnapshot({ id: volume.id }, 'again-2'));
    assert.equal(second.trips, 1, `the transaction alone: ${second.calls.join(', ')}`);
    assert.equal(second.value.root, (await controller.getVolume({ id: volume.id })).root);

    // Written and committed by another node since: the transaction fails and reads what changed in the same round trip.
    const written = crypto.randomBytes(4096);
    const held = await other.acquireVolume({ id: volume.id });
    await held.volume.write(2 * extentBytes, written);
    await held.volume.flush();
    await held.release();
    const third = await counter.during(() => controller.createSnapshot({ id: volume.id }, 'again-3'));
    assert.equal(third.trips, 2, `the failed transaction (reading the record), then one that holds: ${third.calls.join(', ')}`);
    assert.notEqual(third.value.root, second.value.root);
    assert.ok((await (await controller.openSnapshot({ id: third.value.id })).read(2 * extentBytes, 4096)).equals(written), 'the snapshot holds the write');

    // Held by another node: the owner key fails the transaction, and the owner makes the snapshot of what it holds.
    const later = crypto.randomBytes(4096);
    const owned = await other.acquireVolume({ id: volume.id });
    try {
      await owned.volume.write(3 * extentBytes, later);
      const fourth = await controller.createSnapshot({ id: volume.id }, 'again-4');
      assert.ok((await (await controller.openSnapshot({ id: fourth.id })).read(3 * extentBytes, 4096)).equals(later), 'the owner snapshotted what it held');
    } finally {
      await owned.release();
    }
    // A retry of a snapshot made in one transaction answers with it.
    assert.equal((await controller.createSnapshot({ id: volume.id }, 'again-2')).id, second.value.id);
  });

  it('clones a snapshot this store made through the controller in one transaction, and one it did not in two round trips', async () => {
    const controller = stores[0];
    const other = await open('maker');
    const volume = await controller.createVolume('source', { sizeBytes: 16 * extentBytes });
    const snapshot = await controller.createSnapshot({ id: volume.id }, 'source-1');
    const csi = controllerService({ store: controller });
    const { value: made, trips, calls } = await counter.during(() => csi.CreateVolume!(cloneRequest('clone-1', snapshot.id)));
    assert.equal(trips, 1, `the transaction alone: ${calls.join(', ')}`);
    const record = await controller.getVolume({ name: 'clone-1' });
    assert.equal(made.volume!.volume_id, record.id);
    assert.equal(record.lineage[0].snapshotId, snapshot.id);
    assert.equal(record.sizeBytes, volume.sizeBytes);

    // A retry fails the transaction on the name, and answers with the same volume; a
    // request of another size for the name is refused, and the volume left as it was.
    assert.equal((await csi.CreateVolume!(cloneRequest('clone-1', snapshot.id))).volume!.volume_id, record.id);
    const larger = { ...cloneRequest('clone-1', snapshot.id), capacity_range: { required_bytes: String(32 * extentBytes), limit_bytes: '0' } };
    await assert.rejects(csi.CreateVolume!(larger), (err) => toGrpcError(err).code === grpc.status.ALREADY_EXISTS);
    assert.deepEqual(await controller.getVolume({ name: 'clone-1' }), record);

    // Made by another node: looked up first (the snapshot with the name), then the transaction.
    const theirs = await other.createSnapshot({ id: volume.id }, 'source-2');
    const lookedUp = await counter.during(() => csi.CreateVolume!(cloneRequest('clone-2', theirs.id)));
    assert.equal(lookedUp.trips, 2, `the lookup, then the transaction: ${lookedUp.calls.join(', ')}`);
    assert.equal((await controller.getVolume({ name: 'clone-2' })).lineage[0].snapshotId, theirs.id);
  });

  it('answers a clone right when the snapshot it looked up was deleted meanwhile by another node', async () => {
    const controller = stores[0];
    const other = await open('other');
    const volume = await controller.createVolume('gone-source', { sizeBytes: 16 * extentBytes });
    const snapshot = await controller.createSnapshot({ id: volume.id }, 'gone-1');
    assert.ok(await controller.findSnapshot({ id: snapshot.id }));
    await other.deleteSnapshot({ id: snapshot.id });
    await assert.rejects(controller.cloneVolume('of-gone', { snapshot: { id: snapshot.id } }), (err) => isArborError(err, 'not-found'));
    assert.equal(await controller.findVolume({ name: 'of-gone' }), undefined, 'no volume was made of a deleted snapshot');
    const csi = controllerService({ store: controller });
    await assert.rejects(csi.CreateVolume!(cloneRequest('of-gone', snapshot.id)), (err) => toGrpcError(err).code === grpc.status.NOT_FOUND);
  });

  it('answers a clone right when another node took the name after the lookup', async () => {
    const [controller, other] = [stores[0], stores[1]];
    const volume = await controller.createVolume('raced-source', { sizeBytes: 16 * extentBytes });
    const snapshot = await controller.createSnapshot({ id: volume.id }, 'raced-1');
    const otherSnapshot = await controller.createSnapshot({ id: volume.id }, 'raced-2');
    assert.ok(await controller.findSnapshot({ id: snapshot.id }));
    // Taken by a clone of the same snapshot: the retry's answer is that volume.
    const twin = await other.cloneVolume('raced-twin', { snapshot: { id: snapshot.id } });
    assert.equal((await controller.cloneVolume('raced-twin', { snapshot: { id: snapshot.id } })).id, twin.id);
    // Taken by a clone of another snapshot: already-exists, and that volume is left as it was.
    const taken = await other.cloneVolume('raced-taken', { snapshot: { id: otherSnapshot.id } });
    assert.ok(await controller.findSnapshot({ id: snapshot.id }));
    await assert.rejects(controller.cloneVolume('raced-taken', { snapshot: { id: snapshot.id } }), (err) => isArborError(err, 'already-exists'));
    assert.deepEqual(await controller.getVolume({ name: 'raced-taken' }), taken);
  });

  it("answers a snapshot asked of the volume's owner in the snapshot's own transaction", async () => {
    const owner = await open('owner');
    const record = await owner.createVolume('attached', { sizeBytes: 16 * extentBytes });
    const held = await owner.acquireVolume({ id: record.id });
    try {
      const written = crypto.randomBytes(4096);
      await held.volume.write(extentBytes, written);
      // The request as the controller's store puts it (owner-requests.ts), watched for its answer.
      const id = crypto.randomBytes(8).toString('hex');
      const replyKey = `replies/an-asker/${id}`;
      const watcher = await etcd.watch().key(`${prefix}${replyKey}`).create();
      const reply = new Promise<{ value: string; modRevision: string }>((resolve) =>
        watcher.on('put', (kv) => resolve({ value: kv.value.toString(), modRevision: kv.mod_revision })),
      );
      await etcd
        .put(`${prefix}requests/owner/${id}`)
        .value(JSON.stringify({ op: 'createSnapshot', volumeId: record.id, name: 'attached-1', scope: 'store', from: 'an-asker', replyTo: replyKey }));
      const answer = await reply;
      await watcher.cancel();
      const { ok, result } = JSON.parse(answer.value) as { ok: boolean; result: { id: string } };
      assert.ok(ok);
      const snapshotKv = (await etcd.get(`${prefix}${keys.snapshot(result.id)}`).exec()).kvs[0];
      assert.equal(answer.modRevision, snapshotKv.mod_revision, 'the answer was written by the transaction that made the snapshot');
      const reader = await owner.openSnapshot({ id: result.id });
      assert.ok((await reader.read(extentBytes, 4096)).equals(written), 'the snapshot holds the write acknowledged before it was asked');
      // And through a store that asks (the controller's): the answer it hears is the snapshot made.
      const asked = await stores[0].createSnapshot({ id: record.id }, 'attached-2');
      assert.equal((await owner.getSnapshot({ id: asked.id })).name, 'attached-2');
    } finally {
      await held.release();
    }
  });
});
