import assert from 'node:assert/strict';
import path from 'node:path';
import { Etcd3 } from 'etcd3';
import { FileBlobStore } from '../../store/blobs/files';
import { Catalog, Lease } from '../../store/catalog/catalog';
import { EtcdCatalog, parseStoreUrl } from '../../store/catalog/etcd';
import { decodeOwner, ownerKey } from '../../store/ownership';
import { Store } from '../../store/store';
import { etcdForSuite } from '../support/etcd';
import { SharedBlobs } from '../support/shared-blobs';
import { tempDir } from '../support/tmp';

const extentBytes = 64 * 1024;

/** One object store shared by two nodes; `sync` can be held at a gate to stop a commit between its capture and its catalog write. */
class GatedBlobs extends SharedBlobs {
  private gate?: { entered: () => void; opened: Promise<void> };

  /** The next sync waits until the returned `open` is called; `entered` resolves once it waits. */
  holdNextSync(): { entered: Promise<void>; open: () => void } {
    let entered!: () => void;
    let open!: () => void;
    const enteredPromise = new Promise<void>((r) => (entered = r));
    this.gate = { entered, opened: new Promise<void>((r) => (open = r)) };
    return { entered: enteredPromise, open };
  }

  override async sync(ids: Iterable<number>): Promise<void> {
    const gate = this.gate;
    if (gate) {
      this.gate = undefined;
      gate.entered();
      await gate.opened;
    }
    return this.inner.sync(ids);
  }
}

/**
 * An owner whose lease ends while one of its commits is under way (its blobs being
 * synced): the flush must fail, nothing may be committed, and the blobs its capture
 * would have freed, still in the tree the next owner takes over, must stay.
 */
describe('an owner that loses its lease in the middle of a commit', function () {
  this.timeout(60_000);
  const suite = etcdForSuite();
  const stores: Store[] = [];
  let dir: { dir: string; cleanup: () => void };
  let files: FileBlobStore;
  let blobs: GatedBlobs;
  const hosts = () => suite.cluster.endpoints.map((e) => new URL(e).host);

  before(() => {
    dir = tempDir();
    files = FileBlobStore.open(path.join(dir.dir, 'blobs'), { serialsBelow: [], rewritable: false });
    blobs = new GatedBlobs(files);
  });
  after(async () => {
    for (const store of stores) await store.close();
    await files?.close();
    dir?.cleanup();
  });

  const open = async (nodeId: string) => {
    const catalog = await EtcdCatalog.open(parseStoreUrl(`etcd://${hosts().join(',')}/lost-owner`));
    const store = await Store.open(catalog, blobs, undefined, { nodeId, leaseTtlMs: 2000 });
    stores.push(store);
    return store;
  };

  it('the flush fails, and the next owner reads every byte the last commit held', async () => {
    const nodeA = await open('node-a');
    const nodeB = await open('node-b');
    const record = await nodeA.createVolume('fenced', { sizeBytes: 16 * extentBytes });
    const onA = await nodeA.acquireVolume({ id: record.id });
    await onA.volume.write(0, Buffer.alloc(extentBytes, 1));
    await onA.volume.flush();
    // Its extent is synced, so immutable: this write goes to a new blob, and the committed one is freed by the next commit.
    await onA.volume.write(0, Buffer.alloc(extentBytes, 2));

    const gate = blobs.holdNextSync();
    const flush = onA.volume.flush();
    const flushed = flush.then(
      () => 'succeeded',
      (err: Error) => err.message,
    );
    await gate.entered;
    // Node A's lease ends (as when it was paused past its TTL): etcd deletes its owner key.
    const owner = decodeOwner((await nodeB.ctx.catalog.get(ownerKey(record.id)))!);
    const etcd = new Etcd3({ hosts: hosts() });
    try {
      await etcd.leaseClient.leaseRevoke({ ID: owner.lease });
    } finally {
      etcd.close();
    }
    const deadline = Date.now() + 10_000;
    while (onA.volume.isOpen) {
      assert.ok(Date.now() < deadline, 'node A never noticed that its lease ended');
      await new Promise((r) => setTimeout(r, 20));
    }
    gate.open();
    assert.match(await flushed, /lost its ownership/, 'a flush whose commit could not land reports it');

    const onB = await nodeB.acquireVolume({ id: record.id });
    try {
      const content = await onB.volume.read(0, extentBytes);
      assert.ok(content.equals(Buffer.alloc(extentBytes, 1)), 'node B reads what node A last committed');
      await onB.volume.write(extentBytes, Buffer.alloc(extentBytes, 3));
      await onB.volume.flush();
    } finally {
      await onB.release();
    }
    await onA.release().catch(() => undefined);
  });
  it('a lease this node gave up for lost while etcd still kept it: the owner keys left on it do not keep the node from its volumes', async () => {
    // Keep-alives unanswered here for twice the TTL while etcd still had them: this node
    // counts the lease lost (and every volume on it), and etcd ends it only later.
    const etcd = await EtcdCatalog.open(parseStoreUrl(`etcd://${hosts().join(',')}/lost-owner-2`));
    const leases: Array<{ lease: Lease; loseNow: () => void }> = [];
    const catalog = Object.create(etcd) as Catalog;
    catalog.grantLease = async (ttlMs: number) => {
      const real = await etcd.grantLease(ttlMs);
      let loseNow!: () => void;
      const lost = new Promise<Error>((resolve) => (loseNow = () => resolve(new Error('no keep-alive answered (as this test says)'))));
      const lease = { id: real.id, lost: Promise.race([real.lost, lost]), revoke: () => real.revoke() };
      leases.push({ lease, loseNow });
      return lease;
    };
    // A catalog of its own allocates blob ids afresh: blobs of their own too.
    const ownFiles = FileBlobStore.open(path.join(dir.dir, 'blobs-2'), { serialsBelow: [], rewritable: false });
    const node = await Store.open(catalog, ownFiles, undefined, { nodeId: 'node-c', leaseTtlMs: 2000 });
    stores.push(node);
    const record = await node.createVolume('kept', { sizeBytes: 4 * extentBytes });
    const first = await node.acquireVolume({ id: record.id });
    await first.volume.write(0, Buffer.alloc(extentBytes, 7));
    await first.volume.flush();
    leases[0].loseNow();
    const deadline = Date.now() + 10_000;
    while (first.volume.isOpen || leases.length < 2) {
      assert.ok(Date.now() < deadline, 'the node never took a new lease');
      await new Promise((r) => setTimeout(r, 20));
    }
    const owner = decodeOwner((await etcd.get(ownerKey(record.id)))!);
    assert.equal(owner.lease, leases[0].lease.id, 'the owner key is still on the lease etcd keeps');
    await assert.rejects(first.volume.write(0, Buffer.alloc(extentBytes, 8)), /lost its ownership/);
    const again = await node.acquireVolume({ id: record.id });
    try {
      assert.ok((await again.volume.read(0, extentBytes)).equals(Buffer.alloc(extentBytes, 7)), 'what was flushed is there');
      assert.equal(decodeOwner((await etcd.get(ownerKey(record.id)))!).lease, leases[1].lease.id, 'the volume is held on the new lease');
    } finally {
      await again.release();
      await first.release().catch(() => undefined);
    }
    await leases[0].lease.revoke();
  });
});
