import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { blobId } from '../../store/blob-id';
import { FileBlobStore, idsPerSegment } from '../../store/blobs/files';
import { isArborError } from '../../store/errors';
import { poolReadBytes, writeCallBytes } from '../../store/limits';
import { Random } from '../support/random';
import { tempDir } from '../support/tmp';

const KiB = 1024;
const extentClass = 4;
const extentBytes = 64 * KiB;

/**
 * The file backend's reads and writes that run across blobs lying end to end (a
 * clone's long sequential read is one read, large ones in the thread pool; a long
 * sequential write into new blobs one write, cut into 64 KiB calls): the bytes are
 * each blob's, zeros where a blob was never written; a blob missing on the way, a
 * sealed one, or the end of the segment file is refused before anything is read or
 * written.
 */
describe('file blobs: one read or write across adjacent blobs', () => {
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

  for (const count of [3, 16]) {
    it(`a write across ${count} blobs lands in each blob, which then reads alone`, async () => {
      const bytes = rng.bytes(count * extentBytes);
      const offset = 4 * KiB;
      await blobs.write(id(100), offset, bytes, 512, bytes.length - 512 - offset);
      for (let i = 0; i < count; i++) {
        const alone = Buffer.alloc(extentBytes);
        await blobs.read(id(100 + i), 0, alone, 0, extentBytes);
        const expected = Buffer.alloc(extentBytes);
        const from = i === 0 ? offset : 0;
        bytes.copy(expected, from, 512 + i * extentBytes + from - offset, Math.min(512 + (i + 1) * extentBytes - offset, bytes.length - offset));
        assert.ok(alone.equals(expected), `blob ${i} of the run holds its part, zeros before the write began`);
      }
      assert.ok((await blobs.list()).filter((each) => each >= id(100) && each < id(100 + count)).length === count, 'every blob of the run is present');
    });
  }

  for (const how of ['write', 'writeNow'] as const) {
    it(`a long ${how} is cut into calls of at most ${writeCallBytes / KiB} KiB at file offsets that are multiples of it (the page cache's folios stay small)`, async () => {
      const calls: { length: number; position: number }[] = [];
      const original = fs.writeSync;
      const spy = (...args: unknown[]) => {
        calls.push({ length: args[3] as number, position: args[4] as number });
        return (original as (...a: unknown[]) => unknown)(...args);
      };
      (fs as unknown as Record<string, unknown>).writeSync = spy;
      const length = 16 * extentBytes;
      const bytes = rng.bytes(length);
      try {
        if (how === 'write') await blobs.write(id(200), 4 * KiB, bytes, 0, length);
        else blobs.writeNow(id(200), 4 * KiB, bytes, 0, length);
      } finally {
        (fs as unknown as Record<string, unknown>).writeSync = original;
      }
      const base = calls.reduce((min, c) => Math.min(min, c.position), Infinity);
      assert.ok(
        calls.every((c) => c.length <= writeCallBytes && Math.floor(c.position / writeCallBytes) === Math.floor((c.position + c.length - 1) / writeCallBytes)),
        `no call crosses a ${writeCallBytes}-byte boundary: ${JSON.stringify(calls)}`,
      );
      assert.equal(
        calls.reduce((sum, c) => sum + c.length, 0),
        length,
        'the calls cover the write once',
      );
      assert.equal(calls.length, Math.ceil((4 * KiB + length) / writeCallBytes), 'as few calls as the boundaries allow');
      assert.equal(base % writeCallBytes, 4 * KiB);
      const back = Buffer.alloc(length);
      await blobs.read(id(200), 4 * KiB, back, 0, length);
      assert.ok(back.equals(bytes));
    });
  }

  it('refuses a write that runs past the last blob of its segment file, writing nothing', async () => {
    for (const length of [3 * extentBytes, poolReadBytes + extentBytes]) {
      const last = id(idsPerSegment - 2);
      await assert.rejects(
        blobs.write(last, 0, rng.bytes(length), 0, length),
        (err) => isArborError(err, 'internal') && /runs past the last blob/.test(String(err)),
      );
      assert.deepEqual(await blobs.list(), [], 'nothing was written');
    }
  });

  it('refuses a write that runs into a sealed blob, writing nothing (an object-store-like backend)', async () => {
    const sealing = FileBlobStore.open(path.join(dir.dir, 'sealing'), { serialsBelow: [], rewritable: false });
    try {
      const before = rng.bytes(extentBytes);
      await sealing.write(id(11), 0, before, 0, extentBytes);
      await sealing.sync([id(11)]);
      for (const length of [3 * extentBytes, poolReadBytes + extentBytes]) {
        await assert.rejects(sealing.write(id(10), 0, rng.bytes(length), 0, length), new RegExp(`blob ${id(11)} was synced and is immutable`));
      }
      assert.deepEqual(await sealing.list(), [id(11)], 'no blob around it was written');
      const after = Buffer.alloc(extentBytes);
      await sealing.read(id(11), 0, after, 0, extentBytes);
      assert.ok(after.equals(before), 'the sealed blob is as it was');
    } finally {
      await sealing.close();
    }
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
