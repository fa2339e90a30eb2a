import { aborted, invalid } from '../csi/errors';
import type { Page, PageOptions } from '../store/store';

/**
 * Pagination of ListVolumes and ListSnapshots: items in id order, the token is the
 * last id returned. A token that names nothing that still exists is stale: the
 * listing changed under the caller, who must start again (ABORTED, as the spec asks).
 */
export function page<T extends { id: string }>(items: T[], maxEntries: number, startingToken: string, what: string): { entries: T[]; nextToken: string } {
  if (!Number.isInteger(maxEntries) || maxEntries < 0) throw invalid(`max_entries must not be negative, got ${maxEntries}`);
  const sorted = [...items].sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  let start = 0;
  if (startingToken) {
    const at = sorted.findIndex((item) => item.id === startingToken);
    if (at < 0) throw aborted(`starting_token ${JSON.stringify(startingToken)} does not name a ${what} that still exists; list again from the start`);
    start = at + 1;
  }
  const end = maxEntries === 0 ? sorted.length : Math.min(sorted.length, start + maxEntries);
  const entries = sorted.slice(start, end);
  return { entries, nextToken: end < sorted.length && entries.length > 0 ? entries[entries.length - 1].id : '' };
}

/**
 * The same pagination, read from the store a page at a time (store/listing.ts): the
 * token's item must still exist (`exists`), then the page is what follows it in id
 * order. Items created or deleted between pages are seen or not, but none that
 * existed throughout is skipped or repeated.
 */
export async function pageFromStore<T extends { id: string }>(
  maxEntries: number,
  startingToken: string,
  what: string,
  source: { exists: (id: string) => Promise<boolean>; page: (options: PageOptions) => Promise<Page<T>> },
): Promise<{ entries: T[]; nextToken: string }> {
  if (!Number.isInteger(maxEntries) || maxEntries < 0) throw invalid(`max_entries must not be negative, got ${maxEntries}`);
  if (startingToken && !(await source.exists(startingToken))) {
    throw aborted(`starting_token ${JSON.stringify(startingToken)} does not name a ${what} that still exists; list again from the start`);
  }
  const { items, more } = await source.page({ after: startingToken || undefined, limit: maxEntries || undefined });
  return { entries: items, nextToken: more ? items[items.length - 1].id : '' };
}
