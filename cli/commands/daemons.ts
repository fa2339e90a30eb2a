import { once } from 'node:events';
import { formatRef } from '../../store/names';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { identityService } from '../../csi/identity';
import { nodeTopologyKey } from '../../csi/proto';
import { CsiServices, startCsiServer } from '../../csi/server';
import { groupControllerService } from '../../controller/group';
import { controllerService } from '../../controller/service';
import { snapshotMetadataService } from '../../controller/snapshot-metadata';
import { chooseAttacher, realHostProbe } from '../../node-plugin/attach';
import { defaultDeadConnectionTimeoutSeconds } from '../../node-plugin/attach/kernel';
import { hostCommands } from '../../node-plugin/host/commands';
import { NbdServer } from '../../node-plugin/nbd/server';
import { TlsFiles, TlsIdentity } from '../../node-plugin/nbd/tls-identity';
import { NodeService, nodeService, storeVolumes } from '../../node-plugin/service';
import { StoreExports } from '../../node-plugin/store-exports';
import { moveFromHere, parseMoveRequest } from '../move-request';
import { defaultRelayConnections, defaultRelayRequestTimeoutMs } from '../../node-plugin/relay/relay-export';
import { RelayExports } from '../../node-plugin/relay/relay-exports';
import { RoutedExports, RoutedExportsOptions } from '../../node-plugin/relay/routed-exports';
import { observeOnScrape, serveMetrics } from '../../lib/metrics';
import { parseDuration, UnitError } from '../../lib/units';
import { StoreApi } from '../../store/api';
import { isDistributed, openStore } from '../../store/open';
import { ArborError } from '../../store/errors';
import { defaultOwnerLeaseTtlMs } from '../../store/limits';
import { AdminClient } from '../admin/client';
import { AdminServer } from '../admin/server';
import { CommandSpec, OptionSpec, UsageError } from '../args';
import { CliContext } from '../context';
import { adminSocketPath } from '../session';
import { firstRunSockets, printSummary } from '../first-run';
import { serverStatus } from '../status';

const defaultGcInterval = '10m';
const defaultMaxVolumes = 256;

const storeOwnerOptions: Record<string, OptionSpec> = {
  'gc-interval': { type: 'string', value: 'DURATION', description: `how often the collector runs, e.g. 30s or 1h (default ${defaultGcInterval})` },
  'nbd-socket': { type: 'string', value: 'PATH', description: 'serve every volume (NAME) and snapshot (NAME@SNAP) over NBD on this unix socket (mode 0600)' },
  'nbd-listen': {
    type: 'string',
    value: 'HOST:PORT',
    description: 'also serve NBD over TCP; anything but loopback requires --tls-cert, --tls-key and --tls-ca',
  },
  'nbd-advertise': {
    type: 'string',
    value: 'HOST:PORT',
    description:
      "with etcd and S3: where other nodes reach this node's --nbd-listen; they relay to it the volumes it owns, and it relays to them theirs, so every node can attach every volume",
  },
  'admin-listen': {
    type: 'string',
    value: 'HOST:PORT',
    description: 'answer node plugins without the data (`arbor node --relay-to`) over TCP with mutual TLS: registering, looking volumes up',
  },
  ...tlsFileOptions(),
};

/** What a node plugin without the data may ask of the data node's admin API. */
const relayNodeAdminMethods = ['registerNode', 'findVolume', 'healthy'] as const;

const relayOptions: Record<string, OptionSpec> = {
  'relay-to': {
    type: 'string',
    value: 'HOST:PORT',
    description: "hold no data: serve every volume by relaying NBD to the data node's --nbd-listen at HOST:PORT (mutual TLS; needs --relay-admin and --tls-*)",
  },
  'relay-admin': { type: 'string', value: 'HOST:PORT', description: "the data node's --admin-listen, where this node registers and looks volumes up" },
};

function tlsFileOptions(): Record<string, OptionSpec> {
  return {
    'tls-cert': {
      type: 'string',
      value: 'FILE',
      description: "this node's PEM certificate for NBD over TCP (clients must use STARTTLS), also its client certificate to other nodes",
    },
    'tls-key': { type: 'string', value: 'FILE', description: 'PEM private key for --tls-cert' },
    'tls-ca': {
      type: 'string',
      value: 'FILE',
      description: 'the cluster CA (PEM): NBD over TCP then requires client certificates it signed (mutual TLS); files are read again when they change',
    },
  };
}

