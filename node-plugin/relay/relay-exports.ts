import { ArborError } from '../../store/errors';
import { NbdClient } from '../nbd/client';
import { ExportProvider, ExportSummary, NbdExport } from '../nbd/export';
import { RelayExport, RelayOptions, RelayTarget } from './relay-export';

/**
 * Every export of another node, relayed: what a node without the data serves (in
 * embedded mode, every node but the data node). One relay per export, shared by every
 * local connection to it; it goes when the last one closes.
 */
export class RelayExports implements ExportProvider {
  private readonly open_ = new Map<string, Promise<RelayExport | undefined>>();

  constructor(
    private readonly target: RelayTarget,
    private readonly options: RelayOptions,
  ) {}

  async open(name: string): Promise<NbdExport | undefined> {
    for (;;) {
      let opening = this.open_.get(name);
      if (!opening) {
        opening = RelayExport.open(name, this.target, this.options, () => this.forget(name, opening!));
        this.open_.set(name, opening);
        void opening.then(
          (relay) => relay ?? this.forget(name, opening!),
          () => this.forget(name, opening!),
        );
      }
      const relay = await opening;
      // A relay whose last user closed it while this open waited is gone: open another.
      if (relay === undefined || this.open_.get(name) === opening) return relay?.retain();
    }
  }

  async list(): Promise<ExportSummary[]> {
    try {
      return await NbdClient.list({ host: this.target.host, port: this.target.port, tls: this.target.identity.clientOptions() });
    } catch (err) {
      throw new ArborError('unavailable', `cannot list the exports of ${this.target.host}:${this.target.port}: ${(err as Error).message}`);
    }
  }

  /** The export's size on the serving node now; the open relay, if any, learns it too (so writes past the old end are accepted). */
  async sizeOf(name: string): Promise<number | undefined> {
    const relay = (await this.open(name)) as RelayExport | undefined;
    if (!relay) return undefined;
    try {
      return await relay.refreshSize();
    } finally {
      await relay.close();
    }
  }

  private forget(name: string, opening: Promise<RelayExport | undefined>): void {
    if (this.open_.get(name) === opening) this.open_.delete(name);
  }
}
