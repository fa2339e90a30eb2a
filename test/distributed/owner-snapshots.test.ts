import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import path from 'node:path';
import { Etcd3 } from 'etcd3';
import { FileBlobStore } from '../../store/blobs/files';
import { EtcdCatalog, parseStoreUrl } from '../../store/catalog/etcd';
import { ownerKey } from '../../store/ownership';
import { keys } from '../../store/records';
import { Store } from '../../store/store';
import { etcdForSuite } from '../support/etcd';
import { SharedBlobs } from '../support/shared-blobs';
import { tempDir } from '../support/tmp';

const extentBytes = 64 * 1024;

const prefix = '/owner-snapshots/arbor/';

/**
 * Snapshots of a volume another node serves, asked through the owner requests, on a
 * real etcd (the blobs in one non-rewritable file store both nodes share, which is how
 * S3 behaves for the engine). What is checked: the snapshot holds every write
 * acknowledged before it was asked, committed with them in one transaction; a name
 * taken under the owner's feet is refused and the writes are committed all the same;
 * and requests keep working with an owner from before answers went under the asker's
 * prefix.
 */
describe('snapshots of a volume another node serves, through its owner', function () {
  this.timeout(60_000);
  const suite = etcdForSuite();
  const stores: Store[] = [];
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

  const open = async (nodeId: string) => {
    const catalog = await EtcdCatalog.open(parseStoreUrl(`etcd://${hosts().join(',')}/owner-snapshots`));
    const store = await Store.open(catalog, new SharedBlobs(blobs), undefined, { nodeId, leaseTtlMs: 5000 });
    stores.push(store);
    return store;
  };

  /** How many times the key (relative to the store's prefix) was written since it was made: etcd counts them. */
  const version = async (key: string) => Number((await etcd.get(`${prefix}${key}`).exec()).kvs[0].version);

  it('holds every write acknowledged before it was asked, committed with them in one transaction', async () => {
    const nodeA = await open('node-a');
    const nodeB = await open('node-b');
    const record = await nodeA.createVolume('served', { sizeBytes: 64 * extentBytes });
    const onA = await nodeA.acquireVolume({ id: record.id });
    try {
      const written = crypto.randomBytes(3 * extentBytes + 4096);
      await onA.volume.write(extentBytes - 4096, written);
      // Not flushed: only acknowledged. Node B asks node A, which must make the writes durable into the snapshot.
      const versionBefore = await version(keys.volume(record.id));
      const snapshot = await nodeB.createSnapshot({ id: record.id }, 'through-owner');
      assert.equal(
        await version(keys.volume(record.id)),
        versionBefore + 1,
        "the writes' commit and the snapshot are one transaction: the volume record is written once",
      );
      const reader = await nodeB.openSnapshot({ id: snapshot.id });
      assert.ok((await reader.read(extentBytes - 4096, written.length)).equals(written), 'the snapshot holds the acknowledged writes');
      assert.equal(onA.volume.uncommitted().extents, 0, 'nothing acknowledged is left uncommitted on the owner');
      // A retry is answered with the same snapshot, without asking the owner for another.
      assert.equal((await nodeB.createSnapshot({ id: record.id }, 'through-owner')).id, snapshot.id);
      // Writes after the snapshot do not reach it.
      await onA.volume.write(extentBytes, Buffer.alloc(4096, 7));
      assert.ok((await reader.read(extentBytes - 4096, written.length)).equals(written), 'a write after the snapshot does not change it');
    } finally {
      await onA.release();
    }
  });

  it("refuses a name taken under the owner's feet and still commits the writes it captured", async () => {
    const nodeA = stores[0];
    const other = await nodeA.createVolume('other', { sizeBytes: 16 * extentBytes });
    await nodeA.createSnapshot({ id: other.id }, 'taken');
    const record = await nodeA.createVolume('served-2', { sizeBytes: 16 * extentBytes });
    const onA = await nodeA.acquireVolume({ id: record.id });
    try {
      const before = (await nodeA.ctx.catalog.get(keys.volume(record.id)))!;
      await onA.volume.write(0, Buffer.alloc(4096, 9));
      // The request as an asker that looked before the name was taken would send it (and as one from before
      // per-asker answers: no replyTo), so the owner meets the taken name only in its transaction.
      const id = crypto.randomBytes(8).toString('hex');
      const reply = new Promise<string>(
        (resolve) =>
          void etcd
            .watch()
            .key(`${prefix}replies/${id}`)
            .create()
            .then((w) => w.on('put', (kv) => void w.cancel().then(() => resolve(kv.value.toString())))),
      );
      await new Promise((r) => setTimeout(r, 50));
      await etcd
        .put(`${prefix}requests/node-a/${id}`)
        .value(JSON.stringify({ op: 'createSnapshot', volumeId: record.id, name: 'taken', scope: 'store', from: 'an-older-asker' }));
      const answer = JSON.parse(await reply) as { ok: boolean; error?: { code: string; message: string } };
      assert.equal(answer.ok, false);
      assert.equal(answer.error?.code, 'already-exists');
      assert.match(answer.error.message, /already used by volume other/);
      const after = (await nodeA.ctx.catalog.get(keys.volume(record.id)))!;
      assert.notEqual(after.modRevision, before.modRevision, 'the writes the snapshot captured were committed');
      assert.equal(onA.volume.uncommitted().extents, 0);
      assert.deepEqual(
        (await nodeA.listSnapshots({ id: record.id })).map((s) => s.name),
        [],
        'no snapshot of the volume was made',
      );
      // The refused share left the tree as it was: writes go on, and a snapshot of another name holds them.
      await onA.volume.write(4096, Buffer.alloc(4096, 10));
      await onA.volume.flush();
      const snapshot = await stores[1].createSnapshot({ id: record.id }, 'free-name');
      const content = await (await stores[1].openSnapshot({ id: snapshot.id })).read(0, 8192);
      assert.ok(content.equals(Buffer.concat([Buffer.alloc(4096, 9), Buffer.alloc(4096, 10)])));
    } finally {
      await onA.release();
    }
  });

  it('hears an owner from before per-asker answers, which answers at the request id', async () => {
    const nodeB = stores[1];
    const record = await nodeB.createVolume('old-owner', { sizeBytes: 16 * extentBytes });
    // An older node owns the volume: its owner key on its own live lease, and it answers the old way.
    const lease = etcd.lease(10);
    const leaseId = await lease.grant();
    try {
      await lease.put(`${prefix}${ownerKey(record.id)}`).value(JSON.stringify({ nodeId: 'old-node', lease: leaseId, acquiredAt: new Date().toISOString() }));
      const requests = await etcd.watch().prefix(`${prefix}requests/old-node/`).create();
      const seen: Array<Record<string, unknown>> = [];
      requests.on('put', (kv) => {
        const key = kv.key.toString();
        const requestId = key.slice(key.lastIndexOf('/') + 1);
        const request = JSON.parse(kv.value.toString()) as Record<string, unknown>;
        seen.push({ ...request, requestId });
        const snapshot = { id: 'snap-00000000000000aa', name: request.name, volumeId: record.id, volumeName: record.name };
        void etcd
          .delete()
          .key(key)
          .then(() => lease.put(`${prefix}replies/${requestId}`).value(JSON.stringify({ ok: true, result: snapshot })));
      });
      try {
        const started = Date.now();
        const answer = await nodeB.createSnapshot({ id: record.id }, 'asked-of-old-node');
        assert.equal(answer.id, 'snap-00000000000000aa');
        assert.ok(Date.now() - started < 5000, 'the answer at the old key is found by the poll within seconds');
        assert.equal(seen.length, 1);
        assert.equal(seen[0].from, 'node-b');
        assert.equal(seen[0].replyTo, `replies/node-b/${seen[0].requestId as string}`, 'a new asker says where it wants the answer');
      } finally {
        await requests.cancel();
      }
    } finally {
      await lease.revoke();
    }
  });
});