const defaultDeadConnectionTimeout = `${defaultDeadConnectionTimeoutSeconds}s`;

const nodeOptions: Record<string, OptionSpec> = {
  'state-dir': { type: 'string', value: 'DIR', description: 'where the node keeps what it staged (default: <data-dir>/node)' },
  'dead-connection-timeout': {
    type: 'string',
    value: 'DURATION',
    description: `how long a kernel NBD device's I/O waits for this plugin to come back (a restart) before it fails (default ${defaultDeadConnectionTimeout})`,
  },
  'max-volumes': { type: 'string', value: 'N', description: `volumes this node may hold staged at once (default ${defaultMaxVolumes})` },
};

const metricsOption: Record<string, OptionSpec> = {
  'metrics-listen': { type: 'string', value: 'HOST:PORT', description: 'serve Prometheus metrics at GET /metrics on this address (e.g. 0.0.0.0:9820)' },
};

/** Starts the metrics endpoint when --metrics-listen asks for it; returns its stop. */
async function startMetrics(ctx: CliContext, listen: string | boolean | undefined): Promise<(() => Promise<void>) | undefined> {
  if (listen === undefined) return undefined;
  const { host, port } = parseListen(String(listen), '--metrics-listen', '0.0.0.0:9820');
  const server = await serveMetrics(host, port).catch((err: Error) => {
    throw new ArborError('unavailable', `--metrics-listen ${String(listen)}: cannot listen (${err.message}); choose another address`);
  });
  ctx.log.info('metrics served', { address: server.address, path: '/metrics' });
  return () => server.close();
}

/** The store's contents as gauges, read at scrape time by the process that holds it. */
function observeStore(store: StoreApi): void {
  observeOnScrape('arbor_volumes', 'Volumes in the store', async () => (await store.listVolumes()).length);
  observeOnScrape('arbor_snapshots', 'Snapshots in the store', async () => (await store.listSnapshots()).length);
  observeOnScrape('arbor_store_available_bytes', 'Free space where the store keeps its blobs', () => store.availableBytes());
}

const csiEndpoint = (requiredHere: boolean): OptionSpec => ({
  type: 'string',
  value: 'unix:///PATH',
  required: requiredHere,
  description: 'serve CSI over gRPC on this unix socket',
});

interface Roles {
  controller: boolean;
  node: boolean;
}

