import assert from 'node:assert/strict';
import { openDataDir } from '../../store/embedded';
import { ByteRange } from '../../store/diff';
import { Store } from '../../store/store';
import { Random, seedFromEnv } from '../support/random';
import { memoryTempDir } from '../support/tmp';

const KiB = 1024;
const seed = seedFromEnv('ARBOR_DIFF_SEED');

/** The byte comparison of two images, as extent-aligned ranges within the larger size: what the diff must say. */
function byteDiff(a: Buffer, b: Buffer, extentSize: number): ByteRange[] {
  const size = Math.max(a.length, b.length);
  const ranges: ByteRange[] = [];
  for (let offset = 0; offset < size; offset += extentSize) {
    const length = Math.min(extentSize, size - offset);
    const left = offset < a.length ? a.subarray(offset, Math.min(offset + length, a.length)) : Buffer.alloc(0);
    const right = offset < b.length ? b.subarray(offset, Math.min(offset + length, b.length)) : Buffer.alloc(0);
    const pad = (x: Buffer) => (x.length === length ? x : Buffer.concat([x, Buffer.alloc(length - x.length)]));
    if (pad(left).equals(pad(right))) continue;
    const last = ranges[ranges.length - 1];
    if (last && last.offset + last.length === offset) last.length += length;
    else ranges.push({ offset, length });
  }
  return ranges;
}

/**
 * Model-based: random writes (new bytes, the same bytes again, zeros), trims,
 * write-zeroes, growth, snapshots and clones of snapshots, on a real embedded store;
 * the diff of every pair of snapshots must equal the byte comparison of their images,
 * and each snapshot's allocated ranges must be the extents the model says were
 * written and not trimmed whole since.
 */
