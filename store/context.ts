import { Log } from '../lib/logger';
import { BlobIdAllocator } from './allocator';
import { BlobStore } from './blobs/blobs';
import { Catalog } from './catalog/catalog';
import { NodeCache } from './node-cache';
import { SpaceReserve } from './space-reserve';

/** What every part of the engine shares: the two backends and what is built on them. */
export interface StoreContext {
  catalog: Catalog;
  blobs: BlobStore;
  nodes: NodeCache;
  ids: BlobIdAllocator;
  /** For what fails in the background, where no caller hears of it. */
  log: Log;
  /** Where the store's disk is local: refuses writes while it is full, and keeps room for commits. */
  space?: SpaceReserve;
  /** Frees blobs nothing points at any more (held back while a collector pass runs). */
  free(ids: number[]): Promise<void>;
}
