import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { classForBytes, classOf } from '../../store/blob-id';
import { BlobStore } from '../../store/blobs/blobs';
import { openDataDir } from '../../store/embedded';
import { silentLog } from '../../lib/logger';
import { isArborError } from '../../store/errors';
import { asShared, blobOf, isPartial, makeEntry } from '../../store/entry';
import { getEntry, setEntry } from '../../store/map-node';
import { nodeBytesOf } from '../../store/partial';
import { Store } from '../../store/store';
import { orphanBlobs, reachableBlobs } from '../support/store-inspect';
import { memoryTempDir } from '../support/tmp';

const KiB = 1024;
const MiB = 1024 * KiB;
const extentSize = 64 * KiB;
const page = 4 * KiB;

/** Bytes the engine writes into data blobs (the extent size class), whatever path it takes. */
function countDataBytes(blobs: BlobStore): { bytes: number } {
  const counted = { bytes: 0 };
  const dataClass = classForBytes(extentSize);
  const writeNow = blobs.writeNow!.bind(blobs);
  blobs.writeNow = (id, offset, source, sourceOffset, length) => {
    if (classOf(id) === dataClass) counted.bytes += length;
    writeNow(id, offset, source, sourceOffset, length);
  };
  return counted;
}

/**
 * Partial extents (store/partial.ts): the first write into a shared extent copies
 * nothing; the pages it did not write keep reading through the shared extent. The
 * store model covers them at random; these check each state on purpose, and what it costs.
 */
