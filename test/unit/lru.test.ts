import assert from 'node:assert/strict';
import { Lru } from '../../lib/lru';

describe('the least-recently-used map the caches share', () => {
  it('evicts the least recently used past its capacity, through evicted; a get makes an entry the newest', () => {
    const gone: string[] = [];
    const lru = new Lru<string, number>({ capacity: 3, evicted: (key) => gone.push(key) });
    for (const [k, v] of [
      ['a', 1],
      ['b', 2],
      ['c', 3],
    ] as const)
      lru.set(k, v);
    assert.equal(lru.get('a'), 1);
    lru.set('d', 4);
    assert.deepEqual(gone, ['b']);
    assert.deepEqual([...lru.values()], [3, 1, 4]);
    assert.equal(lru.peek('c'), 3);
    lru.set('e', 5);
    assert.deepEqual(gone, ['b', 'c'], 'peek does not make an entry recent');
  });

  it('a get moves only an entry in the older half; an entry used between insertions is never evicted', () => {
    const gone: number[] = [];
    const lru = new Lru<number, number>({ capacity: 100, evicted: (key) => gone.push(key) });
    for (let k = 0; k < 100; k++) lru.set(k, k);
    lru.get(99);
    assert.equal([...lru.values()].at(-1), 99);
    lru.get(60);
    assert.deepEqual([...lru.values()].slice(-2), [98, 99], 'an entry in the newer half stays where it is');
    lru.get(10);
    assert.equal([...lru.values()].at(-1), 10, 'an entry in the older half becomes the newest');
    for (let k = 100; k < 1100; k++) {
      lru.set(k, k);
      assert.equal(lru.get(10), 10);
    }
    assert.equal(gone.length, 1000);
    assert.ok(!gone.includes(10), 'the entry used all along is still there');
    assert.deepEqual(gone.slice(0, 3), [0, 1, 2], 'the rest leave oldest first');
  });

  it('weighs entries when told how, and trims to a bound the caller gives', () => {
    const gone: string[] = [];
    const lru = new Lru<string, { bytes: number }>({ capacity: 100, weigh: (v) => v.bytes, evicted: (key) => gone.push(key) });
    lru.set('x', { bytes: 60 });
    lru.set('y', { bytes: 30 });
    assert.equal(lru.totalWeight, 90);
    lru.set('z', { bytes: 20 });
    assert.deepEqual(gone, ['x']);
    assert.equal(lru.totalWeight, 50);
    const outside = 40;
    assert.equal(
      lru.trim(() => outside + lru.totalWeight > 70),
      1,
    );
    assert.deepEqual(gone, ['x', 'y']);
  });

  it('setting a key again replaces it (its weight too); delete and clear: delete calls nothing, clear calls evicted for each', () => {
    const gone: string[] = [];
    const lru = new Lru<string, number>({ capacity: 10, weigh: (v) => v, evicted: (key) => gone.push(key) });
    lru.set('a', 4);
    lru.set('a', 6);
    assert.equal(lru.totalWeight, 6);
    assert.equal(lru.size, 1);
    lru.set('b', 1);
    assert.equal(lru.delete('a'), 6);
    assert.equal(lru.delete('a'), undefined);
    assert.deepEqual(gone, []);
    lru.clear();
    assert.deepEqual(gone, ['b']);
    assert.equal(lru.size, 0);
    assert.equal(lru.totalWeight, 0);
  });
});
