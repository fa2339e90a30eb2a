/**
 * The store's on-disk format (keys.format) checked at open, and an older one
 * migrated. Format 1 had one name key per snapshot, store-wide; format 2 adds one
 * among its volume's (keys.volumeSnapshotName) for every snapshot. Format 1 names
 * were unique in the store, so no two snapshots of a volume share one and the new
 * keys never collide; each old snapshot keeps its store-wide key too. Format 3 adds
 * a key per snapshot among its volume's by id (keys.volumeSnapshot), so the
 * snapshots of one volume list a page at a time (store/listing.ts). Format 4 lets a
 * leaf hold partial extents (store/partial.ts): nothing to migrate, but an older
 * arbor must not read a tree it would misread, so it refuses the store. Format 5 lets
 * S3 blobs share a pack object, indexed in the catalog (store/blobs/pack-index.ts):
 * nothing to migrate, but an older arbor would find no object for a packed blob and
 * read it as zeros, so it too refuses the store.
 */
import { Log } from '../lib/logger';
import { Catalog, KvEntry, absent, del, put, unchanged } from './catalog/catalog';
import { hiddenNamePrefix } from './names';
import { ArborError } from './errors';
import { maxCatalogOpsPerTxn } from './limits';
import { SnapshotRecord, decodeFormat, decodeSnapshot, decodeVolume, formatVersion, keys } from './records';

export async function openFormat(catalog: Catalog, log: Log): Promise<void> {
  for (;;) {
    const format = await catalog.get(keys.format);
    if (!format) {
      if ((await catalog.txn([absent(keys.format)], [put(keys.format, formatVersion)])).succeeded) return;
      continue;
    }
    const version = decodeFormat(format);
    if (version === formatVersion) return;
    if (version < 1 || version > formatVersion) {
      throw new ArborError('failed-precondition', `the store has format ${format.value}; this arbor reads format ${formatVersion}`);
    }
    // Idempotent puts in batches: a migration that stops halfway is done again whole by the next open.
    const snapshots = await catalog.list(keys.snapshots);
    if (version < 2) {
      await putIndexKeys(catalog, snapshots, (s) => keys.volumeSnapshotName(s.volumeId, s.name));
      await hideLegacyStagingVolumes(catalog, log);
    }
    if (version < 3) await putIndexKeys(catalog, snapshots, (s) => keys.volumeSnapshot(s.volumeId, s.id));
    // Only one opener switches the format; another that raced it finds it switched on its next turn.
    if ((await catalog.txn([unchanged(format)], [put(keys.format, formatVersion)])).succeeded) {
      log.info('store migrated', { from: version, to: formatVersion, snapshots: snapshots.length });
      return;
    }
  }
}

/**
 * Puts, for each snapshot, a key naming its id, in batches; each batch holds only
 * while its snapshots are unchanged, so a snapshot deleted meanwhile (by a process
 * of this version, which deletes these keys with it) leaves no key behind.
 */
async function putIndexKeys(catalog: Catalog, snapshots: KvEntry[], key: (s: SnapshotRecord) => string): Promise<void> {
  const perTxn = Math.floor(maxCatalogOpsPerTxn / 2);
  for (let i = 0; i < snapshots.length; i += perTxn) {
    let batch = snapshots.slice(i, i + perTxn);
    while (batch.length > 0) {
      const records = batch.map(decodeSnapshot);
      if (
        (
          await catalog.txn(
            batch.map(unchanged),
            records.map((s) => put(key(s), s.id)),
          )
        ).succeeded
      )
        break;
      const current = await Promise.all(batch.map((entry) => catalog.get(entry.key)));
      batch = current.filter((entry): entry is KvEntry => entry !== undefined);
    }
  }
}

/**
 * Format 1 hid a receive's staging volume by a leading '.', which a name may now
 * start with: one left behind by a receive that failed would show as a user's
 * volume. No format 1 name could start with '.', so each such volume is a staging
 * volume: it is renamed to the hidden prefix of format 2 (store/receive.ts), where
 * the next receive into its volume removes it.
 */
async function hideLegacyStagingVolumes(catalog: Catalog, log: Log): Promise<void> {
  for (const entry of await catalog.list(keys.volumes)) {
    const record = decodeVolume(entry);
    if (!record.name.startsWith('.')) continue;
    const name = `${hiddenNamePrefix}${record.name.slice(1)}`;
    const renamed = await catalog.txn(
      [unchanged(entry), absent(keys.volumeName(name))],
      [put(keys.volume(record.id), { ...record, name }), del(keys.volumeName(record.name)), put(keys.volumeName(name), record.id)],
    );
    if (renamed.succeeded) log.info('staging volume of a format 1 receive hidden', { volume: record.id, was: record.name });
  }
}
