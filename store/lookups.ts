/**
 * Reading volumes, snapshots and group snapshots back from the catalog by name or by
 * id: the name keys hold ids, the id keys hold the records.
 */
import { Catalog, KvEntry } from './catalog/catalog';
import { ArborError } from './errors';
import { decodeId, decodeSnapshot, keys } from './records';

export type Ref = { name: string } | { id: string };
/** A snapshot by id, by its store-wide name (made through CSI), or by its name among its volume's. */
export type SnapshotRef = Ref | { volume: Ref; name: string };

export function notFound(what: 'volume' | 'snapshot' | 'group snapshot', ref: SnapshotRef): ArborError {
  if ('id' in ref) return new ArborError('not-found', `${what} with id ${ref.id} does not exist`);
  if ('volume' in ref) {
    const volume = 'id' in ref.volume ? `volume ${ref.volume.id}` : `volume ${ref.volume.name}`;
    return new ArborError('not-found', `${what} ${ref.name} of ${volume} does not exist`);
  }
  return new ArborError('not-found', `${what} ${ref.name} does not exist`);
}

async function idOf(catalog: Catalog, ref: Ref, nameKey: (name: string) => string): Promise<string | undefined> {
  if ('id' in ref) return ref.id;
  const entry = await catalog.get(nameKey(ref.name));
  return entry && decodeId(entry);
}

/** The id a volume reference names: one catalog read for a name, none for an id. */
export function volumeIdOf(catalog: Catalog, ref: Ref): Promise<string | undefined> {
  return idOf(catalog, ref, keys.volumeName);
}

export async function volumeEntry(catalog: Catalog, ref: Ref): Promise<KvEntry | undefined> {
  const id = await idOf(catalog, ref, keys.volumeName);
  return id === undefined ? undefined : catalog.get(keys.volume(id));
}

export async function snapshotEntry(catalog: Catalog, ref: SnapshotRef): Promise<KvEntry | undefined> {
  if ('volume' in ref) {
    const volumeId = await idOf(catalog, ref.volume, keys.volumeName);
    if (volumeId === undefined) return 'name' in ref.volume ? orphanSnapshotEntry(catalog, ref.volume.name, ref.name) : undefined;
    const entry = await catalog.get(keys.volumeSnapshotName(volumeId, ref.name));
    return entry && catalog.get(keys.snapshot(decodeId(entry)));
  }
  const id = await idOf(catalog, ref, keys.snapshotName);
  return id === undefined ? undefined : catalog.get(keys.snapshot(id));
}

/**
 * A snapshot outlives its volume: once the volume is deleted (and no volume of that
 * name exists), VOLUME@SNAP still finds it by the names its record keeps, the newest
 * first should two deleted volumes of one name have left snapshots of one name.
 */
async function orphanSnapshotEntry(catalog: Catalog, volumeName: string, name: string): Promise<KvEntry | undefined> {
  const matches = (await catalog.list(keys.snapshots))
    .map((entry) => ({ entry, record: decodeSnapshot(entry) }))
    .filter(({ record }) => record.volumeName === volumeName && record.name === name)
    .sort((a, b) => (a.record.createdAt < b.record.createdAt ? 1 : -1));
  return matches[0]?.entry;
}

export async function groupEntry(catalog: Catalog, ref: Ref): Promise<KvEntry | undefined> {
  const id = await idOf(catalog, ref, keys.groupName);
  return id === undefined ? undefined : catalog.get(keys.group(id));
}

export function byName(a: { name: string }, b: { name: string }): number {
  return a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
}