/** Store owners (serve, node): open the data directory, serve NBD and the admin socket, and the CSI roles asked for. */
async function runStoreOwner(ctx: CliContext, values: Record<string, string | boolean | undefined>, roles: Roles, nodeId: string): Promise<void> {
  let gcIntervalMs: number;
  try {
    gcIntervalMs = parseDuration(String(values['gc-interval'] ?? defaultGcInterval), '--gc-interval');
  } catch (err) {
    if (err instanceof UnitError) throw new UsageError(err.message);
    throw err;
  }
  const tcp = values['nbd-listen'] === undefined ? undefined : parseListen(String(values['nbd-listen']));
  const tlsFiles = tlsOptions(values);
  if (tcp && !isLoopback(tcp.host) && !tlsFiles?.caFile) {
    throw new UsageError(
      `--nbd-listen ${tcp.host}:${tcp.port} is not loopback: NBD over the network needs mutual TLS; give --tls-cert, --tls-key and --tls-ca (the cluster CA)`,
    );
  }
  const adminListen = values['admin-listen'] === undefined ? undefined : parseListen(String(values['admin-listen']), '--admin-listen', '0.0.0.0:10810');
  if (adminListen && !tlsFiles?.caFile)
    throw new UsageError('--admin-listen answers other nodes only over mutual TLS: give --tls-cert, --tls-key and --tls-ca');
  if (adminListen && isDistributed(ctx.location))
    throw new UsageError('--admin-listen is for an embedded data node; with etcd and S3 every node joins the store itself');
  const advertise = values['nbd-advertise'] === undefined ? undefined : parseListen(String(values['nbd-advertise']), '--nbd-advertise', '10.0.0.5:10809');
  if (advertise && !isDistributed(ctx.location)) throw new UsageError('--nbd-advertise is for etcd and S3; in embedded mode other nodes use --relay-to');
  if (advertise && (!tcp || !tlsFiles?.caFile)) {
    throw new UsageError('--nbd-advertise needs --nbd-listen and mutual TLS (--tls-cert, --tls-key, --tls-ca): other nodes relay to it');
  }
  const tlsIdentity = tlsFiles && new TlsIdentity(tlsFiles, ctx.log);
  // `arbor serve` naming no socket (`npm start`): NBD and CSI in the data directory.
  const firstRun = roles.controller ? firstRunSockets(ctx, values) : {};
  const nbdSocket = values['nbd-socket'] === undefined ? firstRun.nbdSocket : path.resolve(String(values['nbd-socket']));
  const endpoint = values['csi-endpoint'] === undefined ? firstRun.csiEndpoint : String(values['csi-endpoint']);
  const startedAt = Date.now();
  if (endpoint && roles.node && !nbdSocket) throw new UsageError('the CSI node service attaches volumes over NBD: give --nbd-socket too');
  const { deadConnectionTimeoutSeconds, maxVolumes } = nodeSettings(values);

  const distributed = isDistributed(ctx.location);
  const store = await openStore(ctx.location, { log: ctx.log, nodeId });
  await serveUntilSignal(ctx, [() => store.close()], 'stopped: every volume committed and the store closed', async (stops) => {
    store.collectPeriodically(gcIntervalMs);
    const storeExports = new StoreExports(store);
    const nbd = new NbdServer(
      advertise ? new RoutedExports(store, storeExports, routeOptions(store, tlsIdentity!, deadConnectionTimeoutSeconds, ctx)) : storeExports,
      ctx.log,
    );
    stops.push(() => nbd.close());
    if (nbdSocket) await nbd.listenUnix(nbdSocket);
    if (tcp) await nbd.listenTcp(tcp.host, tcp.port, tlsIdentity);
    if (!distributed) {
      // The CLI reaches an embedded store through the process that holds it; with etcd and S3 it joins the store itself.
      const admin = await AdminServer.listen(adminSocketPath(ctx.dataDir), store, { pid: process.pid, nbdSocket }, ctx.log);
      admin.handle('moveVolume', ([request]) => moveFromHere(store, storeExports, parseMoveRequest(request), ctx.log));
      const facts = { startedAt, dataDir: ctx.dataDir, adminSocket: adminSocketPath(ctx.dataDir), nbdSocket, csiEndpoint: endpoint, nodeId, gcIntervalMs };
      admin.handle('serverStatus', async () => serverStatus(store, nbd, facts));
      stops.push(() => admin.close());
      if (adminListen) {
        const port = await admin.listenTls(adminListen.host, adminListen.port, tlsIdentity!, relayNodeAdminMethods);
        ctx.log.info('admin API listening for other nodes', { host: adminListen.host, port, methods: relayNodeAdminMethods });
      }
    }
    const topology = { [nodeTopologyKey]: nodeId };
    if (endpoint) {
      const localServer = { socketPath: nbdSocket!, connectLocal: (onread: net.OnReadOpts) => nbd.connectLocal(onread) };
      const node = roles.node
        ? nodeService({
            nodeId,
            nbdSocket: localServer.socketPath,
            stateDir: nodeStateDir(ctx, values),
            topology,
            maxVolumesPerNode: maxVolumes,
            attacher: () => chooseAttacher(realHostProbe, hostCommands, { localServer, deadConnectionTimeoutSeconds, log: ctx.log }),
            volumes: storeVolumes(store),
            log: ctx.log,
          })
        : undefined;
      // Before the NBD server stops: the kernel's devices are to wait for the next process.
      if (node) stops.push(() => node.handOver());
      await store.registerNode(nodeId, { topology, ...(advertise && { nbdAddress: `${formatHost(advertise.host)}:${advertise.port}` }) });
      const csi = await startCsiServer(endpoint, csiServices(store, roles, topology, node), ctx.log);
      stops.push(() => csi.stop());
      // Probe answers ready only once the devices an earlier process attached have their connections again.
      await node?.start();
    }
    observeStore(store);
    const stopMetrics = await startMetrics(ctx, values['metrics-listen']);
    if (stopMetrics) stops.push(stopMetrics);
    // The first stop (they run in reverse): from SIGTERM on, no wait on etcd outlives the store's close budget, the flushes draining included.
    stops.push(async () => store.stopping());
    ctx.log.info('arbor serving', {
      ...(distributed ? { store: ctx.location.storeUrl, blobs: ctx.location.blobsUrl } : { dataDir: ctx.dataDir, adminSocket: adminSocketPath(ctx.dataDir) }),
      pid: process.pid,
      gcIntervalMs,
      nbdSocket,
      csiEndpoint: endpoint,
      nodeId,
      roles,
    });
    printSummary(ctx, { nbdSocket, csiEndpoint: endpoint, nodeId });
    return () => nbd.connectionCount;
  });
}

