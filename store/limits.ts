/** Every bound of the store in one place, named with its unit. */

/** A map node: 512 entries of 64 bits. */
export const nodeSizeBytes = 4096;
export const entriesPerNode = 512;

export const minExtentSizeBytes = 4 * 1024;
export const maxExtentSizeBytes = 4 * 1024 * 1024;
export const defaultExtentSizeBytes = 64 * 1024;

/** Volume sizes are whole sectors so that every NBD client can address the end. */
export const sectorSizeBytes = 512;
/** 2^50 bytes keeps every offset and entry an exact JavaScript number. */
export const maxVolumeSizeBytes = 2 ** 50;

/** Names become NBD export names, file names in exports and Kubernetes object references. */
export const maxNameLength = 128;

/** Blob ids are reserved from the catalog in batches, never reused. */
export const blobIdBatchSize = 4096;

/** Clean map nodes kept in memory across all volumes (64 MiB). */
export const nodeCacheMaxNodes = 16384;
/** Past this many dirty map nodes a volume commits in the background. */
export const maxDirtyNodesPerVolume = 8192;
/**
 * Unflushed work is committed at least this often: the kernel's own dirty-data
 * expiry (vm.dirty_expire_centisecs, 30 s). Clients that need durability flush; a
 * shorter interval only forces an fsync of everything dirty into write bursts.
 */
export const commitIntervalMs = 30_000;

/** Open segment files kept by the file backend (each holds 4096 blobs). */
export const maxOpenSegmentFiles = 512;
/** Parallel fsyncs issued by the file backend during a flush. */
export const syncConcurrency = 16;
