import Database from 'better-sqlite3';
import { randomBytes } from 'node:crypto';
import { ArborError } from '../errors';
import { Catalog, Compare, KvEntry, Lease, ListOptions, Op, TxnResult, WatchEvent } from './catalog';

/**
 * The embedded catalog: one SQLite database in the data directory.
 *
 * It is opened in exclusive locking mode and takes its lock at once, so a second
 * process that opens the same data directory fails with SQLITE_BUSY instead of
 * writing beside us; the lock is a POSIX lock, released by the kernel when the
 * process dies, so a crash never leaves the directory locked. Commits are
 * synchronous (WAL, synchronous=FULL): a commit that returned survives power loss.
 *
 * Leases live as long as this process holds the catalog: keys attached to one are
 * deleted when it is revoked, and those a previous process left are deleted at open.
 */
export class SqliteCatalog implements Catalog {
  readonly exclusive = true;
  private readonly leases = new Set<string>();
  private readonly watchers = new Set<{ prefix: string; listener: (events: WatchEvent[]) => void }>();
  private readonly stmt: {
    get: Database.Statement<[string], { key: string; value: string; mod_revision: number }>;
    list: Database.Statement<[string, string, number], Row>;
    listAfter: Database.Statement<[string, string, number], Row>;
    listBoth: Database.Statement<[string, string, string, number], Row>;
    put: Database.Statement<[string, string, number, string | null]>;
    del: Database.Statement<[string]>;
    leased: Database.Statement<[string], { key: string }>;
    revision: Database.Statement<[], { revision: number }>;
    setRevision: Database.Statement<[number]>;
  };
  private revision: number;
  private closed = false;

  private constructor(private readonly db: Database.Database) {
    this.stmt = {
      get: db.prepare('SELECT key, value, mod_revision FROM kv WHERE key = ?'),
      // One lower bound each: given both `key >= prefix` and `key > after`, SQLite seeks by
      // one and filters by the other, which made a page deep in a prefix scan from its start.
      // Listings read rows as arrays (raw): no object per row to build and throw away.
      list: db.prepare<[string, string, number], Row>('SELECT key, value, mod_revision FROM kv WHERE key >= ? AND key < ? ORDER BY key LIMIT ?').raw(true),
      listAfter: db.prepare<[string, string, number], Row>('SELECT key, value, mod_revision FROM kv WHERE key > ? AND key < ? ORDER BY key LIMIT ?').raw(true),
      listBoth: db
        .prepare<[string, string, string, number], Row>('SELECT key, value, mod_revision FROM kv WHERE key >= ? AND key < ? AND key > ? ORDER BY key LIMIT ?')
        .raw(true),
      put: db.prepare(
        'INSERT INTO kv (key, value, mod_revision, lease) VALUES (?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value, mod_revision = excluded.mod_revision, lease = excluded.lease',
      ),
      del: db.prepare('DELETE FROM kv WHERE key = ?'),
      leased: db.prepare('SELECT key FROM kv WHERE lease = ?'),
      revision: db.prepare('SELECT revision FROM meta WHERE id = 1'),
      setRevision: db.prepare('UPDATE meta SET revision = ? WHERE id = 1'),
    };
    this.revision = this.stmt.revision.get()!.revision;
  }

  /**
   * `lockHint` names what holds the lock when it is taken (for the error message).
   * `unsynced` skips the fsync of each commit: only for building throwaway catalogs
   * in benchmarks, where a crash may lose the last commits.
   */
  static open(path: string, lockHint: () => string, options: { unsynced?: boolean } = {}): SqliteCatalog {
    let db: Database.Database | undefined;
    try {
      db = new Database(path, { timeout: 0 });
      db.pragma('locking_mode = EXCLUSIVE');
      db.pragma('journal_mode = WAL');
      db.pragma(options.unsynced ? 'synchronous = OFF' : 'synchronous = FULL');
      // A write transaction takes the exclusive lock, and exclusive mode keeps it.
      db.exec('BEGIN EXCLUSIVE; COMMIT;');
      db.exec(`
        CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, mod_revision INTEGER NOT NULL) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS meta (id INTEGER PRIMARY KEY CHECK (id = 1), revision INTEGER NOT NULL);
        INSERT OR IGNORE INTO meta (id, revision) VALUES (1, 0);
      `);
      const columns = db.prepare('PRAGMA table_info(kv)').all() as Array<{ name: string }>;
      if (!columns.some((c) => c.name === 'lease')) db.exec('ALTER TABLE kv ADD COLUMN lease TEXT');
      // Few keys have a lease: without this index, ending the leases at open scanned every key (0.3 s at 100,000).
      db.exec('CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease IS NOT NULL');
      // Leases end with the process that held them.
      db.exec(`
        BEGIN IMMEDIATE;
        UPDATE meta SET revision = revision + 1 WHERE id = 1 AND EXISTS (SELECT 1 FROM kv WHERE lease IS NOT NULL);
        DELETE FROM kv WHERE lease IS NOT NULL;
        COMMIT;
      `);
      return new SqliteCatalog(db);
    } catch (err) {
      db?.close();
      const code = (err as { code?: string }).code;
      if (code === 'SQLITE_BUSY' || code === 'SQLITE_LOCKED') {
        throw new ArborError('busy', `the data directory is in use by another process (${lockHint()}); stop it first`);
      }
      throw new ArborError('unavailable', `cannot open the catalog ${path}: ${(err as Error).message}`);
    }
  }