function csiServices(store: StoreApi, roles: Roles, topology: Record<string, string>, node: NodeService | undefined): CsiServices {
  return {
    Identity: identityService({
      controller: roles.controller,
      snapshotMetadata: roles.controller,
      ready: async () => (node ? node.ready() : true) && (await store.healthy()),
    }),
    Controller: roles.controller ? controllerService({ store, topology }) : undefined,
    GroupController: roles.controller ? groupControllerService(store) : undefined,
    SnapshotMetadata: roles.controller ? snapshotMetadataService(store) : undefined,
    Node: node?.handlers,
  };
}

/** Where another node is reached: what it registered with --nbd-advertise. */
function routeOptions(store: StoreApi, identity: TlsIdentity, deadConnectionTimeoutSeconds: number, ctx: CliContext): RoutedExportsOptions {
  return {
    async targetOf(nodeId) {
      const address = (await store.findNode(nodeId))?.nbdAddress;
      if (!address) return undefined;
      const { host, port } = parseListen(address, `node ${nodeId}'s NBD address`);
      return { host, port, identity };
    },
    connections: defaultRelayConnections,
    retryMs: deadConnectionTimeoutSeconds * 1000,
    // Past its lease an owner that stopped answering has lost the volume: then the request is routed again, to whoever has it now.
    requestTimeoutMs: Math.max(2 * (ctx.location.leaseTtlMs ?? defaultOwnerLeaseTtlMs), 5_000),
    log: ctx.log,
  };
}

function formatHost(host: string): string {
  return host.includes(':') ? `[${host}]` : host;
}

/** The node plugin's settings, checked before anything starts. */
function nodeSettings(values: Record<string, string | boolean | undefined>): { deadConnectionTimeoutSeconds: number; maxVolumes: number } {
  let deadConnectionTimeoutSeconds: number;
  try {
    deadConnectionTimeoutSeconds = Math.ceil(
      parseDuration(String(values['dead-connection-timeout'] ?? defaultDeadConnectionTimeout), '--dead-connection-timeout') / 1000,
    );
  } catch (err) {
    if (err instanceof UnitError) throw new UsageError(err.message);
    throw err;
  }
  const maxVolumes = Number(values['max-volumes'] ?? defaultMaxVolumes);
  if (!Number.isInteger(maxVolumes) || maxVolumes < 1) throw new UsageError(`--max-volumes ${values['max-volumes']} is not a positive whole number`);
  return { deadConnectionTimeoutSeconds, maxVolumes };
}

/**
 * A node plugin without the data (embedded mode, every node but the data node): it
 * serves every volume to this host's kernel by relaying NBD to the data node over
 * mutual TLS, and registers and looks volumes up through the data node's admin API.
 */
