import fs from 'node:fs';
import path from 'node:path';
import { Log, silentLog } from '../lib/logger';
import { committedMarks } from './allocator';
import { FileBlobStore } from './blobs/files';
import { SqliteCatalog } from './catalog/sqlite';
import { SpaceReserve } from './space-reserve';
import { isDiskFull } from './errors';
import { Store } from './store';

/**
 * The embedded store: a SQLite catalog and blob files in one data directory,
 * opened by one process at a time.
 */
export async function openDataDir(
  dataDir: string,
  log: Log = silentLog,
  options: { rewritableBlobs?: boolean; unsyncedCatalog?: boolean; spaceReserveBytes?: number } = {},
): Promise<Store> {
  const dir = path.resolve(dataDir);
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const pidFile = path.join(dir, 'arbor.pid');
  const openCatalog = () => SqliteCatalog.open(path.join(dir, 'catalog.sqlite'), () => describeHolder(pidFile), { unsynced: options.unsyncedCatalog });
  let catalog: SqliteCatalog;
  try {
    catalog = openCatalog();
  } catch (err) {
    // The disk filled while no process held the store: the last one's reserve makes room to open in.
    if (!isDiskFull(err) || !SpaceReserve.giveBackIn(dir)) throw err;
    catalog = openCatalog();
  }
  // We hold the lock now. With less than the reserve free, the reserve goes back to the disk here, before anything else writes.
  const space = SpaceReserve.open(dir, log, options.spaceReserveBytes);
  // Whatever pid file is there is stale.
  fs.writeFileSync(pidFile, `${process.pid}\n`);
  // Blobs at or above the allocator's committed marks were never handed out.
  const blobs = FileBlobStore.open(path.join(dir, 'blobs'), { serialsBelow: await committedMarks(catalog), rewritable: options.rewritableBlobs });
  try {
    return await Store.open(catalog, blobs, log, { space });
  } catch (err) {
    await blobs.close();
    await catalog.close();
    throw err;
  }
}

function describeHolder(pidFile: string): string {
  try {
    const pid = fs.readFileSync(pidFile, 'utf8').trim();
    return `pid ${pid}`;
  } catch {
    return 'pid unknown';
  }
}
