/**
 * The catalog: a small transactional key-value store for metadata (volume heads,
 * snapshots, the blob id counter, later leases). Its model is etcd's, so that the
 * embedded SQLite backend and the distributed etcd backend are interchangeable:
 * every key carries the revision of the transaction that last wrote it, a transaction
 * applies only if its compares hold, and watchers see committed changes in order.
 */
export interface KvEntry {
  key: string;
  value: string;
  /** Revision of the transaction that last wrote the key; 0 never appears here. */
  modRevision: number;
}

/** Holds when the key's modRevision equals `modRevision`; 0 means "the key is absent". */
export interface Compare {
  key: string;
  modRevision: number;
}

/** A put may attach its key to a lease: the key disappears when the lease ends. */
export type Op = { type: 'put'; key: string; value: string; lease?: string } | { type: 'delete'; key: string };

/**
 * A lease: keys attached to it live as long as it does. The holder keeps it alive;
 * when it cannot (partitioned, paused past the TTL) the catalog ends it, its keys
 * vanish, and `lost` settles so the holder stops acting on what it held.
 */
export interface Lease {
  readonly id: string;
  /** Resolves with the reason when the lease has ended without `revoke` (expired, or the catalog said so). */
  readonly lost: Promise<Error>;
  /** Ends the lease now; its keys are deleted. */
  revoke(): Promise<void>;
}

export interface TxnResult {
  succeeded: boolean;
  /** The store's revision after the transaction (unchanged when it failed). */
  revision: number;
  /** When it failed: the keys it was asked to read instead (`orRead`), at that revision; undefined where absent. */
  read?: Array<KvEntry | undefined>;
}

export interface WatchEvent {
  type: 'put' | 'delete';
  key: string;
  value?: string;
  modRevision: number;
}

export interface ListOptions {
  /** Only keys strictly after this one (for paging). */
  after?: string;
  limit?: number;
}

export interface Catalog {
  /**
   * True when one process holds the whole catalog (the embedded store's exclusive
   * lock): that process then owns every volume, and no ownership keys are needed.
   */
  readonly exclusive: boolean;
  get(key: string): Promise<KvEntry | undefined>;
  /** Several keys read at one revision, in one round trip (etcd: a read-only transaction); undefined where absent. */
  getMany(keys: string[]): Promise<Array<KvEntry | undefined>>;
  /** Keys with the prefix, in key order. */
  list(prefix: string, options?: ListOptions): Promise<KvEntry[]>;
  /**
   * Applies every op if every compare holds. Where one does not, reads the keys
   * `orRead` names instead, in the same round trip and at one revision (etcd's else
   * branch): what the caller needs to decide its next try, without asking again.
   */
  txn(compares: Compare[], ops: Op[], orRead?: string[]): Promise<TxnResult>;
  /** Calls `listener` with every committed change under `prefix`, in commit order. */
  watch(prefix: string, listener: (events: WatchEvent[]) => void): () => void;
  /** A lease of about `ttlMs`, kept alive until it is revoked or lost. */
  grantLease(ttlMs: number): Promise<Lease>;
  /**
   * The process is closing: every call fails by `deadline` (ms since the epoch) at the
   * latest, and a call made after it fails at once, so that closing never waits on a
   * catalog that cannot answer.
   */
  closeBy(deadline: number): void;
  close(): Promise<void>;
}

export function put(key: string, value: unknown, lease?: Lease): Op {
  return lease ? { type: 'put', key, value: JSON.stringify(value), lease: lease.id } : { type: 'put', key, value: JSON.stringify(value) };
}

/** The entry a transaction that committed `ops` at `revision` left at `key` (one of its puts): what a later compare of it expects. */
export function writtenEntry(ops: Op[], key: string, revision: number): KvEntry {
  const op = ops.find((o): o is Extract<Op, { type: 'put' }> => o.type === 'put' && o.key === key);
  if (!op) throw new Error(`no put of ${key} among the transaction's ops`);
  return { key, value: op.value, modRevision: revision };
}

export function del(key: string): Op {
  return { type: 'delete', key };
}

export function absent(key: string): Compare {
  return { key, modRevision: 0 };
}

export function unchanged(entry: KvEntry): Compare {
  return { key: entry.key, modRevision: entry.modRevision };
}
