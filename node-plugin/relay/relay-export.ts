import { Log } from '../../lib/logger';
import { ArborError, ErrorCode } from '../../store/errors';
import { RangeStatus } from '../../store/tree';
import { NbdClient, NbdError, NbdOptionError } from '../nbd/client';
import { NbdExport } from '../nbd/export';
import { CMD_FLAG, NBD_EINVAL, NBD_ENOSPC, NBD_ENOTSUP, NBD_EPERM, NBD_ESHUTDOWN, REP, TFLAG } from '../nbd/protocol';
import { TlsIdentity } from '../nbd/tls-identity';

/** Another node's NBD server, reached over TCP with mutual TLS; or (a volume moved to another store on this host) a server's unix socket. */
export type RelayTarget = TcpRelayTarget | { socketPath: string };
export interface TcpRelayTarget {
  host: string;
  port: number;
  identity: TlsIdentity;
}

function describeTarget(target: RelayTarget): string {
  return 'socketPath' in target ? target.socketPath : `${target.host}:${target.port}`;
}

export interface RelayOptions {
  /** Connections to the serving node per export: its requests are spread over them. */
  connections: number;
  /**
   * A request the serving node has not answered in this long is sent again on a fresh
   * connection: a node that died without closing its connections (a power cut, a
   * partition) or that is paused must not hold requests for ever.
   */
  requestTimeoutMs?: number;
  log: Log;
}

export const defaultRelayConnections = 2;
/** See RelayOptions.requestTimeoutMs: the data node (embedded mode) answers well within this unless it is gone. */
export const defaultRelayRequestTimeoutMs = 30_000;

/**
 * An export served by another node, relayed: every request this node's NBD server
 * receives for it is sent on to the serving node, and its reply sent back. The
 * kernel's NBD client cannot speak TLS, so the kernel attaches to this node's unix
 * socket and this relay carries the requests over TCP with mutual TLS.
 *
 * A request whose connection broke, that the serving node refused because it is
 * stopping (ESHUTDOWN), or that it did not answer in time fails with `unavailable`
 * and drops its connection: the route above it (`RoutedVolume`) sends it again, on
 * a fresh connection or to wherever the volume is served now, so the serving node
 * going away is a reconnect, not an error. Sending a request again is what the
 * kernel itself does after a timeout: reads, writes, trims and zeroes of a range are
 * idempotent, and overlapping requests in flight have no order in NBD anyway.
 *
 * One relay serves one route (`RoutedVolume`), which every local connection to the
 * export shares; its connections to the serving node are shared by all of them. A FLUSH sent on
 * one of them covers the writes completed on all (the serving node offers
 * CAN_MULTI_CONN), so the relay offers the same.
 */
export class RelayExport implements NbdExport {
  private readonly clients: Array<Promise<NbdClient> | undefined>;
  private next = 0;
  private closed = false;
  private size: number;
  private readonly flags: number;
  private readonly blockBytes: number;

  private constructor(
    readonly name: string,
    private readonly target: RelayTarget,
    private readonly options: RelayOptions,
    first: NbdClient,
  ) {
    this.clients = new Array<Promise<NbdClient> | undefined>(Math.max(1, options.connections)).fill(undefined);
    this.clients[0] = Promise.resolve(first);
    this.size = first.sizeBytes;
    this.flags = first.transmissionFlags;
    this.blockBytes = first.blockSizes.preferred;
  }

  /** Connects to the export on the serving node; undefined when it has no such export. */
  static async open(name: string, target: RelayTarget, options: RelayOptions): Promise<RelayExport | undefined> {
    let first: NbdClient;
    try {
      first = await connectTo(target, name);
    } catch (err) {
      if (err instanceof NbdOptionError && err.replyType === REP.ERR_UNKNOWN) return undefined;
      throw unreachable(name, target, err);
    }
    return new RelayExport(name, target, options, first);
  }

  get description(): string {
    return `volume ${this.name}, relayed to ${this.where}`;
  }

  get sizeBytes(): number {
    return this.size;
  }

  get readOnly(): boolean {
    return (this.flags & TFLAG.READ_ONLY) !== 0;
  }

  get preferredBlockBytes(): number {
    return this.blockBytes;
  }

  async close(): Promise<void> {
    this.closed = true;
    await Promise.all(this.clients.map(async (pending) => (await pending?.catch(() => undefined))?.disconnect()));
  }

  /** Asks the serving node for the export's size now (it grew while attached): a fresh handshake. */
  async refreshSize(): Promise<number> {
    const probe = await this.call('size', () => connectTo(this.target, this.name));
    await probe.disconnect();
    this.size = Math.max(this.size, probe.sizeBytes);
    return this.size;
  }

  async readInto(offset: number, target: Buffer, targetOffset: number, length: number): Promise<void> {
    const data = await this.call('read', (c) => c.read(offset, length));
    data.copy(target, targetOffset);
  }

