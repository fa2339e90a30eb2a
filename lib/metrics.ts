/**
 * Prometheus metrics, one registry per process, served at GET /metrics by
 * `--metrics-listen`. Each layer counts what it does here; values that live in the
 * store (volume counts, free space) are read when Prometheus scrapes, through
 * `observeOnScrape`, so nothing polls.
 *
 * Hot paths (NBD requests) add to plain numbers (`nbdTally`) that the counters copy
 * when Prometheus scrapes: prom-client hashes a series' labels on every inc(), even
 * through a bound child, one of the two largest JavaScript costs of a 4 KiB read.
 */
import http from 'node:http';
import { AddressInfo } from 'node:net';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

export const registry = new Registry();
collectDefaultMetrics({ register: registry, prefix: 'arbor_' });

/** Seconds: a CSI call is a catalog transaction or a mount (ms); staging may run mkfs (s). */
const callBuckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];
/** Seconds: a commit is an fsync or two and a catalog transaction. */
const commitBuckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5];

export const csiRequests = new Counter({
  name: 'arbor_csi_requests_total',
  help: 'CSI calls answered, by method and gRPC status code',
  labelNames: ['method', 'code'] as const,
  registers: [registry],
});

export const csiRequestSeconds = new Histogram({
  name: 'arbor_csi_request_duration_seconds',
  help: 'Time to answer a CSI call, by method',
  labelNames: ['method'] as const,
  buckets: callBuckets,
  registers: [registry],
});

export const nbdConnections = new Gauge({
  name: 'arbor_nbd_connections',
  help: 'Open NBD connections',
  registers: [registry],
});

export const nbdCommandNames = ['read', 'write', 'flush', 'trim', 'cache', 'write_zeroes', 'block_status'] as const;
export type NbdCommandName = (typeof nbdCommandNames)[number];

/** What the NBD server has done since the process started, counted on its hot path. */
export const nbdTally = {
  done: tallyPerCommand(),
  failed: tallyPerCommand(),
  readBytes: 0,
  writtenBytes: 0,
};

function tallyPerCommand(): Record<NbdCommandName, number> {
  return Object.fromEntries(nbdCommandNames.map((command) => [command, 0])) as Record<NbdCommandName, number>;
}

/** A counter labelled by NBD command whose values are copied from `counts` at each scrape. */
function counterPerCommand(name: string, help: string, counts: Record<NbdCommandName, number>): Counter {
  return new Counter({
    name,
    help,
    labelNames: ['command'] as const,
    registers: [registry],
    collect() {
      this.reset();
      for (const command of nbdCommandNames) this.inc({ command }, counts[command]);
    },
  });
}

counterPerCommand(
  'arbor_nbd_requests_total',
  'NBD requests completed, by command (read, write, flush, trim, write_zeroes, cache, block_status)',
  nbdTally.done,
);
counterPerCommand('arbor_nbd_request_errors_total', 'NBD requests answered with an error, by command', nbdTally.failed);

new Counter({
  name: 'arbor_nbd_bytes_total',
  help: 'Bytes moved by NBD reads and writes, by direction',
  labelNames: ['direction'] as const,
  registers: [registry],
  collect() {
    this.reset();
    this.inc({ direction: 'read' }, nbdTally.readBytes);
    this.inc({ direction: 'write' }, nbdTally.writtenBytes);
  },
});

/** Per volume served here: its QoS limits (absent while it has none) and the time its requests waited for them. */
export const qosMaxIops = new Gauge({
  name: 'arbor_volume_qos_max_iops',
  help: 'QoS limit of a volume served here, in requests per second (no series while unlimited)',
  labelNames: ['volume'] as const,
  registers: [registry],
});

export const qosMaxBandwidth = new Gauge({
  name: 'arbor_volume_qos_max_bandwidth_bytes',
  help: 'QoS limit of a volume served here, in bytes per second (no series while unlimited)',
  labelNames: ['volume'] as const,
  registers: [registry],
});

export const qosWaitSeconds = new Counter({
  name: 'arbor_volume_qos_wait_seconds_total',
  help: 'Time NBD requests to a volume spent waiting for its QoS limits, summed over requests',
  labelNames: ['volume'] as const,
  registers: [registry],
});