async function runRelayNode(ctx: CliContext, values: Record<string, string | boolean | undefined>, nodeId: string): Promise<void> {
  const target = parseListen(String(values['relay-to']), '--relay-to', 'arbor-data.arbor.svc:10809');
  if (values['relay-admin'] === undefined) throw new UsageError("--relay-to needs --relay-admin: the data node's --admin-listen address");
  const admin = parseListen(String(values['relay-admin']), '--relay-admin', 'arbor-data.arbor.svc:10810');
  const tlsFiles = tlsOptions(values);
  if (!tlsFiles?.caFile) throw new UsageError('--relay-to reaches the data node over mutual TLS: give --tls-cert, --tls-key and --tls-ca');
  for (const option of ['nbd-listen', 'admin-listen', 'store', 'blobs'])
    if (values[option] !== undefined) throw new UsageError(`--relay-to holds no data and serves no other node: --${option} does not go with it`);
  const { deadConnectionTimeoutSeconds, maxVolumes } = nodeSettings(values);
  const nbdSocket = path.resolve(String(values['nbd-socket'] ?? ''));
  if (values['nbd-socket'] === undefined) throw new UsageError('the CSI node service attaches volumes over NBD: give --nbd-socket too');
  const identity = new TlsIdentity(tlsFiles, ctx.log);
  const dataNode = new DataNodeAdmin(admin.host, admin.port, identity);
  const relays = new RelayExports(
    { host: target.host, port: target.port, identity },
    { connections: defaultRelayConnections, retryMs: deadConnectionTimeoutSeconds * 1000, requestTimeoutMs: defaultRelayRequestTimeoutMs, log: ctx.log },
  );
  await serveUntilSignal(ctx, [async () => dataNode.close()], 'stopped', async (stops) => {
    const nbd = new NbdServer(relays, ctx.log);
    stops.push(() => nbd.close());
    await nbd.listenUnix(nbdSocket);
    const topology = { [nodeTopologyKey]: nodeId };
    const localServer = { socketPath: nbdSocket, connectLocal: (onread: net.OnReadOpts) => nbd.connectLocal(onread) };
    const node = nodeService({
      nodeId,
      nbdSocket,
      stateDir: nodeStateDir(ctx, values),
      topology,
      maxVolumesPerNode: maxVolumes,
      attacher: () => chooseAttacher(realHostProbe, hostCommands, { localServer, deadConnectionTimeoutSeconds, log: ctx.log }),
      volumes: {
        exportNameOf: async (id) => {
          const volume = await dataNode.call((api) => api.findVolume({ id }));
          return volume && formatRef(volume.name);
        },
        sizeOf: (_id, exportName) => relays.sizeOf(exportName),
      },
      log: ctx.log,
    });
    stops.push(() => node.handOver());
    // The controller publishes only to nodes it knows: until the data node answers, this node is not ready.
    let registered = false;
    const register = async () => {
      await dataNode.call((api) => api.registerNode(nodeId, { topology }));
      registered = true;
      ctx.log.info('registered with the data node', { nodeId, admin: `${admin.host}:${admin.port}` });
    };
    const registering = retryInBackground(register, ctx, 'registering with the data node');
    stops.push(async () => registering.stop());
    const csi = await startCsiServer(
      String(values['csi-endpoint']),
      { Identity: identityService({ controller: false, ready: async () => registered && node.ready() }), Node: node.handlers },
      ctx.log,
    );
    stops.push(() => csi.stop());
    await node.start();
    const stopMetrics = await startMetrics(ctx, values['metrics-listen']);
    if (stopMetrics) stops.push(stopMetrics);
    ctx.log.info('arbor relay node serving', {
      pid: process.pid,
      nodeId,
      nbdSocket,
      relayTo: `${target.host}:${target.port}`,
      csiEndpoint: values['csi-endpoint'],
    });
    return () => nbd.connectionCount;
  });
}

type Stop = () => Promise<void>;

/**
 * Starts a daemon (`start` pushes onto `stops` what undoes each step), serves until
 * SIGTERM or SIGINT, then runs the stops in reverse order; a failed start runs them
 * too. `start` returns how many NBD connections are open, for the log.
 */
async function serveUntilSignal(ctx: CliContext, stops: Stop[], stoppedMessage: string, start: (stops: Stop[]) => Promise<() => number>): Promise<void> {
  const stopAll = async () => {
    for (const stop of stops.reverse()) await stop().catch((err) => ctx.log.error('stopping failed', { error: (err as Error).message }));
  };
  // Listening before anything starts: a SIGTERM sent as soon as 'serving' is logged (or while starting) stops cleanly.
  const signalled = untilSignal();
  try {
    const connections = await start(stops);
    const signal = await signalled.signal;
    ctx.log.info('stopping', { signal, nbdConnections: connections() });
  } catch (err) {
    signalled.cancel();
    await stopAll();
    throw err;
  }
  const stoppingAt = Date.now();
  await stopAll();
  ctx.log.info(stoppedMessage, { ms: Date.now() - stoppingAt });
}

