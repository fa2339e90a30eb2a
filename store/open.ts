import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Log, silentLog } from '../lib/logger';
import type { S3BlobStore } from './blobs/s3';
import type { EtcdTls } from './catalog/etcd';
import { openDataDir } from './embedded';
import { ArborError } from './errors';
import { defaultBlobCacheBytes } from './limits';
import { Store } from './store';

/** Where a store lives: an embedded data directory, or etcd and an S3 bucket. */
export interface StoreLocation {
  dataDir: string;
  /** etcd://HOST:PORT[,...]/PREFIX: the distributed catalog. */
  storeUrl?: string;
  /** s3://BUCKET/PREFIX?endpoint=URL&region=R: the distributed blobs. */
  blobsUrl?: string;
  etcdTls?: EtcdTls;
  /** The node-local blob cache (distributed); default `<data-dir>/blob-cache`. */
  cacheDir?: string;
  cacheBytes?: number;
  leaseTtlMs?: number;
}

export function isDistributed(location: StoreLocation): boolean {
  return location.storeUrl !== undefined || location.blobsUrl !== undefined;
}

/**
 * Opens the store a command names. `nodeId` names this process in ownership
 * records; `ephemeralCache` gives a one-off command a private cache directory that
 * goes when the store closes (a node keeps its cache across restarts).
 */
export async function openStore(location: StoreLocation, options: { log?: Log; nodeId?: string; ephemeralCache?: boolean } = {}): Promise<Store> {
  const log = options.log ?? silentLog;
  if (!isDistributed(location)) return openDataDir(location.dataDir, log);
  if (!location.storeUrl || !location.blobsUrl) {
    throw new ArborError('invalid-argument', 'the distributed store needs both --store etcd://... (the catalog) and --blobs s3://... (the blobs)');
  }
  // Loaded only here: the etcd and S3 clients are a few hundred modules, seconds of start-up on a slow disk, that the embedded store never uses.
  const { EtcdCatalog, parseStoreUrl } = await import('./catalog/etcd');
  const { S3BlobStore } = await import('./blobs/s3');
  const etcd = parseStoreUrl(location.storeUrl);
  const cacheDir = options.ephemeralCache
    ? fs.mkdtempSync(path.join(os.tmpdir(), 'arbor-cache-'))
    : (location.cacheDir ?? path.join(location.dataDir, 'blob-cache'));
  fs.mkdirSync(cacheDir, { recursive: true, mode: 0o700 });
  const catalog = await EtcdCatalog.open(etcd, { tls: location.etcdTls, log });
  let blobs: S3BlobStore | undefined;
  try {
    blobs = await S3BlobStore.open({
      location: location.blobsUrl,
      cacheDir,
      cacheBytes: location.cacheBytes ?? defaultBlobCacheBytes,
      log,
      packIndex: catalog,
    });
    const store = await Store.open(catalog, blobs, log, { nodeId: options.nodeId, leaseTtlMs: location.leaseTtlMs });
    if (options.ephemeralCache) store.onClosed(() => fs.rmSync(cacheDir, { recursive: true, force: true }));
    return store;
  } catch (err) {
    await blobs?.close();
    await catalog.close();
    if (options.ephemeralCache) fs.rmSync(cacheDir, { recursive: true, force: true });
    throw err;
  }
}