describe(`snapshot diffs against the byte comparison of their images (seed ${seed})`, function () {
  this.timeout(300_000);
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

  for (const extentSize of [4 * KiB, 64 * KiB]) {
    it(`extents of ${extentSize / KiB} KiB: every pair of snapshots of one lineage`, async () => {
      const random = new Random(seed + extentSize);
      const volumes: Array<{ name: string; image: Buffer; allocated: Set<number> }> = [];
      const snapshots: Array<{ name: string; image: Buffer; allocated: Set<number> }> = [];
      const size = extentSize * random.int(8, 40);
      await store.createVolume('v0', { sizeBytes: size, extentSizeBytes: extentSize });
      volumes.push({ name: 'v0', image: Buffer.alloc(size), allocated: new Set() });
      for (let step = 0; step < 120; step++) {
        const v = volumes[random.int(0, volumes.length - 1)];
        const handle = await store.openVolume({ name: v.name });
        const offset = random.int(0, v.image.length - 1);
        const length = Math.min(random.int(1, 3 * extentSize), v.image.length - offset);
        const extents = (from: number, to: number) => Array.from({ length: to - from }, (_, i) => from + i);
        const wholeExtents = (at: number, n: number, volumeSize: number) => {
          const end = at + n === volumeSize ? Math.ceil(volumeSize / extentSize) * extentSize : at + n;
          return extents(Math.ceil(at / extentSize), Math.floor(end / extentSize));
        };
        const op = random.int(0, 99);
        if (op < 40) {
          const data = random.bytes(length);
          await handle.write(offset, data);
          data.copy(v.image, offset);
          for (const e of extents(Math.floor(offset / extentSize), Math.ceil((offset + length) / extentSize))) v.allocated.add(e);
        } else if (op < 50) {
          // The same bytes again: a new blob for a shared extent, the same contents.
          await handle.write(offset, Buffer.from(v.image.subarray(offset, offset + length)));
          for (const e of extents(Math.floor(offset / extentSize), Math.ceil((offset + length) / extentSize))) v.allocated.add(e);
        } else if (op < 60) {
          await handle.trim(offset, length);
          v.image.fill(0, offset, offset + length);
          // Whole extents become holes (a range to the volume's end covers its last extent whole); a part of one is zeroed and stays.
          for (const e of wholeExtents(offset, length, v.image.length)) v.allocated.delete(e);
        } else if (op < 68) {
          await handle.writeZeroes(offset, length, { noHole: true, fua: false, fast: false });
          v.image.fill(0, offset, offset + length);
          // Whole extents become allocated zeros; a part of one is zeroed where it holds data, and a hole stays one.
          for (const e of wholeExtents(offset, length, v.image.length)) v.allocated.add(e);
        } else if (op < 72 && v.image.length < 64 * extentSize) {
          const grown = v.image.length + extentSize * random.int(1, 600);
          await store.resizeVolume({ name: v.name }, grown);
          v.image = Buffer.concat([v.image, Buffer.alloc(grown - v.image.length)]);
        } else if (op < 90) {
          const name = `s${snapshots.length}`;
          await store.createSnapshot({ name: v.name }, name);
          snapshots.push({ name, image: Buffer.from(v.image), allocated: new Set(v.allocated) });
        } else if (snapshots.length > 0 && volumes.length < 5) {
          const from = snapshots[random.int(0, snapshots.length - 1)];
          const name = `v${volumes.length}`;
          await store.cloneVolume(name, { snapshot: { name: from.name } });
          volumes.push({ name, image: Buffer.from(from.image), allocated: new Set(from.allocated) });
        }
      }
      assert.ok(snapshots.length >= 5, `the run took ${snapshots.length} snapshots`);
      for (const a of snapshots) {
        const allocated = await store.snapshotAllocated({ name: a.name });
        const expected: ByteRange[] = [];
        for (const e of [...a.allocated].sort((x, y) => x - y)) {
          const offset = e * extentSize;
          const length = Math.min(extentSize, a.image.length - offset);
          const last = expected[expected.length - 1];
          if (last && last.offset + last.length === offset) last.length += length;
          else expected.push({ offset, length });
        }
        assert.deepEqual(allocated, expected, `allocated ranges of ${a.name}`);
        for (const b of snapshots) {
          assert.deepEqual(await store.diffSnapshots({ name: a.name }, { name: b.name }), byteDiff(a.image, b.image, extentSize), `${a.name} -> ${b.name}`);
        }
      }
    });
  }

  it('costs what changed, not the volume size: one extent changed in a 1 TiB volume reads a few nodes', async () => {
    const TiB = 1024 ** 4;
    await store.createVolume('huge', { sizeBytes: TiB, extentSizeBytes: 64 * KiB });
    const huge = await store.openVolume({ name: 'huge' });
    for (const at of [0, TiB / 2, TiB - 64 * KiB]) await huge.write(at, Buffer.alloc(64 * KiB, 1));
    await store.createSnapshot({ name: 'huge' }, 'before');
    await huge.write(TiB / 4, Buffer.alloc(4096, 2));
    await store.createSnapshot({ name: 'huge' }, 'after');
    // A store opened afresh: no node is cached, every one the diff looks at is read.
    await store.close();
    store = await openDataDir(dir.dir);
    let reads = 0;
    const read = store.ctx.blobs.read.bind(store.ctx.blobs);
    store.ctx.blobs.read = (...args) => (reads++, read(...args));
    try {
      assert.deepEqual(await store.diffSnapshots({ name: 'before' }, { name: 'after' }), [{ offset: TiB / 4, length: 64 * KiB }]);
    } finally {
      store.ctx.blobs.read = read;
    }
    // Depth 4 for 2^24 extents: the two differing paths (at most 8 nodes, fewer when cached) and the one extent (a hole before).
    assert.ok(reads <= 9, `the diff read ${reads} blobs`);
  });

  it('refuses snapshots of different extent sizes, naming both', async () => {
    await store.createVolume('small', { sizeBytes: 64 * KiB, extentSizeBytes: 4 * KiB });
    await store.createVolume('large', { sizeBytes: 256 * KiB, extentSizeBytes: 64 * KiB });
    await store.createSnapshot({ name: 'small' }, 'a');
    await store.createSnapshot({ name: 'large' }, 'b');
    await assert.rejects(store.diffSnapshots({ name: 'a' }, { name: 'b' }), /small@a and large@b have extent sizes 4096 and 65536/);
  });
});
