/**
 * Reading volumes, snapshots and group snapshots back from the catalog by name or by
 * id: the name keys hold ids, the id keys hold the records.
 */
import { Catalog, KvEntry } from './catalog/catalog';
import { ArborError } from './errors';
import { decodeId, keys } from './records';

export type Ref = { name: string } | { id: string };

export function notFound(what: 'volume' | 'snapshot' | 'group snapshot', ref: Ref): ArborError {
  return new ArborError('not-found', 'id' in ref ? `${what} with id ${ref.id} does not exist` : `${what} ${ref.name} does not exist`);
}

async function idOf(catalog: Catalog, ref: Ref, nameKey: (name: string) => string): Promise<string | undefined> {
  if ('id' in ref) return ref.id;
  const entry = await catalog.get(nameKey(ref.name));
  return entry && decodeId(entry);
}

export async function volumeEntry(catalog: Catalog, ref: Ref): Promise<KvEntry | undefined> {
  const id = await idOf(catalog, ref, keys.volumeName);
  return id === undefined ? undefined : catalog.get(keys.volume(id));
}

export async function snapshotEntry(catalog: Catalog, ref: Ref): Promise<KvEntry | undefined> {
  const id = await idOf(catalog, ref, keys.snapshotName);
  return id === undefined ? undefined : catalog.get(keys.snapshot(id));
}

export async function groupEntry(catalog: Catalog, ref: Ref): Promise<KvEntry | undefined> {
  const id = await idOf(catalog, ref, keys.groupName);
  return id === undefined ? undefined : catalog.get(keys.group(id));
}

export function byName(a: { name: string }, b: { name: string }): number {
  return a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
}
