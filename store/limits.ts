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

/** Names are what the CSI spec allows: at most this many bytes of UTF-8 (store/names.ts). */
export const maxNameBytes = 128;

/** Blob ids are reserved from the catalog in batches, never reused. */
export const blobIdBatchSize = 4096;

/** Clean map nodes kept in memory across all volumes, by their bytes (16,384 plain nodes; a wide leaf weighs 4 or more). */
export const nodeCacheMaxBytes = 64 * 1024 * 1024;
/** Past this many dirty map nodes a volume commits in the background. */
export const maxDirtyNodesPerVolume = 8192;
/**
 * Space held back on the data directory's disk for commits once it is full
 * (store/space-reserve.ts): one volume's largest commit, its dirty nodes written as
 * new blobs (8192 of 4 KiB), but no more than a share of a small filesystem.
 */
export const spaceReserveBytes = maxDirtyNodesPerVolume * nodeSizeBytes;
export const spaceReserveMaxShare = 0.02;
/**
 * Unflushed work is committed at least this often: the kernel's own dirty-data
 * expiry (vm.dirty_expire_centisecs, 30 s). Clients that need durability flush; a
 * shorter interval only forces an fsync of everything dirty into write bursts.
 */
export const commitIntervalMs = 30_000;

/** A unary etcd call that has not answered in this long fails (a leader election takes ~1 s; a lost quorum never answers). */
export const etcdCallDeadlineMs = 5_000;
/** How long the etcd client tries to connect to an endpoint. */
export const etcdDialTimeoutMs = 3_000;
/**
 * A watch whose stream broke is opened again after a delay that doubles from the
 * first to the most (with jitter). The etcd client's own backoff grows to 30 s over
 * an outage, and its pending retry is a timer that keeps the process alive after the
 * client closed: a node stopped after an outage exited up to 30 s late.
 */
export const etcdWatchRetryFirstMs = 250;
export const etcdWatchRetryMostMs = 2_000;
/**
 * How long closing a store may wait on the catalog, all steps together (committing
 * open volumes, letting go of their owner keys, revoking the lease, giving back id
 * batches). Then every catalog call fails: without quorum a call would take up to
 * three deadlines, and a pod being stopped has 30 s by default.
 */
export const closeCatalogWithinMs = 8_000;
/** Past that time a step of the close still gets this long to fail by itself (its catalog calls then fail at once) before it is given up. */
export const closeStepGraceMs = 1_000;
/**
 * An owner lease lives this long without keep-alives: a node that stops (crash,
 * partition, pause) loses its volumes this long after, and another node may take
 * them over. Keep-alives go out at a third of it.
 */
export const defaultOwnerLeaseTtlMs = 10_000;
/** How long a request to a volume's owner (a snapshot of an attached volume) may take. */
export const ownerRequestTimeoutMs = 30_000;
/** How long an owner holds a volume (writes paused) for a group snapshot before it gives up on the coordinator. */
export const groupHoldTimeoutMs = 10_000;
/** While waiting for an owner's answer, how often the asker checks that the owner still holds the volume. */
export const ownerCheckIntervalMs = 1_000;

/** Open segment files kept by the file backend (each holds 4096 blobs). */
export const maxOpenSegmentFiles = 512;
/** Parallel fsyncs issued by the file backend during a flush. */
export const syncConcurrency = 16;
/**
 * Reads of at least this many bytes the file backend does in the thread pool, not on
 * the event loop: a 1 MiB read is two copies of 1 MiB on one thread otherwise (the
 * pread, then the reply into the socket), and the hand-off (~20 µs) is small beside
 * either. Smaller reads stay on the thread, where the hand-off would dominate.
 * (Writes stay on the thread: see FileBlobStore.write.)
 */
export const poolReadBytes = 256 * 1024;
/**
 * The most one write call of the file backend writes; a longer write is cut at file
 * offsets that are multiples of it. Linux (6.x, ext4 with large folios) caches a
 * range in folios as large as the write that first filled it, and a later 4 KiB
 * write into a folio costs in proportion to the folio: on these VMs 2.3 µs into
 * 4 KiB folios, 4.4 µs into 64 KiB, 8.6 µs into 256 KiB and 19.7 µs into 1 MiB. A
 * guest that writes a file in order and then updates it at random (a database) would
 * pay 5x on every update after one 1 MiB write; 64 KiB keeps filling fast (4.2 GB/s
 * against 6 GB/s at 1 MiB) and the updates near the cheapest.
 */
export const writeCallBytes = 64 * 1024;

/*
 * The S3 blob backend (store/blobs/s3.ts) and its node-local cache (blob-cache.ts).
 */