/** Tries `attempt` every second until it succeeds or the process stops, logging each failure. */
function retryInBackground(attempt: () => Promise<void>, ctx: CliContext, what: string): { stop(): void } {
  let stopped = false;
  let timer: NodeJS.Timeout | undefined;
  const run = async () => {
    try {
      await attempt();
    } catch (err) {
      ctx.log.warn(`${what} failed; trying again in 1 s`, { error: (err as Error).message });
      if (!stopped) timer = setTimeout(() => void run(), 1_000);
    }
  };
  void run();
  return {
    stop: () => {
      stopped = true;
      clearTimeout(timer);
    },
  };
}

/** The data node's admin API over mutual TLS, connected on first use and again after it restarted. */
class DataNodeAdmin {
  private client?: Promise<AdminClient>;

  constructor(
    private readonly host: string,
    private readonly port: number,
    private readonly identity: TlsIdentity,
  ) {}

  async call<T>(request: (api: StoreApi) => Promise<T>): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      this.client ??= AdminClient.connectTls(this.host, this.port, this.identity);
      const current = this.client;
      try {
        return await request((await current).api);
      } catch (err) {
        if (!(err instanceof ArborError && err.code === 'unavailable') || attempt > 0) throw err;
        if (this.client === current) this.client = undefined;
      }
    }
  }

  close(): void {
    void this.client?.then((c) => c.close()).catch(() => {});
  }
}

function nodeStateDir(ctx: CliContext, values: Record<string, string | boolean | undefined>): string {
  return values['state-dir'] ? path.resolve(String(values['state-dir'])) : path.join(ctx.dataDir, 'node');
}

function untilSignal(): { signal: Promise<string>; cancel(): void } {
  // Signal listeners do not keep Node alive; this does, until we stop.
  const keepAlive = setInterval(() => {}, 1 << 30);
  const controller = new AbortController();
  const signal = Promise.race([
    once(process, 'SIGTERM', { signal: controller.signal }).then(() => 'SIGTERM'),
    once(process, 'SIGINT', { signal: controller.signal }).then(() => 'SIGINT'),
  ]).finally(() => {
    clearInterval(keepAlive);
    controller.abort();
  });
  return {
    signal,
    cancel: () => {
      signal.catch(() => {});
      clearInterval(keepAlive);
      controller.abort();
    },
  };
}

/**
 * The store as seen by a controller in its own process: the calls go to the
 * process that holds the data directory, over its admin socket, reconnecting when
 * that process restarts.
 */
function remoteStore(dataDir: string): { store: StoreApi; disconnect(): void } {
  let client: AdminClient | undefined;
  const call = async (method: string, args: unknown[]): Promise<unknown> => {
    for (let attempt = 0; ; attempt++) {
      client ??= await AdminClient.connect(adminSocketPath(dataDir));
      if (!client) throw new ArborError('unavailable', `no Arbor node holds ${dataDir}: start \`arbor node\` (or \`arbor serve\`) on it first`);
      try {
        return await (client.api as unknown as Record<string, (...a: unknown[]) => Promise<unknown>>)[method](...args);
      } catch (err) {
        if (!(err instanceof ArborError && err.code === 'unavailable') || attempt > 0) throw err;
        client = undefined;
      }
    }
  };
  return {
    store: new Proxy({} as StoreApi, {
      get:
        (_target, method: string) =>
        (...args: unknown[]) =>
          call(method, args),
    }),
    // The admin connection would keep the process alive after the CSI server stopped.
    disconnect: () => client?.close(),
  };
}

