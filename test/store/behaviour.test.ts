import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { BlobStore } from '../../store/blobs/blobs';
import { openDataDir } from '../../store/embedded';
import { isArborError } from '../../store/errors';
import { Store } from '../../store/store';
import { memoryTempDir } from '../support/tmp';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

/** Counts what the engine asks of the blob store, to check what an operation costs. */
function countBlobCalls(blobs: BlobStore): { reads: number; writes: number; reset(): void } {
  const counts = { reads: 0, writes: 0, reset: () => ((counts.reads = 0), (counts.writes = 0)) };
  const read = blobs.read.bind(blobs);
  const write = blobs.write.bind(blobs);
  blobs.read = (...args) => (counts.reads++, read(...args));
  blobs.write = (...args) => (counts.writes++, write(...args));
  return counts;
}

describe('store behaviour', function () {
  this.timeout(120_000);
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

  it("a clone does not see writes made to its parent after the snapshot, nor the parent the clone's", async () => {
    await store.createVolume('gold', { sizeBytes: 8 * MiB });
    const gold = await store.openVolume({ name: 'gold' });
    await gold.write(0, Buffer.alloc(MiB, 1));
    await store.createSnapshot({ name: 'gold' }, 'base');
    await store.cloneVolume('vm1', { snapshot: { name: 'base' } });
    await gold.write(4096, Buffer.alloc(4096, 2));
    const vm1 = await store.openVolume({ name: 'vm1' });
    await vm1.write(8192, Buffer.alloc(4096, 3));
    assert.deepEqual([...(await vm1.read(4096, 4))], [1, 1, 1, 1]);
    assert.deepEqual([...(await vm1.read(8192, 4))], [3, 3, 3, 3]);
    assert.deepEqual([...(await gold.read(4096, 4))], [2, 2, 2, 2]);
    assert.deepEqual([...(await gold.read(8192, 4))], [1, 1, 1, 1]);
    const snap = await store.openSnapshot({ name: 'base' });
    assert.deepEqual([...(await snap.read(4096, 4))], [1, 1, 1, 1]);
  });

  it('a clone of a live volume holds what the volume held at that moment', async () => {
    await store.createVolume('src', { sizeBytes: MiB });
    const src = await store.openVolume({ name: 'src' });
    await src.write(0, Buffer.alloc(4096, 9));
    await store.cloneVolume('copy', { volume: { name: 'src' } });
    await src.write(0, Buffer.alloc(4096, 8));
    assert.equal((await (await store.openVolume({ name: 'copy' })).read(0, 1))[0], 9);
    assert.equal((await store.getVolume({ name: 'copy' })).lineage[0].volumeName, 'src');
  });

  it('snapshot and clone write no blob, whatever the volume size or how much is written', async () => {
    const counts = countBlobCalls(store.ctx.blobs);
    for (const size of [GiB, 64 * GiB]) {
      const name = `v${size}`;
      await store.createVolume(name, { sizeBytes: size });
      const volume = await store.openVolume({ name });
      for (let at = 0; at < 32 * MiB; at += 4 * MiB) await volume.write(at * (size / GiB), Buffer.alloc(4 * MiB, 5));
      await volume.flush();
      counts.reset();
      await store.createSnapshot({ name }, `${name}-snap`);
      await store.cloneVolume(`${name}-clone`, { snapshot: { name: `${name}-snap` } });
      await store.cloneVolume(`${name}-live-clone`, { volume: { name } });
      assert.equal(counts.writes, 0, `snapshot and clones of ${name} wrote no blob`);
      assert.equal(counts.reads, 0, `snapshot and clones of ${name} read no blob`);
    }
  });

  it('a 1 MiB write of whole extents into a fresh clone is one blob write, as is writing it again; it reads back in one read', async () => {
    await store.createVolume('gold', { sizeBytes: 64 * MiB });
    await (await store.openVolume({ name: 'gold' })).write(0, Buffer.alloc(16 * MiB, 3));
    await store.createSnapshot({ name: 'gold' }, 'gold-snap');
    await store.cloneVolume('copy', { snapshot: { name: 'gold-snap' } });
    const copy = await store.openVolume({ name: 'copy' });
    await copy.read(0, 4096);
    const counts = countBlobCalls(store.ctx.blobs);
    const data = Buffer.alloc(MiB, 9);
    await copy.write(4 * MiB, data);
    assert.equal(counts.writes, 1, 'sixteen new extents, consecutive blobs, one write');
    data.fill(10);
    await copy.write(4 * MiB, data);
    assert.equal(counts.writes, 2, 'the same extents in place: one write');
    await copy.flush();
    counts.reset();
    assert.ok((await copy.read(4 * MiB, MiB)).equals(data));
    assert.equal(counts.reads, 1, 'one read');
    const around = await copy.read(4 * MiB - 4096, MiB + 8192);
    assert.ok(around.subarray(0, 4096).every((b) => b === 3) && around.subarray(4096 + MiB).every((b) => b === 3), 'the golden bytes on either side');
    assert.ok(
      (await (await store.openSnapshot({ name: 'gold-snap' })).read(4 * MiB, MiB)).every((b) => b === 3),
      'the snapshot unchanged',
    );
  });

  it('a read through the 100th clone generation costs what a read through the first does', async () => {
    await store.createVolume('gen0', { sizeBytes: 64 * MiB, extentSizeBytes: 4096 });
    await (await store.openVolume({ name: 'gen0' })).write(0, Buffer.alloc(64 * MiB, 7));
    for (let g = 1; g <= 100; g++) {
      await store.createSnapshot({ name: `gen${g - 1}` }, `s${g}`);
      await store.cloneVolume(`gen${g}`, { snapshot: { name: `s${g}` } });
      await (await store.openVolume({ name: `gen${g}` })).write(g * 4096, Buffer.alloc(4096, g));
    }
    await store.close();
    store = await openDataDir(dir.dir);
    const counts = countBlobCalls(store.ctx.blobs);
    const deep = await store.openVolume({ name: 'gen100' });
    assert.equal((await deep.read(50 * MiB, 1))[0], 7);
    const depth = (await store.getVolume({ name: 'gen100' })).depth;
    assert.equal(counts.reads, depth + 1, `one read per map level plus the data: ${counts.reads}`);
    assert.equal((await deep.read(100 * 4096, 1))[0], 100);
    assert.equal((await deep.read(37 * 4096, 1))[0], 37);
  });

  it('deleting a volume frees its own extents at once and leaves those its snapshot shares', async () => {
    await store.createVolume('a', { sizeBytes: 16 * MiB });
    const a = await store.openVolume({ name: 'a' });
    await a.write(0, Buffer.alloc(4 * MiB, 1));
    await store.createSnapshot({ name: 'a' }, 'keep');
    await a.write(8 * MiB, Buffer.alloc(4 * MiB, 2));
    await a.flush();
    const before = (await store.ctx.blobs.list()).length;
    await store.deleteVolume({ name: 'a' });
    const after = (await store.ctx.blobs.list()).length;
    assert.ok(before - after >= 64, `the 64 extents only a held are freed (${before} -> ${after})`);
    const snap = await store.openSnapshot({ name: 'keep' });
    assert.equal((await snap.read(MiB, 1))[0], 1);
    await store.deleteSnapshot({ name: 'keep' });
    await store.collectGarbage();
    assert.deepEqual(await store.ctx.blobs.list(), []);
  });

  it('a volume written and trimmed whole before any commit is back at its committed shape: the flush commits nothing, and what it took is freed later', async () => {
    await store.createVolume('w', { sizeBytes: 3 * 131072, extentSizeBytes: 131072 });
    const w = await store.openVolume({ name: 'w' });
    await w.write(2 * 131072 + 100, Buffer.alloc(600, 7));
    await w.trim(0, 3 * 131072);
    await w.flush();
    assert.deepEqual(await w.blockStatus(0, 3 * 131072), [{ offset: 0, length: 3 * 131072, kind: 'hole' }]);
    await store.collectGarbage();
    assert.deepEqual(await store.ctx.blobs.list(), [], 'the extent and the node it took are gone');
  });

  it('trimming whole extents frees them; trimming part of one zeroes those bytes', async () => {
    await store.createVolume('t', { sizeBytes: MiB, extentSizeBytes: 65536 });
    const t = await store.openVolume({ name: 't' });
    await t.write(0, Buffer.alloc(MiB, 4));
    await t.flush();
    const before = (await store.ctx.blobs.list()).length;
    await t.trim(65536, 3 * 65536 + 100);
    await t.flush();
    assert.equal((await store.ctx.blobs.list()).length, before - 3);
    assert.deepEqual(await t.blockStatus(0, MiB), [
      { offset: 0, length: 65536, kind: 'data' },
      { offset: 65536, length: 3 * 65536, kind: 'hole' },
      { offset: 4 * 65536, length: MiB - 4 * 65536, kind: 'data' },
    ]);
    assert.equal((await t.read(4 * 65536 + 99, 2)).toString('hex'), '0004');
  });

  it('write-zeroes without a hole reports allocated zeros, with a hole reports a hole', async () => {
    await store.createVolume('z', { sizeBytes: MiB, extentSizeBytes: 65536 });
    const z = await store.openVolume({ name: 'z' });
    await z.write(0, Buffer.alloc(MiB, 4));
    await z.writeZeroes(0, 65536, { noHole: true });
    await z.writeZeroes(65536, 65536);
    assert.deepEqual(
      (await z.blockStatus(0, 3 * 65536)).map((r) => r.kind),
      ['zero', 'hole', 'data'],
    );
    assert.ok((await z.read(0, 2 * 65536)).every((b) => b === 0));
  });

  it('growing a volume adds map levels, keeps its data and reads zeros beyond; shrinking is refused', async () => {
    await store.createVolume('g', { sizeBytes: 4 * MiB, extentSizeBytes: 4096 });
    const g = await store.openVolume({ name: 'g' });
    await g.write(4 * MiB - 4096, Buffer.alloc(4096, 6));
    await store.createSnapshot({ name: 'g' }, 'small');
    await store.resizeVolume({ name: 'g' }, 4 * GiB);
    assert.equal((await store.getVolume({ name: 'g' })).depth, 3);
    assert.equal((await g.read(4 * MiB - 1, 1))[0], 6);
    assert.ok((await g.read(4 * MiB, 65536)).every((b) => b === 0));
    await g.write(3 * GiB, Buffer.alloc(4096, 1));
    assert.equal((await (await store.openSnapshot({ name: 'small' })).read(4 * MiB - 1, 1))[0], 6);
    await assert.rejects(store.resizeVolume({ name: 'g' }, GiB), (err) => isArborError(err, 'out-of-range') && /shrinking is not supported/.test(err.message));
    assert.equal((await store.getVolume({ name: 'g' })).sizeBytes, 4 * GiB, 'a refused shrink changes nothing');
  });

  it('I/O past the end is refused and changes nothing', async () => {
    await store.createVolume('e', { sizeBytes: MiB });
    const e = await store.openVolume({ name: 'e' });
    await assert.rejects(e.write(MiB - 1, Buffer.alloc(2, 1)), (err) => isArborError(err, 'out-of-range') && /volume e/.test(err.message));
    await assert.rejects(e.read(MiB, 1), (err) => isArborError(err, 'out-of-range'));
    await assert.rejects(e.write(-1, Buffer.alloc(1)), (err) => isArborError(err, 'invalid-argument'));
    assert.deepEqual(await e.blockStatus(0, MiB), [{ offset: 0, length: MiB, kind: 'hole' }]);
  });

  it('names are unique and creation is idempotent by name', async () => {
    const first = await store.createVolume('n', { sizeBytes: MiB });
    assert.equal((await store.createVolume('n', { sizeBytes: MiB })).id, first.id);
    await assert.rejects(store.createVolume('n', { sizeBytes: 2 * MiB }), (err) => isArborError(err, 'already-exists'));
    await store.createVolume('m', { sizeBytes: MiB });
    await store.createSnapshot({ name: 'n' }, 'snap');
    await assert.rejects(store.createSnapshot({ name: 'm' }, 'snap'), (err) => isArborError(err, 'already-exists') && /volume n/.test(err.message));
    await assert.rejects(store.cloneVolume('m', { snapshot: { name: 'snap' } }), (err) => isArborError(err, 'already-exists'));
    await assert.rejects(store.createVolume('x'.repeat(129), { sizeBytes: MiB }), (err) => isArborError(err, 'invalid-argument'));
    await assert.rejects(store.createVolume('bad\u0001name', { sizeBytes: MiB }), (err) => isArborError(err, 'invalid-argument'));
    // Among one volume's snapshots a name is unique whatever the scope; 'volume' scope leaves the store-wide name free.
    await store.createSnapshot({ name: 'm' }, 'daily', 'volume');
    assert.equal((await store.createSnapshot({ name: 'm' }, 'daily', 'volume')).volumeName, 'm', 'idempotent');
    await store.createSnapshot({ name: 'n' }, 'daily', 'volume');
    assert.equal((await store.findSnapshot({ volume: { name: 'n' }, name: 'daily' }))?.volumeName, 'n');
    assert.equal(await store.findSnapshot({ name: 'daily' }), undefined);
    await assert.rejects(store.createSnapshot({ name: 'n' }, 'daily'), (err) => isArborError(err, 'already-exists') && /made outside CSI/.test(err.message));
    // A group snapshot's member name taken among the member volume's snapshots is refused, not retried for ever.
    await store.createSnapshot({ name: 'm' }, 'grp.0', 'volume');
    await assert.rejects(store.createGroupSnapshot('grp', [{ name: 'm' }]), (err) => isArborError(err, 'already-exists') && /grp\.0/.test(err.message));
  });

  it('a second process that opens the data directory gets a clear error and changes nothing', async () => {
    await store.createVolume('held', { sizeBytes: MiB });
    const script = `require(${JSON.stringify(path.join(__dirname, '../../store/embedded.js'))}).openDataDir(${JSON.stringify(dir.dir)}).then(() => process.exit(0), (e) => { console.log(e.code + ': ' + e.message); process.exit(1); })`;
    const child = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8' });
    assert.equal(child.status, 1);
    assert.match(child.stdout, new RegExp(`^busy: the data directory is in use by another process \\(pid ${process.pid}\\)`));
    assert.equal((await store.listVolumes()).length, 1);
  });
});