  write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    return this.call('write', (c) => c.write(offset, data, fua ? CMD_FLAG.FUA : 0));
  }

  flush(): Promise<void> {
    return this.call('flush', (c) => c.flush());
  }

  trim(offset: number, length: number): Promise<void> {
    return this.call('trim', (c) => c.trim(offset, length));
  }

  zero(offset: number, length: number, options: { noHole: boolean; fua: boolean; fast: boolean }): Promise<void> {
    if (options.fast && !(this.flags & TFLAG.SEND_FAST_ZERO)) {
      return Promise.reject(new ArborError('unsupported', `volume ${this.name}: ${this.where} does not zero fast`));
    }
    const flags = (options.noHole ? CMD_FLAG.NO_HOLE : 0) | (options.fua ? CMD_FLAG.FUA : 0) | (options.fast ? CMD_FLAG.FAST_ZERO : 0);
    return this.call('write-zeroes', (c) => c.zero(offset, length, flags));
  }

  async blockStatus(offset: number, length: number): Promise<RangeStatus[]> {
    // The serving node may describe less than was asked (a bounded reply): ask for the rest.
    const ranges: RangeStatus[] = [];
    for (let at = offset; at < offset + length;) {
      const part = await this.call('block-status', (c) => c.blockStatus(at, offset + length - at));
      if (part.length === 0) throw new ArborError('internal', `volume ${this.name}: ${this.where} described none of ${at}+${offset + length - at}`);
      for (const range of part) {
        const end = Math.min(range.offset + range.length, offset + length);
        if (end > at) ranges.push({ ...range, offset: at, length: end - at });
        at = Math.max(at, end);
      }
    }
    return ranges;
  }

  cache(offset: number, length: number): Promise<void> {
    return this.call('cache', (c) => c.cache(offset, length));
  }

  private get where(): string {
    return `its serving node ${describeTarget(this.target)}`;
  }

  /** Runs a request on one of the connections, sending it again on a fresh one while the serving node is away. */
  private async call<T>(what: string, request: (client: NbdClient) => Promise<T>): Promise<T> {
    if (this.closed) throw new ArborError('unavailable', `volume ${this.name}: the relay to ${this.where} is closed`);
    const slot = this.next++ % this.clients.length;
    let client: NbdClient | undefined;
    try {
      client = await this.connection(slot);
      return await this.answered(client, request(client), what);
    } catch (err) {
      if (err instanceof NbdError && err.errno !== NBD_ESHUTDOWN) throw errorFromServer(err, this.name, what);
      if (err instanceof NbdOptionError && err.replyType === REP.ERR_UNKNOWN) {
        throw new ArborError('not-found', `volume ${this.name}: ${this.where} no longer serves it (deleted?)`);
      }
      // The connection broke, or the serving node is stopping: the route sends the request again, on a fresh connection or elsewhere.
      if (client) this.forget(slot, client);
      else this.clients[slot] = undefined;
      throw new ArborError('unavailable', `volume ${this.name}: ${what} got no answer from ${this.where}: ${(err as Error).message}`);
    }
  }

  /** The request's answer, or (past the request timeout) the connection dropped and an error that sends the request again. */
  private answered<T>(client: NbdClient, answer: Promise<T>, what: string): Promise<T> {
    const limit = this.options.requestTimeoutMs;
    if (limit === undefined) return answer;
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<never>((_resolve, reject) => {
      timer = setTimeout(() => {
        // Every request on this connection fails with it and is sent again on a fresh one.
        client.destroy();
        reject(new Error(`${what}: no answer from ${this.where} within ${limit} ms`));
      }, limit);
    });
    return Promise.race([answer, late]).finally(() => clearTimeout(timer));
  }

  private connection(slot: number): Promise<NbdClient> {
    const current = this.clients[slot];
    if (current) return current;
    const connecting = connectTo(this.target, this.name).then((client) => {
      this.size = Math.max(this.size, client.sizeBytes);
      return client;
    });
    this.clients[slot] = connecting;
    return connecting;
  }

  private forget(slot: number, client: NbdClient): void {
    client.destroy();
    void this.clients[slot]?.then((current) => {
      if (current === client) this.clients[slot] = undefined;
    });
  }
}

function connectTo(target: RelayTarget, exportName: string): Promise<NbdClient> {
  if ('socketPath' in target) return NbdClient.connect({ socketPath: target.socketPath, exportName });
  return NbdClient.connect({ host: target.host, port: target.port, exportName, tls: target.identity.clientOptions() });
}

function unreachable(name: string, target: RelayTarget, err: unknown): ArborError {
  return new ArborError(
    'unavailable',
    'socketPath' in target
      ? `volume ${name}: cannot reach the NBD server at ${target.socketPath} (${(err as Error).message}); check that the server there runs`
      : `volume ${name}: cannot reach its serving node ${target.host}:${target.port} over NBD with TLS (${(err as Error).message}); check that node's plugin, the network between the nodes and the TLS certificates`,
  );
}

/** The serving node's refusal, as the error this node's server answers with: the same errno reaches the client. */
function errorFromServer(err: NbdError, name: string, what: string): ArborError {
  const codes: Record<number, ErrorCode> = {
    [NBD_EPERM]: 'read-only',
    [NBD_EINVAL]: 'invalid-argument',
    [NBD_ENOTSUP]: 'unsupported',
    [NBD_ENOSPC]: 'out-of-range',
  };
  return new ArborError(codes[err.errno] ?? 'internal', `volume ${name}: ${what} refused by its serving node: ${err.message}`);
}
