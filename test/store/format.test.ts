import assert from 'node:assert/strict';
import { del, put } from '../../store/catalog/catalog';
import { openDataDir } from '../../store/embedded';
import { isArborError } from '../../store/errors';
import { decodeFormat, formatVersion, keys } from '../../store/records';
import { Store } from '../../store/store';
import { memoryTempDir } from '../support/tmp';

const MiB = 1024 * 1024;

/** Removes what format 3 added: every snapshot's key among its volume's by id. */
async function deleteIndexKeys(store: Store): Promise<void> {
  const index = (await store.ctx.catalog.list(keys.volumeSnapshotIndex)).map((e) => e.key);
  for (let i = 0; i < index.length; i += 100) await store.ctx.catalog.txn([], index.slice(i, i + 100).map(del));
}

describe('store format: an older store is migrated at open', () => {
  it('a store written in format 1 (store-wide snapshot names only) opens as the current format: every snapshot found among its volume, store-wide names kept', async () => {
    const dir = memoryTempDir();
    try {
      // Make a store, then turn it into what format 1 wrote: no per-volume snapshot name keys, format 1.
      let store = await openDataDir(dir.dir);
      const names: Array<[string, string]> = [];
      for (let v = 0; v < 3; v++) {
        const volume = `vm ${v}`;
        await store.createVolume(volume, { sizeBytes: MiB });
        const data = Buffer.alloc(4096, v + 1);
        const opened = await store.openVolume({ name: volume });
        await opened.write(0, data);
        await opened.flush();
        // 150 snapshots in all: the migration writes them in more than one batch.
        for (let s = 0; s < 50; s++) {
          await store.createSnapshot({ name: volume }, `${volume}-s${s}`);
          names.push([volume, `${volume}-s${s}`]);
        }
      }
      const snapshotNameKeys = (await store.ctx.catalog.list(keys.volumeSnapshotNames)).map((e) => e.key);
      assert.equal(snapshotNameKeys.length, 150);
      for (let i = 0; i < snapshotNameKeys.length; i += 100) await store.ctx.catalog.txn([], snapshotNameKeys.slice(i, i + 100).map(del));
      await deleteIndexKeys(store);
      // And a staging volume a failed format 1 receive left behind, hidden by its leading '.'.
      const staging = await store.createVolume('staging', { sizeBytes: MiB, labels: { 'arbor.receive/into': 'vm 0' } });
      await store.ctx.catalog.txn(
        [],
        [
          put(keys.volume(staging.id), { ...staging, name: '.receive-0123456789abcdef' }),
          del(keys.volumeName('staging')),
          put(keys.volumeName('.receive-0123456789abcdef'), staging.id),
        ],
      );
      await store.ctx.catalog.txn([], [put(keys.format, 1)]);
      await store.close();

      store = await openDataDir(dir.dir);
      try {
        assert.equal(decodeFormat((await store.ctx.catalog.get(keys.format))!), formatVersion);
        for (let v = 0; v < 3; v++) {
          const volume = await store.getVolume({ name: `vm ${v}` });
          assert.equal((await store.snapshotsPage({ volumeId: volume.id })).items.length, 50, `vm ${v}: its snapshots listed by id`);
        }
        assert.deepEqual(
          (await store.listVolumes()).map((v) => v.name),
          ['vm 0', 'vm 1', 'vm 2'],
          "the format 1 staging volume is hidden, not a user's volume named '.receive-...'",
        );
        assert.equal((await store.findVolume({ id: staging.id }))?.name, '\u0001receive-0123456789abcdef');
        for (const [volume, name] of names) {
          const snapshot = await store.findSnapshot({ volume: { name: volume }, name });
          assert.equal(snapshot?.volumeName, volume, `${volume}@${name} found among its volume's`);
          assert.equal((await store.findSnapshot({ name }))?.id, snapshot.id, `${name}: its store-wide name kept`);
        }
        const reader = await store.openSnapshot({ volume: { name: 'vm 2' }, name: 'vm 2-s49' });
        assert.deepEqual(await reader.read(0, 4096), Buffer.alloc(4096, 3));
        // Deleting a migrated snapshot frees both its names.
        await store.deleteSnapshot({ volume: { name: 'vm 0' }, name: 'vm 0-s0' });
        assert.equal(await store.findSnapshot({ name: 'vm 0-s0' }), undefined);
        await store.createSnapshot({ name: 'vm 1' }, 'vm 0-s0', 'volume');
      } finally {
        await store.close();
      }
    } finally {
      dir.cleanup();
    }
  });

  it('a store written in format 2 opens as the current format: every snapshot listed among its volume by id, in id order, a page at a time', async () => {
    const dir = memoryTempDir();
    try {
      let store = await openDataDir(dir.dir);
      const made = new Map<string, string[]>();
      for (let v = 0; v < 3; v++) {
        const volume = await store.createVolume(`vm ${v}`, { sizeBytes: MiB });
        // 120 snapshots in all, some by group: the migration writes them in more than one batch.
        made.set(volume.id, await Promise.all(Array.from({ length: 30 }, async (_, s) => (await store.createSnapshot({ id: volume.id }, `vm ${v}-s${s}`)).id)));
      }
      const ids = [...made.keys()];
      const group = await store.createGroupSnapshot(
        'together',
        ids.map((id) => ({ id })),
      );
      for (const id of group.snapshotIds) made.get((await store.getSnapshot({ id })).volumeId)!.push(id);
      for (let s = 0; s < 10; s++) made.get(ids[0])!.push((await store.createSnapshot({ id: ids[0] }, `daily-${s}`, 'volume')).id);
      // What format 2 wrote: no index keys among the volume's.
      await deleteIndexKeys(store);
      await store.ctx.catalog.txn([], [put(keys.format, 2)]);
      assert.deepEqual((await store.snapshotsPage({ volumeId: ids[0] })).items, [], 'format 2 had no index keys');
      await store.close();

      store = await openDataDir(dir.dir);
      try {
        assert.equal(decodeFormat((await store.ctx.catalog.get(keys.format))!), formatVersion);
        for (const [volumeId, snapshotIds] of made) {
          const listed: string[] = [];
          let after: string | undefined;
          for (;;) {
            const page = await store.snapshotsPage({ volumeId, after, limit: 7 });
            listed.push(...page.items.map((s) => s.id));
            if (!page.more) break;
            after = page.items[page.items.length - 1].id;
          }
          assert.deepEqual(listed, [...snapshotIds].sort(), `volume ${volumeId}: every snapshot once, in id order`);
        }
        // Deleting migrated snapshots (one by one, and by group) leaves no index key behind.
        await store.deleteGroupSnapshot({ id: group.id });
        for (const snapshot of await store.listSnapshots()) await store.deleteSnapshot({ id: snapshot.id });
        assert.deepEqual(await store.ctx.catalog.list(keys.volumeSnapshotIndex), []);
      } finally {
        await store.close();
      }
    } finally {
      dir.cleanup();
    }
  });

  it('a store of a format this arbor does not know is refused, naming both formats', async () => {
    const dir = memoryTempDir();
    try {
      const store = await openDataDir(dir.dir);
      await store.ctx.catalog.txn([], [put(keys.format, formatVersion + 1)]);
      await store.close();
      await assert.rejects(
        openDataDir(dir.dir),
        (err) =>
          isArborError(err, 'failed-precondition') &&
          new RegExp(`the store has format ${formatVersion + 1}; this arbor reads format ${formatVersion}`).test(err.message),
      );
    } finally {
      dir.cleanup();
    }
  });
});
