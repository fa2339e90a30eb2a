import { setTimeout as sleep } from 'node:timers/promises';
import { Log } from '../../lib/logger';
import { ArborError, isArborError } from '../../store/errors';
import { OwnedElsewhere } from '../../store/ownership';
import { Store } from '../../store/store';
import { RangeStatus } from '../../store/tree';
import { ExportClient, ExportProvider, ExportSummary, NbdExport } from '../nbd/export';
import { StoreExports } from '../store-exports';
import { RelayExport, RelayTarget } from './relay-export';
import { maxUnflushedBytes, UnflushedWrites } from './unflushed-writes';

export interface RoutedExportsOptions {
  /** Where a node's NBD server is reached (what it advertised); undefined when it advertised nothing. */
  targetOf(nodeId: string): Promise<RelayTarget | undefined>;
  /** Connections to an owner per relayed volume. */
  connections: number;
  /** How long a request waits for the volume to be served again (a handover, an owner's restart or death) before it fails. */
  retryMs: number;
  /** A relayed request not answered in this long is routed again (an owner paused or cut off loses its lease meanwhile). */
  requestTimeoutMs: number;
  log: Log;
}

/** Between attempts to find where a volume is served: from this, doubling up to the maximum. */
const rerouteFirstDelayMs = 20;
const rerouteMaxDelayMs = 1_000;
/** How long opening a volume for a client of this host may wait for it to be served somewhere (within the client's handshake). */
const openDeadlineMs = 20_000;

/**
 * Distributed mode, where one process serves a volume at a time (its owner), and
 * every node can attach every volume. A client on this host (the kernel's device,
 * QEMU) gets a route: the volume served from the store here when this node can own
 * it, or relayed to the node that owns it. The route changes under the client
 * without its noticing: a request whose backend went away is sent again on the new one.
 *
 * Ownership follows the users (one server per volume gives QEMU the shared-disk
 * semantics its live migration relies on: the source flushes, then the target
 * writes). A node serves other nodes' relays only while it has clients of its own
 * for the volume; when its last one goes, it hands the relays off (answers what they
 * sent, closes without refusing), commits and lets go, and the next request of a
 * relaying node takes the volume over and is served there. The owner key's revision
 * fences the old owner: once another node holds the volume, no commit of the old
 * one can land.
 */
export class RoutedExports implements ExportProvider {
  private readonly routes = new Map<string, RoutedVolume>();
  private readonly relayed = new Map<string, Set<ExportClient>>();

  constructor(
    private readonly store: Store,
    private readonly local: StoreExports,
    private readonly options: RoutedExportsOptions,
  ) {}

  async open(name: string, client?: ExportClient): Promise<NbdExport | undefined> {
    // Snapshots never change: every node reads them from the store itself.
    if (name.includes('@')) return this.local.open(name);
    if (!(await this.store.findVolume({ name }))) return undefined;
    if (client?.remote) return this.openForRelay(name, client);
    let route = this.routes.get(name);
    if (!route) {
      route = new RoutedVolume(name, this.local, this.options, (idle) => this.routeIdle(name, idle));
      this.routes.set(name, route);
    }
    route.retain();
    try {
      await route.ready();
    } catch (err) {
      await route.close();
      throw err;
    }
    return route;
  }

  async exists(name: string): Promise<boolean> {
    if (!name.includes('@')) return (await this.store.findVolume({ name })) !== undefined;
    const snapshot = await this.local.open(name);
    await snapshot?.close?.();
    return snapshot !== undefined;
  }

  list(): Promise<ExportSummary[]> {
    return this.local.list();
  }

  /** Another node relays a volume to this one: served only while this node owns it and uses it itself. */
  private async openForRelay(name: string, client: ExportClient): Promise<NbdExport | undefined> {
    if (!this.routes.get(name)?.servedHere) {
      throw new ArborError('unavailable', `volume ${name} is not in use on this node: the node that uses it serves it`);
    }
    const exp = await this.local.open(name);
    if (!exp) return undefined;
    const relays = this.relayed.get(name) ?? new Set<ExportClient>();
    this.relayed.set(name, relays);
    relays.add(client);
    // The store's export, with a close that also forgets the relay (its other members come from the prototype).
    const tracked = Object.create(exp) as NbdExport;
    tracked.close = async () => {
      relays.delete(client);
      if (relays.size === 0 && this.relayed.get(name) === relays) this.relayed.delete(name);
      await exp.close?.();
    };
    return tracked;
  }

