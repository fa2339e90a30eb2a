import assert from 'node:assert/strict';
import { blobId, maxSerial, sizeClassCount } from '../../store/blob-id';
import { BlobIdSet } from '../../store/blob-id-set';

describe('BlobIdSet', () => {
  it('behaves as a Set of the same ids through random adds, deletes, clears and listings (every class, serials up to the largest)', () => {
    const seed = Number(process.env.ARBOR_ID_SET_SEED ?? 1 + Math.floor(Math.random() * 1e9));
    let state = seed;
    const next = (n: number) => {
      state = (state * 1103515245 + 12345) % 2 ** 31;
      return state % n;
    };
    // Ids that share pages, sit at page edges, and lie far apart.
    const serials = [1, 2, 31, 32, 33, 32767, 32768, 32769, 65535, 1_000_000, 2 ** 31 - 1, 2 ** 31, 2 ** 32 + 5, maxSerial - 1, maxSerial];
    const pool: number[] = [];
    for (let c = 0; c < sizeClassCount; c++) for (const s of serials) pool.push(blobId(c, s));
    const ids = new BlobIdSet();
    const model = new Set<number>();
    for (let step = 0; step < 20_000; step++) {
      const id = pool[next(pool.length)];
      const what = next(100);
      const at = `step ${step}, id ${id} (seed ${seed}: ARBOR_ID_SET_SEED)`;
      if (what < 50) {
        assert.equal(ids.add(id), ids);
        model.add(id);
      } else if (what < 80) {
        assert.equal(ids.delete(id), model.delete(id), `delete: ${at}`);
      } else if (what < 95) {
        assert.equal(ids.has(id), model.has(id), `has: ${at}`);
      } else if (what < 99) {
        // In the order each was last added while absent: a Set's order.
        assert.deepEqual([...ids], [...model], `listing: ${at}`);
      } else {
        ids.clear();
        model.clear();
      }
      assert.equal(ids.size, model.size, `size: ${at}`);
    }
    assert.deepEqual([...ids], [...model]);
  });

  it('lists an id deleted and added again once, where it was added again', () => {
    const ids = new BlobIdSet();
    const [a, b, c] = [blobId(4, 7), blobId(4, 8), blobId(0, 7)];
    ids.add(a).add(b).add(c);
    ids.delete(a);
    ids.add(a);
    ids.add(b);
    assert.deepEqual([...ids], [b, c, a]);
    assert.equal(ids.size, 3);
    assert.ok(!ids.has(blobId(4, 9)) && !ids.has(blobId(5, 7)), 'a neighbour and the same serial in another class are not in it');
  });
});
