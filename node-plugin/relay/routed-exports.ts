import { ArborError } from '../../store/errors';
import { unquoteName } from '../../store/names';
import { OwnedElsewhere } from '../../store/ownership';
import { Store } from '../../store/store';
import { ExportClient, ExportProvider, ExportSummary, NbdExport } from '../nbd/export';
import { StoreExports } from '../store-exports';
import { RelayExport, RelayTarget } from './relay-export';
import { openRoute, RouteOptions, RoutedVolume } from './routed-volume';

export interface RoutedExportsOptions extends RouteOptions {
  /** Where a node's NBD server is reached (what it advertised); undefined when it advertised nothing. */
  targetOf(nodeId: string): Promise<RelayTarget | undefined>;
  /** Connections to an owner per relayed volume. */
  connections: number;
  /** A relayed request not answered in this long is routed again (an owner paused or cut off loses its lease meanwhile). */
  requestTimeoutMs: number;
}

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
    if (!(await this.findVolume(name))) return undefined;
    if (client?.remote) return this.openForRelay(name, client);
    return openRoute(
      this.routes,
      name,
      () =>
        new RoutedVolume(
          name,
          () => this.find(name),
          this.options,
          (idle) => this.routeIdle(name, idle),
        ),
    );
  }

  async exists(name: string): Promise<boolean> {
    if (!name.includes('@')) return (await this.findVolume(name)) !== undefined;
    const snapshot = await this.local.open(name);
    await snapshot?.close?.();
    return snapshot !== undefined;
  }

  /** The volume an export name (a quoted volume name, store/names.ts) denotes. */
  private async findVolume(exportName: string): Promise<unknown> {
    const name = unquoteName(exportName);
    return name === undefined ? undefined : this.store.findVolume({ name });
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

  /** Serves the volume from the store here when this node can own it, else relays it to its owner. */
  private async find(name: string): Promise<{ backend: NbdExport; local: boolean }> {
    try {
      const exp = await this.local.open(name);
      if (!exp) throw new ArborError('not-found', `volume ${name} does not exist any more`);
      return { backend: exp, local: true };
    } catch (err) {
      if (!(err instanceof OwnedElsewhere)) throw err;
      const target = await this.options.targetOf(err.owner.nodeId);
      if (!target) {
        throw new ArborError(
          'unavailable',
          `volume ${name} is served by node ${err.owner.nodeId}, which advertises no NBD address (--nbd-advertise) to relay to`,
        );
      }
      const relay = await RelayExport.open(name, target, {
        connections: this.options.connections,
        requestTimeoutMs: this.options.requestTimeoutMs,
        log: this.options.log,
      });
      if (!relay) throw new ArborError('unavailable', `volume ${name}: node ${err.owner.nodeId} does not serve it`);
      return { backend: relay, local: false };
    }
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
