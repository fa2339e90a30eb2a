import { Etcd3, EtcdLeaseInvalidError, IOptions, IRequestOp, IResponseOp, Namespace, Range, Watcher } from 'etcd3';
import fs from 'node:fs';
import { Log, silentLog } from '../../lib/logger';
import { ArborError } from '../errors';
import { etcdCallDeadlineMs, etcdDialTimeoutMs, etcdWatchRetryFirstMs, etcdWatchRetryMostMs } from '../limits';
import { Catalog, Compare, KvEntry, Lease, ListOptions, Op, TxnResult, WatchEvent } from './catalog';
import { prefixEnd } from './sqlite';

export interface EtcdLocation {
  /** e.g. http://10.0.0.1:2379 */
  endpoints: string[];
  /** Every key lives under it, so several Arbor installations can share one etcd. */
  prefix: string;
}

export interface EtcdTls {
  caFile?: string;
  certFile?: string;
  keyFile?: string;
}

/**
 * `etcd://host:2379,host:2379/prefix` (plain) or `etcds://...` (TLS): the endpoints
 * and the key prefix. Credentials never come from the URL.
 */
export function parseStoreUrl(url: string): EtcdLocation {
  const match = /^(etcds?):\/\/([^/?#]+)(\/[^?#]*)?$/.exec(url);
  if (!match) throw new ArborError('invalid-argument', `--store ${JSON.stringify(url)} is not etcd://HOST:PORT[,HOST:PORT...]/PREFIX`);
  const [, scheme, hosts, rawPrefix] = match;
  if (hosts.includes('@')) throw new ArborError('invalid-argument', `--store ${url}: credentials do not go in the URL; set ETCD_USERNAME and ETCD_PASSWORD`);
  const endpoints = hosts.split(',').map((host) => {
    if (!/^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}$/.test(host))
      throw new ArborError('invalid-argument', `--store ${url}: ${JSON.stringify(host)} is not HOST:PORT`);
    return `${scheme === 'etcds' ? 'https' : 'http'}://${host}`;
  });
  const prefix = (rawPrefix ?? '/').replace(/\/+$/, '');
  if (!/^(\/[A-Za-z0-9._-]+)*$/.test(prefix))
    throw new ArborError('invalid-argument', `--store ${url}: the prefix ${JSON.stringify(prefix)} may hold letters, digits, '.', '_', '-' and '/'`);
  return { endpoints, prefix: `${prefix}/arbor/` };
}

/**
 * The distributed catalog on etcd (v3 API, through the etcd3 client). The catalog's
 * model is etcd's own, so each call maps to one etcd call: revisions are etcd's
 * mod revisions, a compare on revision 0 is etcd's "key absent", leases are etcd
 * leases kept alive by the client. Every unary call has a deadline: a leader
 * election is absorbed by the client's retries, a lost quorum becomes an error;
 * once the store is closing (closeBy), no call outlives the time it was given.
 */
export class EtcdCatalog implements Catalog {
  readonly exclusive = false;
  private readonly client: Etcd3;
  private readonly kv: Namespace;
  private readonly watchers = new Set<Watcher>();
  /** Stops the keep-alives of each lease still held (close lets them expire). */
  private readonly leases = new Set<() => void>();
  private closed = false;
  /** Set by closeBy: when every call must have ended (ms since the epoch). */
  private closeDeadline = Infinity;

  private constructor(
    options: IOptions,
    private readonly location: EtcdLocation,
    private readonly log: Log,
  ) {
    this.client = new Etcd3({
      ...options,
      // Each try of a unary call (the client tries up to three times); streams (watches, keep-alives) live while used.
      defaultCallOptions: (context) => (context.isStream ? {} : { deadline: this.callDeadline() }),
      faultHandling: { watchBackoff: watchRetries() },
    });
    this.kv = this.client.namespace(location.prefix);
  }

  static async open(location: EtcdLocation, options: { tls?: EtcdTls; log?: Log; env?: NodeJS.ProcessEnv } = {}): Promise<EtcdCatalog> {
    const env = options.env ?? process.env;
    const etcdOptions: IOptions = { hosts: location.endpoints, dialTimeout: etcdDialTimeoutMs };
    if (options.tls && (options.tls.caFile || options.tls.certFile)) {
      etcdOptions.credentials = {
        rootCertificate: options.tls.caFile ? readFile(options.tls.caFile, '--etcd-ca') : Buffer.alloc(0),
        ...(options.tls.certFile ? { certChain: readFile(options.tls.certFile, '--etcd-cert') } : {}),
        ...(options.tls.keyFile ? { privateKey: readFile(options.tls.keyFile, '--etcd-key') } : {}),
      };
    }
    if (env.ETCD_USERNAME) etcdOptions.auth = { username: env.ETCD_USERNAME, password: env.ETCD_PASSWORD ?? '' };
    const catalog = new EtcdCatalog(etcdOptions, location, options.log ?? silentLog);
    try {
      await catalog.kv.get('meta/format').string();
    } catch (err) {
      catalog.client.close();
      throw new ArborError(
        'unavailable',
        `cannot reach etcd at ${location.endpoints.join(', ')}: ${(err as Error).message}; check --store and that etcd is running`,
      );
    }
    return catalog;
  }

  async get(key: string): Promise<KvEntry | undefined> {
    const response = await this.call('get', key, () => this.kv.get(key).exec());
    const kv = response.kvs[0];
    return kv && { key, value: kv.value.toString(), modRevision: Number(kv.mod_revision) };
  }

  async getMany(keys: string[]): Promise<Array<KvEntry | undefined>> {
    // One read-only transaction of range requests: etcd serves it as one linearizable read.
    const response = await this.call('get', keys.join(','), () => this.kv.kv.txn({ success: this.rangeRequests(keys) }));
    return entriesOf(keys, response.responses);
  }

  /** Requests to read each key (under the prefix), as a transaction's ops. */
  private rangeRequests(keys: string[]): IRequestOp[] {
    return keys.map((key) => ({ request_range: { key: Buffer.concat([this.kv.prefix, Buffer.from(key)]) } }));
  }

  async list(prefix: string, options: ListOptions = {}): Promise<KvEntry[]> {
    const start = options.after === undefined ? prefix : `${options.after}\0`;
    const builder = this.kv
      .getAll()
      .inRange(new Range(start, prefixEnd(prefix)))
      .sort('Key', 'Ascend');
    if (options.limit !== undefined) builder.limit(options.limit);
    const response = await this.call('list', prefix, () => builder.exec());
    return response.kvs.map((kv) => ({ key: kv.key.toString(), value: kv.value.toString(), modRevision: Number(kv.mod_revision) }));
  }

  async txn(compares: Compare[], ops: Op[], orRead?: string[]): Promise<TxnResult> {
    // etcd's builder needs one compare; with none, one that always holds.
    const txn = compares.length ? this.kv.if(compares[0].key, 'Mod', '==', compares[0].modRevision) : this.kv.if('meta/format', 'Mod', '>', -1);
    for (const compare of compares.slice(1)) txn.and(compare.key, 'Mod', '==', compare.modRevision);
    txn.then(
      ...ops.map((op) => {
        if (op.type === 'delete') return this.kv.delete().key(op.key);
        const put = this.kv.put(op.key).value(op.value);
        return op.lease === undefined ? put : put.lease(op.lease);
      }),
    );
    if (orRead) txn.else(...this.rangeRequests(orRead));
    const response = await this.call('txn', compares.map((c) => c.key).join(','), () => txn.commit());
    const result: TxnResult = { succeeded: response.succeeded, revision: Number(response.header.revision) };
    return orRead && !response.succeeded ? { ...result, read: entriesOf(orRead, response.responses) } : result;
  }

  watch(prefix: string, listener: (events: WatchEvent[]) => void): () => void {
    if (this.closed) throw new ArborError('unavailable', 'the catalog is closed');
    // Taken at once, not when etcd confirms it (create()): a watch asked for while etcd
    // does not answer must still be cancellable, or the closed client would try to
    // open it again for ever, and that would keep the process alive.
    const watcher = this.kv.watch().prefix(prefix).watcher();
    this.watchers.add(watcher);
    watcher.on('data', (response) => {
      const events: WatchEvent[] = response.events.map((event) => ({
        type: event.type === 'Delete' ? 'delete' : 'put',
        key: event.kv.key.toString(),
        ...(event.type === 'Delete' ? {} : { value: event.kv.value.toString() }),
        modRevision: Number(event.kv.mod_revision),
      }));
      if (events.length > 0) listener(events);
    });
    watcher.on('error', (err) => this.log.warn('etcd watch error', { prefix, error: err.message }));
    return () => {
      if (this.watchers.delete(watcher)) void watcher.cancel().catch(() => {});
    };
  }

  /**
   * Keep-alives are sent here, one KeepAlive call with a deadline every third of the
   * TTL, not by the client's own loop: etcd3 1.1.2's loop can restart twice after a
   * stream fails (a member without a leader), and each time leaks an interval that
   * fires forever, keeping the process alive after the lease is released. As that
   * loop did, the lease counts as lost when etcd says it ended, or when no keep-alive
   * has been answered for twice the TTL.
   */
  async grantLease(ttlMs: number): Promise<Lease> {
    const ttlSeconds = Math.max(1, Math.ceil(ttlMs / 1000));
    const lease = this.kv.lease(ttlSeconds, { autoKeepAlive: false });
    let id: string;
    try {
      id = await lease.grant();
    } catch (err) {
      throw new ArborError('unavailable', `etcd did not grant a lease: ${(err as Error).message}`);
    }
    const everyMs = (ttlSeconds * 1000) / 3;
    let renewedAt = Date.now();
    let timer: NodeJS.Timeout | undefined;
    let ended = false;
    let reportLost!: (err: Error) => void;
    const lost = new Promise<Error>((resolve) => (reportLost = resolve));
    const end = () => {
      ended = true;
      clearTimeout(timer);
      this.leases.delete(stop);
    };
    const stop = () => {
      end();
      lease.release();
    };
    const renew = async () => {
      try {
        await lease.keepaliveOnce({ deadline: Date.now() + Math.min(everyMs, etcdCallDeadlineMs) });
        renewedAt = Date.now();
      } catch (err) {
        if (ended) return;
        const gone = err instanceof EtcdLeaseInvalidError;
        if (gone || Date.now() - renewedAt > 2 * ttlSeconds * 1000) {
          stop();
          reportLost(
            new Error(
              `the etcd lease ${id} ended: ${gone ? 'etcd says it expired' : `no keep-alive answered for ${Math.round((Date.now() - renewedAt) / 1000)} s`}`,
            ),
          );
          return;
        }
        this.log.warn('an etcd lease keep-alive failed; retrying', { lease: id, error: (err as Error).message });
      }
      if (!ended) timer = setTimeout(() => void renew(), everyMs).unref();
    };
    timer = setTimeout(() => void renew(), everyMs).unref();
    this.leases.add(stop);
    return {
      id,
      lost,
      revoke: async () => {
        end();
        await lease
          .revoke()
          .catch((err: Error) =>
            this.log.warn(`revoking an etcd lease failed; etcd ends it, and every key on it, within ${ttlSeconds} s`, { lease: id, error: err.message }),
          );
      },
    };
  }

  closeBy(deadline: number): void {
    this.closeDeadline = Math.min(this.closeDeadline, deadline);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    // A watch is a stream, with no deadline: cancelling one whose stream is reconnecting (a member died) can wait
    // for ever. The client closes all streams below anyway; give each cancel a bounded chance first. (A cancel
    // ends even unanswered: the stream's end detaches it, and with no watcher left the client opens none again.)
    const boundMs = Math.min(etcdCallDeadlineMs, Math.max(0, this.closeDeadline - Date.now()));
    await Promise.all(
      [...this.watchers].map((w) => {
        let timer: NodeJS.Timeout | undefined;
        const bound = new Promise<void>((resolve) => (timer = setTimeout(resolve, boundMs)));
        return Promise.race([w.cancel().catch(() => {}), bound]).finally(() => clearTimeout(timer));
      }),
    );
    this.watchers.clear();
    for (const stop of [...this.leases]) stop();
    this.client.close();
  }

  /** The deadline of one try of a unary call started now. */
  private callDeadline(): number {
    return Math.min(Date.now() + etcdCallDeadlineMs, this.closeDeadline);
  }

  private async call<T>(what: string, key: string, fn: () => Promise<T>): Promise<T> {
    if (this.closed) throw new ArborError('unavailable', 'the catalog is closed');
    if (Date.now() >= this.closeDeadline) throw new ArborError('unavailable', `etcd ${what} ${key}: not tried, the time to close the store is up`);
    try {
      return await fn();
    } catch (err) {
      throw new ArborError('unavailable', `etcd ${what} ${key} at ${this.location.endpoints.join(', ')} failed: ${(err as Error).message}`);
    }
  }
}

type WatchBackoff = NonNullable<NonNullable<IOptions['faultHandling']>['watchBackoff']>;

/**
 * The delays before a broken watch stream is opened again: doubling from the first
 * to the most, each with up to half of it taken off at random (nodes whose streams
 * broke together do not all come back at once). Back to the first once a watch is up.
 */
function watchRetries(delayMs = 0): WatchBackoff {
  return {
    duration: delayMs / 2 + (Math.random() * delayMs) / 2,
    next: () => watchRetries(delayMs === 0 ? etcdWatchRetryFirstMs : Math.min(2 * delayMs, etcdWatchRetryMostMs)),
  };
}

function readFile(file: string, option: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw new ArborError('invalid-argument', `${option} ${file}: ${(err as Error).message}`);
  }
}

/** The entries of range responses, one per key asked (in order); undefined where a key is absent. */
function entriesOf(keys: string[], responses: IResponseOp[]): Array<KvEntry | undefined> {
  return keys.map((key, i) => {
    const kv = responses[i]?.response_range.kvs[0];
    return kv && { key, value: kv.value.toString(), modRevision: Number(kv.mod_revision) };
  });
}
