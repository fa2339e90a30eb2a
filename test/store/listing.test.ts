import assert from 'node:assert/strict';
import { put } from '../../store/catalog/catalog';
import { openDataDir } from '../../store/embedded';
import { isArborError } from '../../store/errors';
import { keys } from '../../store/records';
import { Page, PageOptions, Store } from '../../store/store';
import { Random, seedFromEnv } from '../support/random';
import { memoryTempDir } from '../support/tmp';

const MiB = 1024 * 1024;
const seed = seedFromEnv('ARBOR_MODEL_SEED');

/** Every page, following `after`; `between` runs after each page (concurrent changes). */
async function pageThrough<T extends { id: string }>(
  list: (options: PageOptions) => Promise<Page<T>>,
  limit: number,
  between: () => Promise<void> = async () => {},
): Promise<string[]> {
  const ids: string[] = [];
  let after: string | undefined;
  for (;;) {
    const page = await list({ after, limit });
    assert.ok(page.items.length <= limit, `a page holds at most ${limit}`);
    ids.push(...page.items.map((item) => item.id));
    if (!page.more) return ids;
    assert.ok(page.items.length > 0, 'a page that says more follow is not empty');
    after = page.items[page.items.length - 1].id;
    await between();
  }
}

describe('store listing: pages in id order, straight from the catalog', function () {
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

  it(`paging while volumes and snapshots come and go skips and repeats nothing that existed throughout (seed ${seed})`, async () => {
    const rng = new Random(seed);
    const volumes: string[] = [];
    for (let i = 0; i < 40; i++) volumes.push((await store.createVolume(`v${i}`, { sizeBytes: MiB })).id);
    const snapshots = new Map<string, string>();
    const ever = new Set(volumes);
    const snap = async (volumeId: string, name: string) => {
      const id = (await store.createSnapshot({ id: volumeId }, name)).id;
      snapshots.set(id, volumeId);
      ever.add(id);
    };
    for (let i = 0; i < 120; i++) await snap(rng.pick(volumes.slice(0, 4)), `s${i}`);
    let made = 0;
    const churn = async () => {
      for (let i = 0; i < 3; i++) {
        if (rng.chance(0.5) || volumes.length < 8) {
          volumes.push((await store.createVolume(`new${made}`, { sizeBytes: MiB })).id);
          ever.add(volumes[volumes.length - 1]);
          await snap(rng.pick(volumes.slice(0, 4)), `new${made++}`);
        } else {
          const victim = rng.pick([...snapshots.keys()]);
          await store.deleteSnapshot({ id: victim });
          snapshots.delete(victim);
          const volume = volumes.splice(rng.int(5, volumes.length - 1), 1)[0];
          await store.deleteVolume({ id: volume });
        }
      }
    };
    for (const limit of [1, 7, 50]) {
      const beforeVolumes = new Set(volumes);
      const listedVolumes = await pageThrough((o) => store.volumesPage(o), limit, churn);
      checkListing(listedVolumes, beforeVolumes, new Set(volumes), ever, `volumes in pages of ${limit}`);

      const beforeSnapshots = new Set(snapshots.keys());
      const listedSnapshots = await pageThrough((o) => store.snapshotsPage(o), limit, churn);
      checkListing(listedSnapshots, beforeSnapshots, new Set(snapshots.keys()), ever, `snapshots in pages of ${limit}`);

      const volumeId = volumes[rng.int(0, 3)];
      const ofVolume = () => new Set([...snapshots].filter(([, v]) => v === volumeId).map(([id]) => id));
      const beforeOfVolume = ofVolume();
      const listedOfVolume = await pageThrough((o) => store.snapshotsPage({ ...o, volumeId }), limit, churn);
      checkListing(listedOfVolume, beforeOfVolume, ofVolume(), ever, `snapshots of ${volumeId} in pages of ${limit}`);
      for (const id of listedOfVolume) assert.equal(snapshots.get(id) ?? volumeId, volumeId, `${id} is a snapshot of ${volumeId}`);
    }
    // Without a limit: everything, in one page.
    assert.deepEqual(
      (await store.volumesPage()).items.map((v) => v.id),
      [...volumes].sort(),
    );
    assert.equal((await store.snapshotsPage()).more, false);
  });

  it("a volume's snapshots are listed after the volume is deleted, and no other volume's", async () => {
    const a = await store.createVolume('a', { sizeBytes: MiB });
    const b = await store.createVolume('b', { sizeBytes: MiB });
    const mine = [(await store.createSnapshot({ id: a.id }, 'a1')).id, (await store.createSnapshot({ id: a.id }, 'daily', 'volume')).id];
    await store.createSnapshot({ id: b.id }, 'daily', 'volume');
    const group = await store.createGroupSnapshot('g', [{ id: a.id }, { id: b.id }]);
    for (const id of group.snapshotIds) if ((await store.getSnapshot({ id })).volumeId === a.id) mine.push(id);
    await store.deleteVolume({ id: a.id });
    assert.deepEqual(
      (await store.snapshotsPage({ volumeId: a.id })).items.map((s) => s.id),
      [...mine].sort(),
    );
    assert.deepEqual((await store.snapshotsPage({ volumeId: 'vol-0000000000000000' })).items, [], 'an unknown volume has none');
    await store.deleteGroupSnapshot({ id: group.id });
    for (const id of mine.slice(0, 2)) await store.deleteSnapshot({ id });
    assert.deepEqual(await store.ctx.catalog.list(keys.volumeSnapshots(a.id)), [], 'deleted snapshots leave no index key');
  });

  it('concurrent snapshots of one volume are made together: each its own record and its own answer', async () => {
    const volume = await store.createVolume('busy', { sizeBytes: MiB });
    const other = await store.createVolume('other', { sizeBytes: MiB });
    await store.createSnapshot({ id: other.id }, 'taken');
    const opened = await store.openVolume({ id: volume.id });
    await opened.write(0, Buffer.alloc(4096, 7));
    const names = Array.from({ length: 60 }, (_, i) => `c${i}`);
    const results = await Promise.allSettled([
      ...names.map((name) => store.createSnapshot({ id: volume.id }, name)),
      store.createSnapshot({ id: volume.id }, 'c3'), // a retry, in the same rush
      store.createSnapshot({ id: volume.id }, 'taken'), // taken by another volume's CSI snapshot
      store.createSnapshot({ id: volume.id }, 'bad\u0000name'),
    ]);
    const records = results.slice(0, 60).map((r) => (r.status === 'fulfilled' ? r.value : assert.fail(String(r.reason))));
    assert.deepEqual(
      records.map((r) => r.name),
      names,
    );
    assert.equal(new Set(records.map((r) => r.id)).size, 60, 'each its own snapshot');
    assert.equal(results[60].status === 'fulfilled' && results[60].value.id, records[3].id, 'a retry gets the first one');
    assert.ok(results[61].status === 'rejected' && isArborError(results[61].reason, 'already-exists'));
    assert.ok(results[62].status === 'rejected' && isArborError(results[62].reason, 'invalid-argument'));
    for (const record of records) {
      const reader = await store.openSnapshot({ id: record.id });
      assert.deepEqual(await reader.read(0, 4096), Buffer.alloc(4096, 7), `${record.name} holds the write made before it`);
    }
    assert.equal((await store.snapshotsPage({ volumeId: volume.id })).items.length, 60);
  });

  it('bad paging options are refused naming the field', async () => {
    for (const [options, field] of [
      [{ limit: 0 }, 'limit'],
      [{ limit: 1.5 }, 'limit'],
      [{ after: '' }, 'after'],
      [{ volumeId: '' }, 'volumeId'],
    ] as const) {
      await assert.rejects(store.snapshotsPage(options), (err) => isArborError(err, 'invalid-argument') && err.message.startsWith(field));
    }
    await assert.rejects(store.volumesPage({ limit: -1 }), (err) => isArborError(err, 'invalid-argument') && /^limit/.test(err.message));
  });

  it('an index key that names another volume is reported as damage, naming the key', async () => {
    const a = await store.createVolume('a', { sizeBytes: MiB });
    const b = await store.createVolume('b', { sizeBytes: MiB });
    const s = await store.createSnapshot({ id: b.id }, 's');
    await store.ctx.catalog.txn([], [put(keys.volumeSnapshot(a.id, s.id), s.id)]);
    await assert.rejects(
      store.snapshotsPage({ volumeId: a.id }),
      (err) => isArborError(err, 'internal') && err.message.includes(keys.volumeSnapshot(a.id, s.id)) && err.message.includes('damaged'),
    );
  });
});

/** Everything there before and after was listed; nothing listed twice, nothing that never existed; in id order. */
function checkListing(listed: string[], before: Set<string>, after: Set<string>, ever: Set<string>, what: string): void {
  assert.equal(new Set(listed).size, listed.length, `${what}: nothing listed twice`);
  assert.deepEqual(listed, [...listed].sort(), `${what}: in id order`);
  const seen = new Set(listed);
  for (const id of before) if (after.has(id)) assert.ok(seen.has(id), `${what}: ${id} existed throughout and was listed`);
  for (const id of listed) assert.ok(ever.has(id), `${what}: ${id} listed but never existed`);
}