export const daemonCommands: CommandSpec<CliContext>[] = [
  {
    path: ['serve'],
    positionals: [],
    options: {
      ...storeOwnerOptions,
      ...metricsOption,
      'csi-endpoint': csiEndpoint(false),
      'node-id': { type: 'string', value: 'ID', description: "this node's id for CSI (default: the host name)" },
      ...nodeOptions,
    },
    summary:
      'Run Arbor on the embedded store (NBD, admin socket, and with --csi-endpoint the CSI Identity, Controller and Node services) until SIGTERM or SIGINT; naming no socket, NBD and CSI are served on nbd.sock and csi.sock in the data directory.',
    async run(ctx, { values }) {
      await runStoreOwner(ctx, values, { controller: true, node: true }, String(values['node-id'] ?? os.hostname()));
    },
  },
  {
    path: ['node'],
    positionals: [],
    options: {
      ...storeOwnerOptions,
      ...metricsOption,
      'node-id': { type: 'string', value: 'ID', required: true, description: "this node's id for CSI" },
      'csi-endpoint': csiEndpoint(true),
      ...nodeOptions,
      ...relayOptions,
    },
    summary:
      'Run the CSI Identity and Node services, holding the embedded store and serving its volumes over NBD; with --relay-to, holding no data and relaying every volume to the data node.',
    async run(ctx, { values }) {
      if (values['relay-to'] !== undefined) await runRelayNode(ctx, values, String(values['node-id']));
      else await runStoreOwner(ctx, values, { controller: false, node: true }, String(values['node-id']));
    },
  },
  {
    path: ['controller'],
    positionals: [],
    options: {
      'csi-endpoint': csiEndpoint(true),
      'node-id': { type: 'string', value: 'ID', description: 'the node that holds the embedded data directory (volumes are reachable there only)' },
      ...metricsOption,
    },
    summary:
      'Run the CSI Identity, Controller and GroupController services: on the store held by `arbor node` on the same data directory, or with --store and --blobs on etcd and S3.',
    async run(ctx, { values }) {
      const stopMetrics = await startMetrics(ctx, values['metrics-listen']);
      // Embedded: the store is held by `arbor node`; distributed: this process joins it.
      const joined = isDistributed(ctx.location)
        ? await openStore(ctx.location, { log: ctx.log, nodeId: `${os.hostname()}-controller-${process.pid}`, ephemeralCache: true })
        : undefined;
      const { store, disconnect } = joined ? { store: joined as StoreApi, disconnect: () => {} } : remoteStore(ctx.dataDir);
      const topology = values['node-id'] ? { [nodeTopologyKey]: String(values['node-id']) } : undefined;
      const csi = await startCsiServer(
        String(values['csi-endpoint']),
        {
          Identity: identityService({ controller: true, snapshotMetadata: true, ready: () => store.healthy() }),
          Controller: controllerService({ store, topology }),
          GroupController: groupControllerService(store),
          SnapshotMetadata: snapshotMetadataService(store),
        },
        ctx.log,
      );
      ctx.log.info('arbor controller serving', { dataDir: ctx.dataDir, pid: process.pid, csiEndpoint: values['csi-endpoint'] });
      const signal = await untilSignal().signal;
      ctx.log.info('stopping', { signal });
      await csi.stop();
      await stopMetrics?.();
      disconnect();
      await joined?.close();
      ctx.log.info('stopped');
    },
  },
];

function parseListen(text: string, option = '--nbd-listen', example = '127.0.0.1:10809'): { host: string; port: number } {
  const match = /^(\[[^\]]+\]|.+):(\d+)$/.exec(text);
  const port = match ? Number(match[2]) : NaN;
  if (!match || port > 65535) throw new UsageError(`${option} ${JSON.stringify(text)} is not HOST:PORT (e.g. ${example})`);
  return { host: match[1].replace(/^\[|\]$/g, ''), port };
}

function tlsOptions(values: Record<string, string | boolean | undefined>): TlsFiles | undefined {
  const [cert, key, ca] = [values['tls-cert'], values['tls-key'], values['tls-ca']];
  if (cert === undefined && key === undefined && ca === undefined) return undefined;
  if (cert === undefined || key === undefined) throw new UsageError('--tls-cert and --tls-key go together (and --tls-ca needs both)');
  return { certFile: path.resolve(String(cert)), keyFile: path.resolve(String(key)), caFile: ca === undefined ? undefined : path.resolve(String(ca)) };
}

function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\./.test(host);
}