  /** The last client on this host closed the volume: the nodes relaying to this one take it over. */
  private routeIdle(name: string, route: RoutedVolume): void {
    if (this.routes.get(name) === route) this.routes.delete(name);
    const relays = this.relayed.get(name);
    if (!relays || relays.size === 0) return;
    this.options.log.info('handing a volume over: no client here uses it any more; the nodes relaying to this one take it', {
      volume: name,
      relays: relays.size,
    });
    for (const relay of relays) relay.handOff();
  }
}

/**
 * One volume for every client on this host: served from the store here, or relayed
 * to its owner, and routed again when that backend goes away.
 */
class RoutedVolume implements NbdExport {
  private users = 0;
  private closed = false;
  private readonly unflushed = new UnflushedWrites();
  private current?: NbdExport;
  private resolving?: Promise<NbdExport>;
  /** What the last backend said, kept while a new one is found. */
  private last = { sizeBytes: 0, readOnly: false, preferredBlockBytes: 4096, local: false };

  constructor(
    readonly name: string,
    private readonly local: StoreExports,
    private readonly options: RoutedExportsOptions,
    private readonly onIdle: (route: RoutedVolume) => void,
  ) {}

  retain(): void {
    this.users++;
  }

  /** Resolves once the volume is served somewhere. */
  async ready(): Promise<void> {
    await this.call('open', async () => undefined, undefined, Math.min(this.options.retryMs, openDeadlineMs));
  }

  /** This node owns the volume and serves it from its store. */
  get servedHere(): boolean {
    return this.current !== undefined && this.last.local;
  }

  get description(): string {
    return this.current?.description ?? `volume ${this.name}`;
  }

  get sizeBytes(): number {
    return this.current ? (this.last.sizeBytes = Math.max(this.last.sizeBytes, this.current.sizeBytes)) : this.last.sizeBytes;
  }

  get readOnly(): boolean {
    return this.last.readOnly;
  }

  get preferredBlockBytes(): number {
    return this.last.preferredBlockBytes;
  }

  async close(): Promise<void> {
    if (--this.users > 0) return;
    this.closed = true;
    this.onIdle(this);
    const backend = this.current ?? (await this.resolving?.catch(() => undefined));
    this.current = undefined;
    await backend?.close?.();
  }

  readInto(offset: number, target: Buffer, targetOffset: number, length: number): Promise<void> {
    return this.call('read', (b) => b.readInto(offset, target, targetOffset, length));
  }

