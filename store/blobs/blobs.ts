import { Op } from '../catalog/catalog';

/**
 * The blob store: map nodes and data extents, named by numeric ids that the engine
 * allocates and never reuses. A blob has no fixed size: bytes never written read as
 * zeros, which keeps extents sparse. The engine only ever writes a blob that no
 * snapshot can see, so a backend may treat a blob as immutable once it is shared.
 */
export interface BlobStore {
  /**
   * Whether a blob may be written again after it was synced. Files may; an object
   * store may not (a synced blob is an immutable object, so a stale owner can never
   * overwrite what a new owner reads): the engine then writes changes to a synced
   * extent into a new blob, as it does for map nodes.
   */
  readonly rewritable: boolean;
  /**
   * Reads `length` bytes at `offset` of blob `id` into `target` at `targetOffset`.
   * Where the blobs after `id` follow it in storage (`adjacent`), the range may run on
   * into them, each a whole blob of its size class: one read for many extents.
   */
  read(id: number, offset: number, target: Buffer, targetOffset: number, length: number): Promise<void>;
  /** Whether blob `next` lies right after blob `id` in storage, so that one `read` may cover both. Absent: never. */
  adjacent?(id: number, next: number): boolean;
  /**
   * The same read done at once, on this thread, where the store can (files always;
   * an object store when its local copy holds the range): true when it read, false
   * when nothing was read and `read` must be used. It spares a read the promises and
   * event-loop turns of the async path, which at 4 KiB cost more than the read.
   */
  readNow?(id: number, offset: number, target: Buffer, targetOffset: number, length: number): boolean;
  /**
   * Writes `length` bytes of `source` from `sourceOffset` at `offset` of blob `id`,
   * creating it when absent. Where the blobs after `id` follow it in storage
   * (`adjacent`), the range may run on into them, each a whole blob of its size class.
   */
  write(id: number, offset: number, source: Buffer, sourceOffset: number, length: number): Promise<void>;
  /** The same write done at once, on this thread (as `readNow`); throws where `write` would reject. */
  writeNow?(id: number, offset: number, source: Buffer, sourceOffset: number, length: number): void;
  /** Makes the named blobs' contents and existence durable. */
  sync(ids: Iterable<number>): Promise<void>;
  /**
   * `sync` for a commit whose tree names the blobs: returns catalog ops the commit's
   * transaction must carry for the blobs to be found (an object store's index of blobs
   * it packed together), and `committed` to call once it has. Until then, each call
   * that names such a blob returns its ops again. Absent: `sync`, and no ops.
   */
  syncForCommit?(ids: Iterable<number>): Promise<DurableForCommit>;
  /** Removes blobs; ids that do not exist are ignored. */
  delete(ids: Iterable<number>): Promise<void>;
  /** Every blob id present, in no particular order. */
  list(): Promise<number[]>;
  /**
   * Deletes what holds no blob any more (an object store's packs whose blobs were all
   * deleted); the collector calls it after its sweep. Returns how many went. Absent:
   * a blob's space goes with it.
   */
  collectUnused?(): Promise<number>;
  /** Space the blobs take on their medium. */
  usage(): Promise<{ blobs: number; bytes: number }>;
  /** Space left for new blobs, or undefined where the medium has no meaningful limit. */
  availableBytes(): Promise<number | undefined>;
  close(): Promise<void>;
}

/** Blobs made durable for a commit: the catalog ops its transaction must carry, and what to call once it has. */
export interface DurableForCommit {
  ops: Op[];
  committed(): void;
}