export const qosDelayedRequests = new Counter({
  name: 'arbor_volume_qos_delayed_requests_total',
  help: 'NBD requests to a volume that waited for its QoS limits',
  labelNames: ['volume'] as const,
  registers: [registry],
});

export const storeCommits = new Histogram({
  name: 'arbor_store_commit_duration_seconds',
  help: "Time from capturing a volume's changes to their catalog commit (flush, FUA, background commits)",
  buckets: commitBuckets,
  registers: [registry],
});

export const s3Requests = new Histogram({
  name: 'arbor_s3_request_duration_seconds',
  help: "Time of each HTTP request to the blob store's S3 endpoint (every try), by operation and HTTP status ('none': no answer)",
  labelNames: ['operation', 'status'] as const,
  buckets: callBuckets,
  registers: [registry],
});

/** Seconds: a device without a server waits for a plugin restart (seconds) or up to its dead-connection timeout. */
const stallBuckets = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300];

export const nbdDevicesReattached = new Counter({
  name: 'arbor_nbd_devices_reattached_total',
  help: 'Kernel NBD devices an earlier process attached that this one gave fresh connections at start',
  registers: [registry],
});

export const nbdDeviceReconnects = new Counter({
  name: 'arbor_nbd_device_reconnects_total',
  help: 'Connections given to live kernel NBD devices in place of dead ones (a restart, a connection the kernel or the server closed)',
  registers: [registry],
});

export const nbdDeviceStallSeconds = new Histogram({
  name: 'arbor_nbd_device_stall_seconds',
  help: 'How long a kernel NBD device had no connection to a server before it got one again (its I/O waited that long)',
  buckets: stallBuckets,
  registers: [registry],
});

export const nbdLongestStallSeconds = new Gauge({
  name: 'arbor_nbd_device_longest_stall_seconds',
  help: 'The longest a kernel NBD device of this node waited for a server, as this process saw it',
  registers: [registry],
});

/** Records one device stall in the histogram and the longest-stall gauge. */
export function observeDeviceStall(seconds: number): void {
  nbdDeviceStallSeconds.observe(seconds);
  if (seconds > (longestStall ?? 0)) {
    longestStall = seconds;
    nbdLongestStallSeconds.set(seconds);
  }
}
let longestStall: number | undefined;

export const gcRuns = new Counter({ name: 'arbor_gc_runs_total', help: 'Collector passes completed', registers: [registry] });
export const gcFreedBlobs = new Counter({ name: 'arbor_gc_freed_blobs_total', help: 'Blobs the collector freed', registers: [registry] });
export const gcLastSeconds = new Gauge({ name: 'arbor_gc_last_duration_seconds', help: 'Duration of the last collector pass', registers: [registry] });

/**
 * A gauge whose value is read when Prometheus scrapes: `read` returns the value, or
 * undefined to leave it out (the store is closed, the node holds no store).
 */
export function observeOnScrape(name: string, help: string, read: () => Promise<number | undefined>): Gauge {
  const existing = registry.getSingleMetric(name);
  if (existing) registry.removeSingleMetric(name);
  return new Gauge({
    name,
    help,
    registers: [registry],
    async collect() {
      const value = await read().catch(() => undefined);
      this.reset();
      if (value !== undefined) this.set(value);
    },
  });
}

export interface MetricsServer {
  /** host:port actually bound (port 0 picks one). */
  address: string;
  close(): Promise<void>;
}

/** Serves GET /metrics (Prometheus text format) on HOST:PORT; anything else is 404. */
export async function serveMetrics(host: string, port: number): Promise<MetricsServer> {
  const server = http.createServer((request, response) => {
    const url = new URL(request.url ?? '/', 'http://metrics');
    if (request.method !== 'GET' || url.pathname !== '/metrics') {
      response.writeHead(404, { 'content-type': 'text/plain' }).end('Arbor serves only GET /metrics here\n');
      return;
    }
    registry.metrics().then(
      (text) => response.writeHead(200, { 'content-type': registry.contentType }).end(text),
      (err: Error) => response.writeHead(500, { 'content-type': 'text/plain' }).end(`collecting metrics failed: ${err.message}\n`),
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  const bound = server.address() as AddressInfo;
  return {
    address: `${bound.family === 'IPv6' ? `[${bound.address}]` : bound.address}:${bound.port}`,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
