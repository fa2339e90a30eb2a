import { Log } from '../../lib/logger';
import { ArborError, isArborError } from '../../store/errors';
import { NbdClient } from '../nbd/client';
import { ExportProvider, ExportSummary, NbdExport } from '../nbd/export';
import { RelayExport, TcpRelayTarget } from './relay-export';
import { openRoute, RoutedVolume } from './routed-volume';

export interface RelayExportsOptions {
  /** Connections to the data node per export. */
  connections: number;
  /** How long a request waits for the data node to come back (a restart) before it fails. */
  retryMs: number;
  /** A request not answered in this long is sent again on a fresh connection (a data node gone without closing it). */
  requestTimeoutMs: number;
  log: Log;
}

/**
 * Every export of the data node, relayed: what a node without the data serves (in
 * embedded mode, every node but the data node). One route per export, shared by
 * every local connection to it; it goes when the last one closes. The route keeps
 * what the data node acknowledged and never flushed, and sends it again first when
 * it reconnects, so a data node that crashed loses nothing its relays acknowledged.
 */
export class RelayExports implements ExportProvider {
  private readonly routes = new Map<string, RoutedVolume>();

  constructor(
    private readonly target: TcpRelayTarget,
    private readonly options: RelayExportsOptions,
  ) {}

  async open(name: string): Promise<NbdExport | undefined> {
    try {
      return await openRoute(this.routes, name, () => {
        const created: RoutedVolume = new RoutedVolume(
          name,
          () => this.connect(name),
          this.options,
          () => {
            if (this.routes.get(name) === created) this.routes.delete(name);
          },
        );
        return created;
      });
    } catch (err) {
      if (isArborError(err, 'not-found')) return undefined;
      throw err;
    }
  }

  async list(): Promise<ExportSummary[]> {
    try {
      return await NbdClient.list({ host: this.target.host, port: this.target.port, tls: this.target.identity.clientOptions() });
    } catch (err) {
      throw new ArborError('unavailable', `cannot list the exports of ${this.target.host}:${this.target.port}: ${(err as Error).message}`);
    }
  }

  /** The export's size on the data node now; the open route, if any, learns it too (so writes past the old end are accepted). */
  async sizeOf(name: string): Promise<number | undefined> {
    const route = (await this.open(name)) as RoutedVolume | undefined;
    if (!route) return undefined;
    try {
      return await route.refreshSize();
    } finally {
      await route.close();
    }
  }

  private async connect(name: string): Promise<{ backend: NbdExport; local: boolean }> {
    const relay = await RelayExport.open(name, this.target, {
      connections: this.options.connections,
      requestTimeoutMs: this.options.requestTimeoutMs,
      log: this.options.log,
    });
    if (!relay) throw new ArborError('not-found', `the data node ${this.target.host}:${this.target.port} has no export ${name}`);
    return { backend: relay, local: false };
  }
}
