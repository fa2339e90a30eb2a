import { setTimeout as sleep } from 'node:timers/promises';
import { Log } from '../../lib/logger';
import { ArborError, isArborError } from '../../store/errors';
import { RangeStatus } from '../../store/tree';
import { NbdExport } from '../nbd/export';
import { RelayExport } from './relay-export';
import { maxUnflushedBytes, UnflushedWrites } from './unflushed-writes';

export interface RouteOptions {
  /** How long a request waits for the volume to be served again (a handover, a server's restart or death) before it fails. */
  retryMs: number;
  log: Log;
}

/** Between attempts to find where a volume is served: from this, doubling up to the maximum. */
const rerouteFirstDelayMs = 20;
const rerouteMaxDelayMs = 250;
/** How long opening a volume for a client of this host may wait for it to be served somewhere (within the client's handshake). */
const openDeadlineMs = 20_000;

/**
 * One volume for every client on this host: served from the store here, or relayed
 * to its owner, and routed again when that backend goes away.
 */
export class RoutedVolume implements NbdExport {
  private users = 0;
  private closed = false;
  private readonly unflushed = new UnflushedWrites();
  private current?: NbdExport;
  private resolving?: Promise<NbdExport>;
  /** What the last backend said, kept while a new one is found. */
  private last = { sizeBytes: 0, readOnly: false, preferredBlockBytes: 4096, local: false };

  constructor(
    readonly name: string,
    /** Where the volume is served now: a backend to send requests to, and whether it is this node's own store. */
    private readonly find: () => Promise<{ backend: NbdExport; local: boolean }>,
    private readonly options: RouteOptions,
    private readonly onIdle: (route: RoutedVolume) => void,
  ) {}

  retain(): void {
    this.users++;
  }

  /** Resolves once the volume is served somewhere. */
  async ready(): Promise<void> {
    await this.call('open', async () => undefined, undefined, Math.min(this.options.retryMs, openDeadlineMs));
  }

  /** The serving node's size now (the volume grew while attached), for a relayed backend; the store's own is always current. */
  async refreshSize(): Promise<number> {
    const backend = await this.call('size', async (b) => b);
    if (backend instanceof RelayExport) await backend.refreshSize();
    return this.sizeBytes;
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
    // The changes kept for a replay go with the route: make them durable first.
    if (this.unflushed.count > 0) {
      await this.flush().catch((err) =>
        this.options.log.warn('a closing route could not flush what it was keeping', { volume: this.name, error: (err as Error).message }),
      );
    }
    if (this.users > 0) return; // opened again meanwhile
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
    // A client's last FLUSH may come after its connection closed the route, which flushed then.
    if (this.closed && this.unflushed.count === 0) return;
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
        if (backend && this.current === backend) {
          this.options.log.warn("the volume's server went away; routing its requests again", {
            volume: this.name,
            request: what,
            error: (err as Error).message,
          });
        }
        if (backend) this.drop(backend);
        if (Date.now() + delay > deadline) throw err;
        await sleep(delay);
      }
    }
  }

  private backend(): Promise<NbdExport> {
    if (this.current) return Promise.resolve(this.current);
    this.resolving ??= this.resolve().finally(() => (this.resolving = undefined));
    return this.resolving;
  }

  /** A backend where the volume is served now, given what the last one acknowledged and may have lost. */
  private async resolve(): Promise<NbdExport> {
    const { backend, local } = await this.find();
    this.last.local = local;
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

/**
 * The route every client on this host shares for `name`: the one in `routes`, or a
 * new one from `create`. The caller's use is counted, and the route is served
 * somewhere once this resolves (a failure undoes the count).
 */
export async function openRoute(routes: Map<string, RoutedVolume>, name: string, create: () => RoutedVolume): Promise<RoutedVolume> {
  let route = routes.get(name);
  if (!route) {
    route = create();
    routes.set(name, route);
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