describe('partial extents: copy-on-write at page granularity', function () {
  this.timeout(120_000);
  let dir: { dir: string; cleanup: () => void };
  let store: Store;
  let golden: Buffer;

  beforeEach(async () => {
    dir = memoryTempDir();
    store = await openDataDir(dir.dir);
    golden = randomBytes(MiB);
    await store.createVolume('gold', { sizeBytes: MiB, extentSizeBytes: extentSize });
    const gold = await store.openVolume({ name: 'gold' });
    await gold.write(0, golden);
    await gold.flush();
    await store.createSnapshot({ name: 'gold' }, 'base');
    await store.cloneVolume('vm', { snapshot: { name: 'base' } });
  });
  afterEach(async () => {
    await store.close();
    dir.cleanup();
  });

  const expectImage = async (name: string, image: Buffer): Promise<void> => {
    const volume = await store.openVolume({ name });
    const got = await volume.read(0, image.length);
    if (!got.equals(image)) {
      let at = 0;
      while (got[at] === image[at]) at++;
      assert.fail(`${name}: byte ${at} reads ${got[at]}, expected ${image[at]}`);
    }
    // Page by page too: a read within one page takes the synchronous path.
    for (let at = 0; at < image.length; at += page) {
      const one = Buffer.alloc(page);
      await volume.readInto(at, one, 0, page);
      assert.ok(one.equals(image.subarray(at, at + page)), `${name}: page at ${at}`);
    }
  };

  it('a 4 KiB first write into a shared extent writes one page, and every other page reads through the shared extent', async () => {
    const counted = countDataBytes(store.ctx.blobs);
    const vm = await store.openVolume({ name: 'vm' });
    const data = randomBytes(page);
    await vm.write(3 * page, data);
    await vm.flush();
    assert.equal(counted.bytes, page, 'one page of data written, not the 64 KiB extent');
    const image = Buffer.from(golden);
    data.copy(image, 3 * page);
    // The leaf is this clone's and wide now: a first write into another extent under it needs nothing loaded.
    const more = randomBytes(2 * page);
    assert.ok(vm.writeNow(5 * extentSize + 2 * page, more), 'a first write of whole pages under an own wide leaf is done at once');
    more.copy(image, 5 * extentSize + 2 * page);
    assert.ok(!vm.writeNow(6 * extentSize + 100, randomBytes(100)), 'one of part of a page must read the shared page first');
    assert.equal(counted.bytes, 3 * page);
    await expectImage('vm', image);
    await vm.flush();
    await store.close();
    store = await openDataDir(dir.dir);
    await expectImage('vm', image);
    await expectImage('gold', golden);
  });

  it('a write not aligned to pages fills the pages it covers in part from the shared extent', async () => {
    const counted = countDataBytes(store.ctx.blobs);
    const vm = await store.openVolume({ name: 'vm' });
    const image = Buffer.from(golden);
    for (const [at, length] of [
      [extentSize + 5000, 100],
      [2 * extentSize + page - 512, 1024],
      [3 * extentSize + 1, 2 * page],
    ]) {
      const data = randomBytes(length);
      await vm.write(at, data);
      data.copy(image, at);
    }
    await expectImage('vm', image);
    assert.equal(counted.bytes, page + 2 * page + 3 * page, 'each write costs the pages it touches');
    await vm.flush();
    await store.close();
    store = await openDataDir(dir.dir);
    await expectImage('vm', image);
  });

  it('a snapshot of a partial extent keeps its pages while the volume writes more of the extent, in place or not', async () => {
    const vm = await store.openVolume({ name: 'vm' });
    const image = Buffer.from(golden);
    const first = randomBytes(page);
    await vm.write(page, first);
    first.copy(image, page);
    const second = randomBytes(page);
    await vm.write(5 * page, second); // the same patch, written in place
    second.copy(image, 5 * page);
    await store.createSnapshot({ name: 'vm' }, 'vm-1');
    const atSnapshot = Buffer.from(image);
    const counted = countDataBytes(store.ctx.blobs);
    const third = randomBytes(page);
    await vm.write(9 * page, third); // the patch is shared now: a new one, with the older pages moved over
    third.copy(image, 9 * page);
    assert.equal(counted.bytes, 3 * page, 'the new patch holds the two older pages and the new one');
    await expectImage('vm', image);
    const snapshot = await store.openSnapshot({ name: 'vm-1' });
    assert.ok((await snapshot.read(0, MiB)).equals(atSnapshot), 'the snapshot reads what the volume held');
    assert.deepEqual(await store.diffSnapshots({ name: 'base' }, { name: 'vm-1' }), [{ offset: 0, length: extentSize }]);
  });

  it('once every page of an extent is written it is a plain extent, no longer reading through the shared one', async () => {
    const vm = await store.openVolume({ name: 'vm' });
    const image = Buffer.from(golden);
    for (let p = 15; p >= 0; p--) {
      const data = randomBytes(page);
      await vm.write(2 * extentSize + p * page, data);
      data.copy(image, 2 * extentSize + p * page);
    }
    await vm.flush();
    await expectImage('vm', image);
    const record = await store.getVolume({ name: 'vm' });
    const leaf = await store.ctx.nodes.load(blobOf(record.root));
    assert.ok(!isPartial(getEntry(leaf, 2)), 'extent 2 is plain');
    const base = await store.ctx.nodes.load(blobOf((await store.getSnapshot({ name: 'base' })).root));
    assert.notEqual(blobOf(getEntry(leaf, 2)), blobOf(getEntry(base, 2)), 'extent 2 has its own blob');
    assert.equal(getEntry(leaf, 0), asShared(getEntry(base, 0)), 'extent 0, never written, is still the shared one');
  });

  it("a volume's usage counts a partial extent as mapped whole and its own only for the pages its patch holds", async () => {
    assert.deepEqual(await store.volumeUsage({ name: 'vm' }), { allocatedBytes: MiB, exclusiveBytes: 0 }, 'a fresh clone owns nothing');
    const vm = await store.openVolume({ name: 'vm' });
    // Three pages of extent 1 (one of them twice, one of them in part), all 16 of extent 5.
    for (const at of [0, 7 * page, 7 * page + 100, 15 * page + 10]) await vm.write(extentSize + at, randomBytes(100));
    for (let p = 0; p < 16; p++) await vm.write(5 * extentSize + p * page, randomBytes(page));
    assert.deepEqual(
      await store.volumeUsage({ name: 'vm' }),
      { allocatedBytes: MiB, exclusiveBytes: 3 * page + extentSize },
      'extent 1 owns the 3 pages written, extent 5 (every page written) is a plain extent of its own',
    );
    assert.deepEqual(
      await store.volumeUsage({ name: 'gold' }),
      { allocatedBytes: MiB, exclusiveBytes: 0 },
      'the golden volume shares every extent with its snapshot',
    );
    await store.createSnapshot({ name: 'vm' }, 'later');
    assert.equal((await store.volumeUsage({ name: 'vm' })).exclusiveBytes, 0, 'once snapshotted, the patches are shared too');
  });

  it('the collector keeps a shared extent a partial one reads through, after everything else that used it is deleted', async () => {
    const vm = await store.openVolume({ name: 'vm' });
    const image = Buffer.from(golden);
    for (let e = 0; e < MiB / extentSize; e += 2) {
      const data = randomBytes(page);
      await vm.write(e * extentSize + 7 * page, data);
      data.copy(image, e * extentSize + 7 * page);
    }
    await vm.flush();
    await store.deleteVolume({ name: 'gold' });
    await store.deleteSnapshot({ name: 'base' });
    const report = await store.collectGarbage();
    assert.ok(report.freedBlobs > 0, 'the golden volume and snapshot left blobs only they used');
    await store.close();
    store = await openDataDir(dir.dir);
    await expectImage('vm', image);
    await store.deleteVolume({ name: 'vm' });
    await store.collectGarbage();
    assert.deepEqual(await orphanBlobs(store), []);
    assert.equal((await reachableBlobs(store)).size, 0);
  });

  it('deleting a clone with partial extents frees every blob it took, leaving the collector nothing, across a restart', async () => {
    const vm = await store.openVolume({ name: 'vm' });
    // Whole extents, then part of one under the same leaf: the leaf is copied, then widened.
    await vm.write(0, randomBytes(MiB - extentSize + 1234));
    await vm.flush();
    await store.close();
    store = await openDataDir(dir.dir);
    await store.deleteVolume({ name: 'vm' });
    assert.equal((await store.collectGarbage()).freedBlobs, 0, 'nothing the clone took was left for the collector');
  });

  it('where synced blobs are immutable (as in S3), a write into a synced patch makes a new one with its pages', async () => {
    await store.close();
    store = await openDataDir(dir.dir, silentLog, { rewritableBlobs: false });
    const vm = await store.openVolume({ name: 'vm' });
    const image = Buffer.from(golden);
    const first = randomBytes(page);
    await vm.write(0, first);
    first.copy(image, 0);
    await vm.flush();
    const second = randomBytes(100);
    await vm.write(page + 7, second);
    second.copy(image, page + 7);
    await expectImage('vm', image);
    await vm.flush();
    await store.close();
    store = await openDataDir(dir.dir);
    await expectImage('vm', image);
  });

  it('a wide leaf naming a base on a slot that is not partial is refused as damage, naming the node', async () => {
    const vm = await store.openVolume({ name: 'vm' });
    await vm.write(0, randomBytes(page));
    await vm.flush();
    const root = blobOf((await store.getVolume({ name: 'vm' })).root);
    const bytes = nodeBytesOf(root);
    assert.ok(bytes > 4096, 'the leaf is wide');
    await store.close();
    const reopened = await openDataDir(dir.dir);
    try {
      const node = Buffer.alloc(bytes);
      await reopened.ctx.blobs.read(root, 0, node, 0, bytes);
      // Slot 1 is a plain shared extent: give it a base, as no code of ours would.
      setEntry(node.subarray(4096), 1, makeEntry(blobOf(getEntry(node, 2)), 0));
      await reopened.ctx.blobs.write(root, 0, node, 0, bytes);
      const volume = await reopened.openVolume({ name: 'vm' });
      await assert.rejects(
        volume.read(extentSize, 16),
        (err) => isArborError(err, 'internal') && new RegExp(`map node ${root} is damaged: slot 1 is not partial but names base`).test(err.message),
      );
    } finally {
      store = reopened;
    }
  });
});
