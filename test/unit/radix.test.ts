import assert from 'node:assert/strict';
import { EMPTY, WRITABLE, ZERO, asShared, blobOf, hasBlob, isWritable, isZero, makeEntry, maxBlobId, zeroEntry } from '../../store/entry';
import { capacityExtents, depthFor, slotAt, validateExtentSize, validateVolumeSize } from '../../store/geometry';
import { emptyNode, getEntry, isEmptyNode, setEntry, sharedCopy } from '../../store/map-node';
import { isArborError } from '../../store/errors';

describe('radix map entries and nodes', () => {
  it('an entry keeps a blob id up to 2^45 and its flags exactly', () => {
    for (const id of [1, 2, 255, 256, 2 ** 32 - 1, 2 ** 32, 2 ** 40 + 7, maxBlobId]) {
      for (const flags of [0, WRITABLE]) {
        const entry = makeEntry(id, flags);
        assert.equal(blobOf(entry), id);
        assert.equal(isWritable(entry), flags === WRITABLE);
        assert.ok(hasBlob(entry));
        assert.ok(!isZero(entry));
      }
    }
  });

  it('a never-written entry is 0 and an allocated-zero entry has no blob', () => {
    assert.equal(EMPTY, 0);
    assert.ok(!hasBlob(EMPTY));
    assert.ok(isZero(zeroEntry) && !hasBlob(zeroEntry) && zeroEntry === makeEntry(0, ZERO));
  });

  it('sharing an entry clears only its writable bit', () => {
    const entry = makeEntry(12345, WRITABLE);
    assert.equal(asShared(entry), makeEntry(12345, 0));
    assert.equal(asShared(asShared(entry)), makeEntry(12345, 0));
  });

  it('a node is 512 little-endian 64-bit entries in 4 KiB', () => {
    const node = emptyNode();
    assert.equal(node.length, 4096);
    assert.ok(isEmptyNode(node));
    const entry = makeEntry(2 ** 40 + 3, WRITABLE);
    setEntry(node, 511, entry);
    assert.equal(getEntry(node, 511), entry);
    assert.equal(node.readBigUInt64LE(511 * 8), BigInt(2 ** 40 + 3) * 256n + 1n);
    assert.ok(!isEmptyNode(node));
  });

  it('the copy of a shared node holds every child read-only', () => {
    const node = emptyNode();
    setEntry(node, 0, makeEntry(7, WRITABLE));
    setEntry(node, 9, makeEntry(8, 0));
    setEntry(node, 10, zeroEntry);
    const copy = sharedCopy(node);
    assert.equal(getEntry(copy, 0), makeEntry(7, 0));
    assert.equal(getEntry(copy, 9), makeEntry(8, 0));
    assert.equal(getEntry(copy, 10), zeroEntry);
    assert.equal(getEntry(node, 0), makeEntry(7, WRITABLE), 'the original is untouched');
  });
});

describe('radix geometry', () => {
  it('depth grows by one level per factor of 512 extents', () => {
    assert.equal(depthFor(1), 1);
    assert.equal(depthFor(512), 1);
    assert.equal(depthFor(513), 2);
    assert.equal(depthFor(512 * 512), 2);
    assert.equal(depthFor(512 * 512 + 1), 3);
    assert.equal(capacityExtents(3), 512 ** 3);
  });

  it('a slot is the extent index digit in base 512 at that level', () => {
    const extent = 3 * 512 * 512 + 17 * 512 + 400;
    assert.deepEqual([slotAt(extent, 0), slotAt(extent, 1), slotAt(extent, 2)], [400, 17, 3]);
  });

  it('extent sizes are powers of two from 4 KiB to 4 MiB', () => {
    for (const ok of [4096, 65536, 4 * 1024 * 1024]) validateExtentSize(ok, 'v');
    for (const bad of [0, 2048, 3 * 4096, 8 * 1024 * 1024, 65536.5]) {
      assert.throws(
        () => validateExtentSize(bad, 'v'),
        (err) => isArborError(err, 'invalid-argument') && /power of two/.test(err.message),
      );
    }
  });

  it('volume sizes are whole sectors up to 1 PiB', () => {
    validateVolumeSize(512, 'v');
    validateVolumeSize(2 ** 50, 'v');
    assert.throws(
      () => validateVolumeSize(0, 'v'),
      (err) => isArborError(err, 'invalid-argument'),
    );
    assert.throws(
      () => validateVolumeSize(1000, 'v'),
      (err) => isArborError(err, 'invalid-argument') && /multiple of 512/.test(err.message),
    );
    assert.throws(
      () => validateVolumeSize(2 ** 50 + 512, 'v'),
      (err) => isArborError(err, 'out-of-range'),
    );
  });
});