/** Blobs uploaded at once by one store; each holds its bytes in memory while it goes (32 × 4 MiB at most). */
export const s3UploadConcurrency = 32;
/**
 * A commit of a few small blobs (a snapshot's or a flush's: a data extent and the map
 * nodes above it) uploads them as one pack object, one PUT instead of one each: at
 * least two and at most this many blobs, each at most `s3PackBlobMaxBytes`. Their
 * index keys ride in the commit's transaction: with a batch of snapshots (4 keys each,
 * `maxSnapshotsPerTxn`) it stays under etcd's --max-txn-ops of 128. A bigger commit
 * uploads its blobs as objects of their own, in parallel, and keeps the catalog free
 * of an index key per blob.
 */
export const s3PackMaxBlobs = 16;
export const s3PackBlobMaxBytes = 256 * 1024;
/**
 * Deleting packed blobs deletes their index keys at most this much later, together
 * (or at once when a transaction's worth is waiting): a volume flushed after every
 * write frees the map nodes of its last commit at each commit, and would otherwise
 * add a catalog transaction to each.
 */
export const s3PackForgetDelayMs = 1000;
/**
 * A pack object no index key names is deleted by the collector only once it is this
 * old: until then its index may still come with a commit. A packed blob whose index no
 * commit has carried within half this long is packed anew.
 */
export const s3PackGraceMs = 60 * 60 * 1000;
/** Reads of packed blobs' index keys in flight at once, each of `maxCatalogOpsPerTxn` keys (a sync's check that none of its blobs was packed before). */
export const s3PackIndexReadConcurrency = 4;
/** Keys in one DeleteObjects request: S3's own maximum. */
export const s3DeleteBatchKeys = 1000;
/** DeleteObjects requests in flight at once. */
export const s3DeleteConcurrency = 4;
/** Sockets one store opens to the object store; requests beyond wait for one. */
export const s3MaxSockets = 64;
/** Tries per S3 request, the first included (the SDK's standard retry mode, with backoff). */
export const s3MaxAttempts = 3;
/** Establishing a connection to the object store. */
export const s3ConnectTimeoutMs = 5_000;
/**
 * One try of one request, until the response headers: a stopped or full RGW makes
 * requests hang rather than fail, and only a timeout ends them. 15 s sends a 4 MiB
 * extent at 300 KB/s; with the tries and backoff a dead endpoint fails a flush within
 * about 50 s instead of never.
 */
export const s3RequestTimeoutMs = 15_000;
/** A socket silent this long mid-request fails it: covers a response body that stops arriving. */
export const s3SocketIdleTimeoutMs = 15_000;
/** Keys start with the URL's prefix; S3 keys are at most 1024 bytes, and ours add 17. */
export const maxS3PrefixBytes = 512;
/** Descriptors the blob cache keeps open (staged and clean entries alike). */
export const maxOpenCacheFiles = 256;
/** A cache hit refreshes its file's mtime (its rank after a restart) at most this often. */
export const cacheTouchIntervalMs = 60_000;

/** What a node's blob cache may hold by default (`--cache-size`). */
export const defaultBlobCacheBytes = 4 * 1024 * 1024 * 1024;

/** The highest maxIops a volume may be given (requests per second); above it a limit would never bite. */
export const maxQosIops = 10_000_000;
/** How long an idle volume may run ahead of its QoS limits, at most (seconds of each rate in its bucket). */
export const maxQosBurstSeconds = 60;
/**
 * The QoS bucket's depth when a volume's limits name none: a tenth of a second of
 * each rate, so a limited volume measured over a few seconds runs at its limit, and
 * a short burst (a filesystem's journal flush) is not delayed request by request.
 */
export const defaultQosBurstSeconds = 0.1;

/**
 * Keys one catalog transaction of ours reads or writes at most: etcd's --max-txn-ops is
 * 128 by default. A format migration's writes, the deletes of packed blobs' index keys
 * and the reads of many of them go in transactions of this many.
 */
export const maxCatalogOpsPerTxn = 100;

/**
 * Concurrent snapshots of one volume are made together, at most this many in one
 * catalog transaction (one commit, one fsync): each takes four keys and two absent
 * compares, so with the volume's record a batch stays under etcd's --max-txn-ops of
 * 128 by default.
 */
export const maxSnapshotsPerTxn = 24;

/**
 * Snapshot entries a store remembers from its lookups by id (Store.findSnapshot), so
 * that a clone of a snapshot just looked up goes straight to its transaction.
 */
export const seenSnapshotEntries = 256;

/**
 * Volumes a store remembers it last snapshotted detached (Store.snapshotBatch), so
 * that the next snapshot of one is one catalog transaction with no read before it.
 */
export const seenDetachedVolumeEntries = 256;