  async get(key: string): Promise<KvEntry | undefined> {
    this.checkOpen();
    return this.entry(key);
  }

  private entry(key: string): KvEntry | undefined {
    const row = this.stmt.get.get(key);
    return row && { key: row.key, value: row.value, modRevision: row.mod_revision };
  }

  async getMany(keys: string[]): Promise<Array<KvEntry | undefined>> {
    // Synchronous: no other call runs in between, so every key is read at one revision.
    return Promise.all(keys.map((key) => this.get(key)));
  }

  async list(prefix: string, options: ListOptions = {}): Promise<KvEntry[]> {
    this.checkOpen();
    const limit = options.limit ?? -1;
    const end = prefixEnd(prefix);
    const rows =
      options.after === undefined
        ? this.stmt.list.all(prefix, end, limit)
        : options.after.startsWith(prefix)
          ? this.stmt.listAfter.all(options.after, end, limit)
          : this.stmt.listBoth.all(prefix, end, options.after, limit);
    return rows.map(([key, value, modRevision]) => ({ key, value, modRevision }));
  }

  async txn(compares: Compare[], ops: Op[], orRead?: string[]): Promise<TxnResult> {
    this.checkOpen();
    const events: WatchEvent[] = [];
    const apply = this.db.transaction((): TxnResult => {
      for (const compare of compares) {
        const row = this.stmt.get.get(compare.key);
        if ((row?.mod_revision ?? 0) !== compare.modRevision) {
          return { succeeded: false, revision: this.revision, ...(orRead ? { read: orRead.map((key) => this.entry(key)) } : {}) };
        }
      }
      if (ops.length === 0) return { succeeded: true, revision: this.revision };
      const revision = this.revision + 1;
      for (const op of ops) {
        if (op.type === 'put') {
          if (op.lease !== undefined && !this.leases.has(op.lease)) throw new ArborError('failed-precondition', `lease ${op.lease} has ended`);
          this.stmt.put.run(op.key, op.value, revision, op.lease ?? null);
          events.push({ type: 'put', key: op.key, value: op.value, modRevision: revision });
        } else if (this.stmt.del.run(op.key).changes > 0) {
          events.push({ type: 'delete', key: op.key, modRevision: revision });
        }
      }
      this.stmt.setRevision.run(revision);
      return { succeeded: true, revision };
    });
    const result = apply.immediate();
    if (result.succeeded && events.length > 0) {
      this.revision = result.revision;
      this.notify(events);
    }
    return result;
  }

  watch(prefix: string, listener: (events: WatchEvent[]) => void): () => void {
    const watcher = { prefix, listener };
    this.watchers.add(watcher);
    return () => this.watchers.delete(watcher);
  }

  async grantLease(): Promise<Lease> {
    this.checkOpen();
    const id = randomBytes(8).toString('hex');
    this.leases.add(id);
    return {
      id,
      // This process holds the catalog exclusively: nobody can end its leases but itself.
      lost: new Promise<Error>(() => {}),
      revoke: async () => {
        if (!this.leases.delete(id) || this.closed) return;
        const keys = this.stmt.leased.all(id).map((row) => row.key);
        if (keys.length > 0)
          await this.txn(
            [],
            keys.map((key) => ({ type: 'delete', key })),
          );
      },
    };
  }

  /** Every call is local and synchronous: none can wait on anything. */
  closeBy(): void {}

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.watchers.clear();
    this.db.close();
  }

  private notify(events: WatchEvent[]): void {
    for (const watcher of this.watchers) {
      const mine = events.filter((event) => event.key.startsWith(watcher.prefix));
      if (mine.length > 0) watcher.listener(mine);
    }
  }

  private checkOpen(): void {
    if (this.closed) throw new ArborError('unavailable', 'the catalog is closed');
  }
}

/** A listed row, raw: key, value, mod_revision. */
type Row = [string, string, number];

/** The smallest string greater than every string that starts with `prefix`. */
export function prefixEnd(prefix: string): string {
  return prefix + '\u{10ffff}';
}
