import assert from 'node:assert/strict';
import { put } from '../../store/catalog/catalog';
import { openDataDir } from '../../store/embedded';
import { blobOf, zeroEntry } from '../../store/entry';
import { isArborError } from '../../store/errors';
import { nodeSizeBytes } from '../../store/limits';
import { getEntry, setEntry } from '../../store/map-node';
import { keys } from '../../store/records';
import { Store } from '../../store/store';
import { memoryTempDir } from '../support/tmp';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

/** The rejection is an internal error whose message matches every pattern. */
function refusedWith(...patterns: RegExp[]): (err: unknown) => boolean {
  return (err) => {
    assert.ok(isArborError(err, 'internal'), `an internal error, not ${String(err)}`);
    for (const pattern of patterns) assert.match(err.message, pattern);
    return true;
  };
}

/**
 * A damaged catalog or blob store gives an error naming the key or the blob and
 * what is wrong with it, at the first read: never a wrong answer.
 */
describe('damage in the catalog or the blob store is refused, naming what is damaged', function () {
  this.timeout(60_000);
  let dir: { dir: string; cleanup: () => void };
  let store: Store;

  beforeEach(async () => {
    dir = memoryTempDir();
    store = await openDataDir(dir.dir);
  });
  afterEach(async () => {
    await store.close();
    dir.cleanup();
  });

  /** Writes the volume's first MiB and commits it; returns its record. */
  async function written(name: string, sizeBytes: number) {
    await store.createVolume(name, { sizeBytes });
    const volume = await store.openVolume({ name });
    await volume.write(0, Buffer.alloc(MiB, 7));
    await volume.flush();
    return store.getVolume({ name });
  }

  /** Closes the store (its caches go with it) and opens it again. */
  async function reopen(): Promise<void> {
    await store.close();
    store = await openDataDir(dir.dir);
  }

  it('a volume record with a field of the wrong type names its key, the field and what it holds', async () => {
    const record = await written('v', 8 * MiB);
    await store.ctx.catalog.txn([], [put(keys.volume(record.id), { ...record, root: 'abc' })]);
    const expected = [new RegExp(`catalog key volumes/${record.id} does not hold a volume record`), /root is "abc", not a whole number/];
    await assert.rejects(store.getVolume({ name: 'v' }), refusedWith(...expected));
    await assert.rejects(store.listVolumes(), refusedWith(...expected));
    await assert.rejects(store.openVolume({ name: 'v' }), refusedWith(...expected));
  });

  it("a volume record missing a field, one that is not JSON, and one under another volume's key are each refused, saying which", async () => {
    const a = await written('a', 8 * MiB);
    const b = await written('b', 8 * MiB);
    const { depth: _depth, ...withoutDepth } = a;
    await store.ctx.catalog.txn([], [put(keys.volume(a.id), withoutDepth)]);
    await assert.rejects(store.getVolume({ id: a.id }), refusedWith(/does not hold a volume record: depth is missing, not a whole number/));
    await store.ctx.catalog.txn([], [{ type: 'put', key: keys.volume(a.id), value: '{"id": "vol-' }]);
    await assert.rejects(store.getVolume({ id: a.id }), refusedWith(new RegExp(`catalog key volumes/${a.id} does not hold a volume record: it is not JSON`)));
    await store.ctx.catalog.txn([], [put(keys.volume(a.id), b)]);
    await assert.rejects(
      store.getVolume({ id: a.id }),
      refusedWith(new RegExp(`volumes/${a.id} does not hold a volume record: it is the record of volumes/${b.id}`)),
    );
    // A root entry with a flag Arbor never sets.
    await store.ctx.catalog.txn([], [put(keys.volume(b.id), { ...b, root: b.root + 128 })]);
    await assert.rejects(store.getVolume({ id: b.id }), refusedWith(/root is \d+, not a map entry \(entry \d+ has unknown flags 0x8\d\)/));
  });

  it('a name key that holds no id is refused naming it', async () => {
    await written('named', 8 * MiB);
    await store.ctx.catalog.txn([], [put(keys.volumeName('named'), 42)]);
    await assert.rejects(store.getVolume({ name: 'named' }), refusedWith(/catalog key volume-names\/named does not hold an id: it is 42, not a string/));
  });

  it('a map node with an entry no Arbor writes: reading and collecting name the node and the slot, and the collector frees nothing', async () => {
    const record = await written('n', 8 * MiB);
    const rootNode = blobOf(record.root);
    // Give slot 0 of the root node a flag Arbor never sets.
    const node = Buffer.alloc(nodeSizeBytes);
    await store.ctx.blobs.read(rootNode, 0, node, 0, nodeSizeBytes);
    setEntry(node, 0, getEntry(node, 0) + 0x40);
    await store.ctx.blobs.write(rootNode, 0, node, 0, nodeSizeBytes);
    await store.ctx.blobs.sync([rootNode]);
    await reopen();
    const blobsBefore = (await store.ctx.blobs.list()).length;
    const damage = new RegExp(`map node ${rootNode} is damaged: slot 0: entry \\d+ has unknown flags 0x4\\d`);
    const volume = await store.openVolume({ name: 'n' });
    await assert.rejects(volume.read(0, 4096), refusedWith(damage));
    await assert.rejects(store.collectGarbage(), refusedWith(damage));
    assert.equal((await store.ctx.blobs.list()).length, blobsBefore, 'the collector freed nothing');
  });

  it('a ZERO entry above the leaves is refused by the walk that meets it, naming the node and the level', async () => {
    // 64 GiB in 64 KiB extents: three levels of map nodes.
    const record = await written('deep', 64 * GiB);
    assert.equal(record.depth, 3);
    const rootNode = blobOf(record.root);
    const node = Buffer.alloc(nodeSizeBytes);
    await store.ctx.blobs.read(rootNode, 0, node, 0, nodeSizeBytes);
    setEntry(node, 1, zeroEntry);
    await store.ctx.blobs.write(rootNode, 0, node, 0, nodeSizeBytes);
    await store.ctx.blobs.sync([rootNode]);
    await reopen();
    const volume = await store.openVolume({ name: 'deep' });
    // Slot 1 of the root maps the second 16 GiB (512 × 512 extents of 64 KiB).
    await assert.rejects(
      volume.read(16 * GiB, 4096),
      refusedWith(new RegExp(`map node ${rootNode} is damaged: slot 1 holds ZERO above the leaves \\(level 2\\)`)),
    );
    // What the damage does not touch still reads.
    assert.ok((await volume.read(0, 4096)).every((b) => b === 7));
  });
});
