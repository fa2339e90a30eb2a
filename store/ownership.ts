import { Log } from '../lib/logger';
import { Catalog, Compare, KvEntry, Lease, absent, del, put } from './catalog/catalog';
import { decode, shape, string } from './decode';
import { ArborError } from './errors';

/** Who serves a volume's writes: one process at a time, while its lease lives. */
export interface OwnerRecord {
  nodeId: string;
  lease: string;
  acquiredAt: string;
}

export const ownerKey = (volumeId: string) => `owners/${volumeId}`;

export const decodeOwner = (entry: KvEntry): OwnerRecord =>
  decode(entry, 'an owner record', shape<OwnerRecord>({ nodeId: string, lease: string, acquiredAt: string }));

/** The volume is owned by another live process; `owner` says which. */
export class OwnedElsewhere extends ArborError {
  constructor(
    readonly volumeName: string,
    readonly owner: OwnerRecord,
  ) {
    super('busy', `volume ${volumeName} is attached on node ${owner.nodeId}; it serves the volume until it lets go or its lease expires`);
  }
}

/**
 * Ownership of volume heads in a shared catalog (Olive's rule): a process serves a
 * volume's writes only while it holds the volume's owner key, attached to the
 * process's session lease. Acquiring is one transaction (the key must be absent);
 * the key's revision is the guard every commit of that volume compares, so a
 * process whose lease ended (paused, partitioned) cannot commit again, and another
 * can take the volume over only once the key is gone: released, or expired with
 * the lease.
 */
export class Ownership {
  private lease: Lease;
  private regranting?: Promise<void>;
  private readonly lostListeners: Array<(reason: string) => void> = [];
  /** Leases this process held and lost: keys still on one of them (etcd has not expired it yet) are its own, held by nothing. */
  private readonly lostLeases = new Set<string>();
  private closed = false;

  private constructor(
    private readonly catalog: Catalog,
    readonly nodeId: string,
    private readonly ttlMs: number,
    private readonly log: Log,
    lease: Lease,
  ) {
    this.lease = lease;
    this.watchLease(lease);
  }

  static async start(catalog: Catalog, nodeId: string, ttlMs: number, log: Log): Promise<Ownership> {
    return new Ownership(catalog, nodeId, ttlMs, log, await catalog.grantLease(ttlMs));
  }

  /** The session lease, for other keys that must vanish with this process (reservations, requests). */
  async currentLease(): Promise<Lease> {
    if (this.regranting) await this.regranting;
    return this.lease;
  }

  /** Called once for every lease this process loses: every volume it owned is no longer its own. */
  onLost(listener: (reason: string) => void): void {
    this.lostListeners.push(listener);
  }

  /** Takes the volume, or throws OwnedElsewhere. Returns the guard its commits compare. */
  async acquire(volumeId: string, volumeName: string): Promise<Compare> {
    const key = ownerKey(volumeId);
    for (;;) {
      const lease = await this.currentLease();
      const record: OwnerRecord = { nodeId: this.nodeId, lease: lease.id, acquiredAt: new Date().toISOString() };
      const result = await this.catalog.txn([absent(key)], [put(key, record, lease)]);
      if (result.succeeded) return { key, modRevision: result.revision };
      const current = await this.catalog.get(key);
      if (!current) continue; // released in between
      const owner = decodeOwner(current);
      if (owner.lease === lease.id || this.lostLeases.has(owner.lease)) {
        // Ours, yet no volume here holds it (the store opens a volume once): left by a
        // release that failed, or by an acquire that landed while its answer was lost
        // (the etcd client retried it); or on a lease this process lost (every volume it
        // guarded was marked lost then) that etcd has not ended yet, as when keep-alives
        // went unanswered here while etcd still had them. Delete it and take the volume afresh.
        this.log.warn('found an owner key of this process that no open volume holds; taking the volume afresh', { volume: volumeName });
        await this.catalog.txn([{ key, modRevision: current.modRevision }], [del(key)]);
        continue;
      }
      throw new OwnedElsewhere(volumeName, owner);
    }
  }

  /**
   * Lets go of a volume (after its last commit). A guard that no longer holds means it
   * was not ours any more. When the catalog cannot be reached, this throws and tries
   * again in the background: the key is on a lease this process keeps alive, so until
   * it is deleted no other node could ever take the volume.
   */
  async release(guard: Compare): Promise<void> {
    try {
      await this.catalog.txn([guard], [del(guard.key)]);
    } catch (err) {
      this.releaseLater(guard, 0);
      throw err;
    }
  }

  private releaseLater(guard: Compare, attempt: number): void {
    if (this.closed) return;
    const retry = () => {
      if (this.closed) return;
      this.catalog.txn([guard], [del(guard.key)]).then(
        () => this.log.info('let go of a volume once the catalog answered again', { key: guard.key }),
        () => this.releaseLater(guard, attempt + 1),
      );
    };
    setTimeout(retry, Math.min(5000, 250 * 2 ** attempt)).unref();
  }

  async ownerOf(volumeId: string): Promise<OwnerRecord | undefined> {
    const entry = await this.catalog.get(ownerKey(volumeId));
    return entry && decodeOwner(entry);
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.lease.revoke();
  }

  private watchLease(lease: Lease): void {
    void lease.lost.then((err) => {
      if (this.closed || lease !== this.lease) return;
      this.lostLeases.add(lease.id);
      this.log.error('the owner lease ended: every volume this node served is no longer its own', { nodeId: this.nodeId, error: err.message });
      for (const listener of this.lostListeners) listener(err.message);
      this.regranting = this.regrant().finally(() => (this.regranting = undefined));
    });
  }

  private async regrant(): Promise<void> {
    for (let attempt = 0; !this.closed; attempt++) {
      try {
        this.lease = await this.catalog.grantLease(this.ttlMs);
        this.watchLease(this.lease);
        this.log.info('a new owner lease was granted', { nodeId: this.nodeId });
        return;
      } catch (err) {
        this.log.warn('cannot get a new owner lease yet; retrying', { attempt, error: (err as Error).message });
        await new Promise((r) => setTimeout(r, Math.min(5000, 250 * 2 ** attempt)));
      }
    }
  }
}