  async write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    await this.call(
      'write',
      (b) => b.write(offset, data, fua),
      () => fua || this.unflushed.wrote(offset, data),
    );
    await this.boundUnflushed();
  }

  async flush(): Promise<void> {
    let mark = 0;
    await this.call(
      'flush',
      (b) => ((mark = this.unflushed.mark), b.flush()),
      () => this.unflushed.flushed(mark),
    );
  }

  trim(offset: number, length: number): Promise<void> {
    return this.call(
      'trim',
      (b) => b.trim(offset, length),
      () => this.unflushed.trimmed(offset, length),
    );
  }

  zero(offset: number, length: number, options: { noHole: boolean; fua: boolean; fast: boolean }): Promise<void> {
    return this.call(
      'write-zeroes',
      (b) => b.zero(offset, length, options),
      () => options.fua || this.unflushed.zeroed(offset, length, options.noHole),
    );
  }

  /** Many unflushed writes held for replay: a flush makes them durable before more are acknowledged. */
  private async boundUnflushed(): Promise<void> {
    if (this.unflushed.bytes > maxUnflushedBytes) await this.flush();
  }

  blockStatus(offset: number, length: number): Promise<RangeStatus[]> {
    return this.call('block-status', (b) => b.blockStatus(offset, length));
  }

  cache(offset: number, length: number): Promise<void> {
    return this.call('cache', (b) => b.cache(offset, length));
  }

  /**
   * Runs a request where the volume is served, finding that again while it moves.
   * `done` runs when the request succeeded on the backend that serves the volume now
   * (an answer from a backend replaced meanwhile does not count: the request is sent
   * again, so that every acknowledged change is on the current backend or kept).
   */
  private async call<T>(what: string, request: (backend: NbdExport) => Promise<T>, done?: () => unknown, retryMs = this.options.retryMs): Promise<T> {
    const deadline = Date.now() + retryMs;
    for (let delay = rerouteFirstDelayMs; ; delay = Math.min(delay * 2, rerouteMaxDelayMs)) {
      if (this.closed) throw new ArborError('unavailable', `volume ${this.name}: closed`);
      let backend: NbdExport | undefined;
      try {
        backend = await this.backend();
        const result = await request(backend);
        if (this.current !== backend) throw new ArborError('unavailable', `volume ${this.name}: answered by a backend that was replaced meanwhile`);
        done?.();
        return result;
      } catch (err) {
        // Moving (a handover, an owner that stopped or died, a lease that ended) is waited for; anything else is the answer.
        if (!isArborError(err, 'unavailable') && !isArborError(err, 'busy')) throw err;
        if (backend) this.drop(backend);
        if (Date.now() + delay > deadline) throw err;
        this.options.log.debug('volume moving: routing the request again', { volume: this.name, request: what, error: (err as Error).message });
        await sleep(delay);
      }
    }
  }

  private backend(): Promise<NbdExport> {
    if (this.current) return Promise.resolve(this.current);
    this.resolving ??= this.resolve().finally(() => (this.resolving = undefined));
    return this.resolving;
  }

  /** Serves the volume from the store here when this node can own it, else relays it to its owner. */
  private async resolve(): Promise<NbdExport> {
    let backend: NbdExport;
    try {
      const exp = await this.local.open(this.name);
      if (!exp) throw new ArborError('not-found', `volume ${this.name} does not exist any more`);
      backend = exp;
      this.last.local = true;
    } catch (err) {
      if (!(err instanceof OwnedElsewhere)) throw err;
      const target = await this.options.targetOf(err.owner.nodeId);
      if (!target) {
        throw new ArborError(
          'unavailable',
          `volume ${this.name} is served by node ${err.owner.nodeId}, which advertises no NBD address (--nbd-advertise) to relay to`,
        );
      }
      const relay = await RelayExport.open(
        this.name,
        target,
        { connections: this.options.connections, retryMs: 0, requestTimeoutMs: this.options.requestTimeoutMs, log: this.options.log },
        () => {},
      );
      if (!relay) throw new ArborError('unavailable', `volume ${this.name}: node ${err.owner.nodeId} does not serve it`);
      backend = relay.retain();
      this.last.local = false;
    }
    if (this.closed) {
      await backend.close?.();
      throw new ArborError('unavailable', `volume ${this.name}: closed`);
    }
    if (this.unflushed.count > 0) {
      // What the last backend acknowledged and may have lost goes to this one first; no other request is sent meanwhile.
      const replayed = { changes: this.unflushed.count, bytes: this.unflushed.bytes };
      try {
        await this.unflushed.replay(backend);
      } catch (err) {
        await backend.close?.();
        throw err;
      }
      this.options.log.info('volume moved: the changes acknowledged since the last flush were sent again', { volume: this.name, ...replayed });
    }
    Object.assign(this.last, {
      sizeBytes: Math.max(this.last.sizeBytes, backend.sizeBytes),
      readOnly: backend.readOnly,
      preferredBlockBytes: backend.preferredBlockBytes,
    });
    this.options.log.info('volume routed', { volume: this.name, served: this.last.local ? 'here' : 'relayed to its owner', backend: backend.description });
    this.current = backend;
    return backend;
  }

  private drop(backend: NbdExport): void {
    if (this.current !== backend) return;
    this.current = undefined;
    void backend.close?.()?.catch(() => undefined);
  }
}
