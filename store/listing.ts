/**
 * Listing volumes and snapshots a page at a time, straight from the catalog's key
 * order: `volumes/<id>` and `snapshots/<id>` list in id order, and the snapshots of
 * one volume are the prefix `volume-snapshots/<volume-id>/` (keys.volumeSnapshot),
 * also in id order. A page reads what it returns and one entry more (to say whether
 * more follow), never the whole catalog, so its cost does not grow with the store.
 */
import { Catalog, KvEntry } from './catalog/catalog';
import { damaged } from './decode';
import { ArborError } from './errors';
import { SnapshotRecord, decodeId, decodeSnapshot, keys } from './records';

export interface PageOptions {
  /** Only items whose id sorts after this one (the last id of the previous page). */
  after?: string;
  /** At most this many items (a positive integer); all of them when absent. */
  limit?: number;
}

export interface Page<T> {
  /** In id order. */
  items: T[];
  /** True when items follow the last one. */
  more: boolean;
}

/** Refuses options no listing can mean, naming the field. */
export function checkPageOptions(options: PageOptions): void {
  if (options.after !== undefined && (typeof options.after !== 'string' || options.after === '')) {
    throw new ArborError('invalid-argument', `after must be a non-empty id, got ${JSON.stringify(options.after)}`);
  }
  if (options.limit !== undefined && (!Number.isSafeInteger(options.limit) || options.limit < 1)) {
    throw new ArborError('invalid-argument', `limit must be a positive integer, got ${JSON.stringify(options.limit)}`);
  }
}

/**
 * Records keyed `<prefix><id>`, in id order, after `options.after`, keeping those
 * `keep` accepts (reading on past those it drops until the page is full).
 */
export async function recordsPage<T>(
  catalog: Catalog,
  prefix: string,
  decode: (entry: KvEntry) => T,
  keep: (record: T) => boolean,
  options: PageOptions,
): Promise<Page<T>> {
  checkPageOptions(options);
  const items: T[] = [];
  let cursor = options.after === undefined ? undefined : `${prefix}${options.after}`;
  for (;;) {
    const want = options.limit === undefined ? undefined : options.limit + 1 - items.length;
    const batch = await catalog.list(prefix, { after: cursor, limit: want });
    for (const entry of batch) {
      const record = decode(entry);
      if (keep(record)) items.push(record);
    }
    if (want === undefined || batch.length < want || items.length > options.limit!) return cut(items, options.limit);
    cursor = batch[batch.length - 1].key;
  }
}

/**
 * The snapshots of one volume (by its id; the volume may be gone, its snapshots
 * stay), in id order: a range of its index keys, then each record. A snapshot
 * deleted between the two reads is left out, and the page reads on past it.
 */
export async function snapshotsOfVolumePage(catalog: Catalog, volumeId: string, options: PageOptions): Promise<Page<SnapshotRecord>> {
  checkPageOptions(options);
  const prefix = keys.volumeSnapshots(volumeId);
  const items: SnapshotRecord[] = [];
  let cursor = options.after === undefined ? undefined : `${prefix}${options.after}`;
  for (;;) {
    const want = options.limit === undefined ? undefined : options.limit + 1 - items.length;
    const batch = await catalog.list(prefix, { after: cursor, limit: want });
    const records = await Promise.all(batch.map((entry) => snapshotOfIndex(catalog, volumeId, prefix, entry)));
    for (const record of records) if (record) items.push(record);
    if (want === undefined || batch.length < want || items.length > options.limit!) return cut(items, options.limit);
    cursor = batch[batch.length - 1].key;
  }
}

async function snapshotOfIndex(catalog: Catalog, volumeId: string, prefix: string, entry: KvEntry): Promise<SnapshotRecord | undefined> {
  const id = decodeId(entry);
  if (entry.key !== `${prefix}${id}`) throw damaged(entry, 'a snapshot index key', `it names snapshot ${id}`);
  const record = await catalog.get(keys.snapshot(id));
  if (!record) return undefined;
  const snapshot = decodeSnapshot(record);
  if (snapshot.volumeId !== volumeId) throw damaged(entry, 'a snapshot index key', `snapshot ${id} is of volume ${snapshot.volumeId}`);
  return snapshot;
}

function cut<T>(items: T[], limit: number | undefined): Page<T> {
  return limit !== undefined && items.length > limit ? { items: items.slice(0, limit), more: true } : { items, more: false };
}
