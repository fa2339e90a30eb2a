import assert from 'node:assert/strict';
import path from 'node:path';
import { Catalog, put } from '../../store/catalog/catalog';
import { SqliteCatalog } from '../../store/catalog/sqlite';
import { StoreContext } from '../../store/context';
import { ArborError } from '../../store/errors';
import { PublicationRegistry, PublishOptions } from '../../store/publications';
import { keys, VolumeRecord } from '../../store/records';
import { memoryTempDir } from '../support/tmp';

const volumeId = 'vol-0000000000000001';
const volume = { id: volumeId, name: 'disk' } as VolumeRecord;
const oneNode: PublishOptions = { readOnly: false, multiNode: false };
const writers: PublishOptions = { readOnly: false, multiNode: true, multiNodeWriter: true };
const readers: PublishOptions = { readOnly: true, multiNode: true };

/**
 * The catalog with every caller's first read of `key` held until `parties` callers
 * have made it: they all decide on the same state before any of them writes, the
 * interleaving that a single process's event loop never produces on its own (the
 * embedded catalog answers at once) but etcd does.
 */
function readersMeet(inner: Catalog, key: string, parties: number): Catalog {
  let arrived = 0;
  let release!: () => void;
  const met = new Promise<void>((resolve) => (release = resolve));
  return {
    exclusive: inner.exclusive,
    async get(k) {
      const entry = await inner.get(k);
      if (k === key && arrived < parties) {
        if (++arrived === parties) release();
        await met;
      }
      return entry;
    },
    getMany: (keys) => inner.getMany(keys),
    list: (prefix, options) => inner.list(prefix, options),
    txn: (compares, ops, orRead) => inner.txn(compares, ops, orRead),
    watch: (prefix, listener) => inner.watch(prefix, listener),
    grantLease: (ttlMs) => inner.grantLease(ttlMs),
    closeBy: (deadline) => inner.closeBy(deadline),
    close: () => inner.close(),
  };
}

describe('publications: how nodes share a volume, decided by compare-and-swap', () => {
  let temp: { dir: string; cleanup: () => void };
  let catalog: SqliteCatalog;
  beforeEach(async () => {
    temp = memoryTempDir();
    catalog = SqliteCatalog.open(path.join(temp.dir, 'catalog.db'), () => 'this test');
    // Publishing reads the volume's key only to compare it: its content does not matter here.
    await catalog.txn([], [put(keys.volume(volumeId), { id: volumeId })]);
  });
  afterEach(async () => {
    await catalog.close();
    temp.cleanup();
  });
  // The registry touches only the catalog of the context.
  const registry = (over: Catalog = catalog) => new PublicationRegistry({ catalog: over } as unknown as StoreContext, async () => volume);
  const codeOf = (result: PromiseSettledResult<unknown>) =>
    result.status === 'rejected' && result.reason instanceof ArborError ? result.reason.code : result.status;

  it('nodes that all read before any writes: exactly one wins a volume for one node', async () => {
    const racing = registry(readersMeet(catalog, keys.publications(volumeId), 3));
    const results = await Promise.allSettled(['a', 'b', 'c'].map((n) => racing.publish(volumeId, n, oneNode)));
    assert.deepEqual(results.map(codeOf).sort(), ['failed-precondition', 'failed-precondition', 'fulfilled']);
    const winner = ['a', 'b', 'c'][results.findIndex((r) => r.status === 'fulfilled')];
    assert.deepEqual(Object.keys((await registry().publications(volumeId)).nodes), [winner]);
  });

  it('nodes that all read before any writes: every writer on many nodes is recorded, none lost', async () => {
    const racing = registry(readersMeet(catalog, keys.publications(volumeId), 3));
    await Promise.all(['a', 'b', 'c'].map((n) => racing.publish(volumeId, n, writers)));
    const nodes = (await registry().publications(volumeId)).nodes;
    assert.deepEqual(Object.keys(nodes).sort(), ['a', 'b', 'c']);
    assert.ok(Object.values(nodes).every((p) => p.multiNode && p.multiNodeWriter && !p.readOnly));
  });

  it('a reader and a writer racing for many nodes: the first to write wins, the other is refused', async () => {
    const racing = registry(readersMeet(catalog, keys.publications(volumeId), 2));
    const results = await Promise.allSettled([racing.publish(volumeId, 'a', readers), racing.publish(volumeId, 'b', writers)]);
    assert.deepEqual(results.map(codeOf).sort(), ['failed-precondition', 'fulfilled']);
    assert.equal(Object.keys((await registry().publications(volumeId)).nodes).length, 1);
  });

  it('a record written before multiNodeWriter existed reads as readers on many nodes', async () => {
    const old = { nodes: { a: { readOnly: true, multiNode: true, publishedAt: '2025-01-01T00:00:00.000Z' } } };
    await catalog.txn([], [put(keys.publications(volumeId), old)]);
    await assert.rejects(registry().publish(volumeId, 'b', writers), (err) => err instanceof ArborError && err.code === 'failed-precondition');
    await registry().publish(volumeId, 'b', readers);
    await registry().publish(volumeId, 'a', readers);
    assert.deepEqual(Object.keys((await registry().publications(volumeId)).nodes).sort(), ['a', 'b']);
  });

  it('refuses options the admin socket does not check, and a volume deleted meanwhile', async () => {
    const refusedWith = (code: string) => (err: unknown) => err instanceof ArborError && err.code === code;
    await assert.rejects(registry().publish(volumeId, 'a', { readOnly: false, multiNode: false, multiNodeWriter: true }), refusedWith('invalid-argument'));
    await assert.rejects(
      registry().publish(volumeId, 'a', { readOnly: false, multiNode: true, multiNodeWriter: 'yes' as unknown as boolean }),
      refusedWith('invalid-argument'),
    );
    await catalog.txn([], [{ type: 'delete', key: keys.volume(volumeId) }]);
    await assert.rejects(registry().publish(volumeId, 'a', writers), refusedWith('not-found'));
    assert.deepEqual((await registry().publications(volumeId)).nodes, {}, 'no publication of a volume that is gone');
  });
});
