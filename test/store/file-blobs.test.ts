import assert from 'node:assert/strict';
import path from 'node:path';
import { blobId } from '../../store/blob-id';
import { FileBlobStore, idsPerSegment } from '../../store/blobs/files';
import { isArborError } from '../../store/errors';
import { poolReadBytes } from '../../store/limits';
import { Random } from '../support/random';
import { tempDir } from '../support/tmp';

const KiB = 1024;
const extentClass = 4;
const extentBytes = 64 * KiB;

/**
 * The file backend's reads that run across blobs lying end to end (a clone's long
 * sequential read is one read, large ones in the thread pool): the bytes are each
 * blob's, zeros where a blob was never written, and a blob missing on the way is
 * refused before anything is read.
 */
describe('file blobs: one read across adjacent blobs', () => {
  let dir: { dir: string; cleanup: () => void };
  let blobs: FileBlobStore;
  const rng = new Random(7);
  const id = (serial: number) => blobId(extentClass, serial);

  beforeEach(() => {
    dir = tempDir();
    blobs = FileBlobStore.open(path.join(dir.dir, 'blobs'), { serialsBelow: [] });
  });
  afterEach(async () => {
    await blobs.close();
    dir.cleanup();
  });

  it('consecutive ids of one segment file are adjacent; across segments, classes or gaps they are not', () => {
    assert.equal(blobs.adjacent(id(5), id(6)), true);
    assert.equal(blobs.adjacent(id(6), id(5)), false);
    assert.equal(blobs.adjacent(id(5), id(7)), false);
    assert.equal(blobs.adjacent(id(idsPerSegment - 1), id(idsPerSegment)), false, 'the next segment is another file');
    assert.equal(blobs.adjacent(blobId(3, 5), blobId(3, 6)), true);
    assert.equal(blobs.adjacent(blobId(3, 5), id(6)), false);
  });

  for (const count of [3, poolReadBytes / extentBytes + 4]) {
    it(`a read across ${count} blobs (${(count * extentBytes) / KiB} KiB, ${count * extentBytes >= poolReadBytes ? 'in the thread pool' : 'on the thread'}) holds each blob's bytes, zeros where unwritten`, async () => {
      const expected = Buffer.alloc(count * extentBytes);
      for (let i = 0; i < count; i++) {
        // Whole, a part, or a single page: sparse blobs read zeros around what was written.
        const at = i % 3 === 0 ? 0 : rng.int(0, 15) * 4 * KiB;
        const length = i % 3 === 0 ? extentBytes : Math.min(extentBytes - at, i % 3 === 1 ? 4 * KiB : rng.int(1, extentBytes - at));
        const bytes = rng.bytes(length);
        await blobs.write(id(10 + i), at, bytes, 0, length);
        bytes.copy(expected, i * extentBytes + at);
      }
      const offset = 512;
      const length = count * extentBytes - offset - 100;
      const target = Buffer.alloc(length + 16, 0xee);
      await blobs.read(id(10), offset, target, 8, length);
      assert.ok(target.subarray(8, 8 + length).equals(expected.subarray(offset, offset + length)), 'the bytes of every blob, in order');
      assert.ok(target.subarray(0, 8).every((b) => b === 0xee) && target.subarray(8 + length).every((b) => b === 0xee), 'nothing outside the range');
    });
  }

  it('refuses a read that runs into a blob that is not there, naming it, and reads nothing', async () => {
    for (const serial of [20, 21, 23]) await blobs.write(id(serial), 0, rng.bytes(extentBytes), 0, extentBytes);
    for (const length of [4 * extentBytes - 1, poolReadBytes + 3 * extentBytes]) {
      const target = Buffer.alloc(length, 0xee);
      await assert.rejects(blobs.read(id(20), 1, target, 0, length), (err) => isArborError(err, 'internal') && /blob \d+ is missing/.test(String(err)));
      assert.ok(
        target.every((b) => b === 0xee),
        'nothing was read',
      );
    }
    const missing = Buffer.alloc(4 * extentBytes);
    await assert.rejects(blobs.read(id(20), 0, missing, 0, missing.length), new RegExp(`blob ${id(22)} is missing`));
  });

  it('a read in the thread pool completes with the right bytes when its file is let go meanwhile', async () => {
    const count = poolReadBytes / extentBytes + 2;
    const expected = rng.bytes(count * extentBytes);
    for (let i = 0; i < count; i++) await blobs.write(id(40 + i), 0, expected, i * extentBytes, extentBytes);
    const target = Buffer.alloc(expected.length);
    const reading = blobs.read(id(40), 0, target, 0, expected.length);
    // Closing the store closes every descriptor; the one the read uses waits for it.
    await blobs.close();
    await reading;
    assert.ok(target.equals(expected));
  });
});
