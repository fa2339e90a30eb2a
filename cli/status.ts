/**
 * `arbor status`: what a running server holds (open volumes, NBD connections, data
 * not yet committed, the last commit and the last gc), asked of the server itself
 * over its admin socket (`serverStatus`), since only it knows.
 */
import { formatSize } from '../lib/units';
import { NbdServer } from '../node-plugin/nbd/server';
import { ArborError } from '../store/errors';
import { isDistributed } from '../store/open';
import { Store } from '../store/store';
import { AdminClient } from './admin/client';
import { CommandSpec, UsageError } from './args';
import { CliContext } from './context';
import { json, table } from './output';
import { adminSocketPath } from './session';

export interface VolumeStatus {
  name: string;
  id: string;
  /** NBD connections to the volume itself (not its snapshots). */
  nbdConnections: number;
  /** Extents written since the last commit, and their bytes (whole extents). */
  uncommittedExtents: number;
  uncommittedBytes: number;
  /** Map nodes changed since the last commit. */
  uncommittedMapNodes: number;
  /** How long the oldest uncommitted change has waited; absent when everything is committed. */
  uncommittedForMs?: number;
  /** When this server last committed the volume (ISO time); absent if not since it opened it. */
  lastCommitAt?: string;
}

export interface ServerStatus {
  pid: number;
  startedAt: string;
  dataDir: string;
  adminSocket: string;
  nbdSocket?: string;
  csiEndpoint?: string;
  nodeId: string;
  gcIntervalMs: number;
  nbdConnections: number;
  /** Every NBD connection by the export it chose (NAME or NAME@SNAP). */
  nbdConnectionsByExport: Record<string, number>;
  volumes: VolumeStatus[];
  /** The last garbage collection this server completed, if any. */
  lastGc?: { endedAt: string; freedBlobs: number; scannedBlobs: number; reachableBlobs: number; durationMs: number };
}

/** What the server knows of itself, beside the store. */
export interface ServerFacts {
  startedAt: number;
  dataDir: string;
  adminSocket: string;
  nbdSocket?: string;
  csiEndpoint?: string;
  nodeId: string;
  gcIntervalMs: number;
}

/** The server's answer to `serverStatus`, read from where each number lives. */
export function serverStatus(store: Store, nbd: NbdServer, facts: ServerFacts): ServerStatus {
  const byExport = nbd.connectionsByExport();
  const iso = (ms: number | undefined) => (ms === undefined ? undefined : new Date(ms).toISOString());
  const volumes = store
    .openVolumeStatus()
    .map((v) => ({
      name: v.name,
      id: v.id,
      nbdConnections: byExport.get(v.name) ?? 0,
      uncommittedExtents: v.extents,
      uncommittedBytes: v.bytes,
      uncommittedMapNodes: v.mapNodes,
      uncommittedForMs: v.forMs,
      lastCommitAt: iso(v.lastCommitAt),
    }))
    .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const gc = store.lastCollection;
  return {
    pid: process.pid,
    startedAt: new Date(facts.startedAt).toISOString(),
    dataDir: facts.dataDir,
    adminSocket: facts.adminSocket,
    nbdSocket: facts.nbdSocket,
    csiEndpoint: facts.csiEndpoint,
    nodeId: facts.nodeId,
    gcIntervalMs: facts.gcIntervalMs,
    nbdConnections: nbd.connectionCount,
    nbdConnectionsByExport: Object.fromEntries(byExport),
    volumes,
    lastGc: gc && {
      endedAt: new Date(gc.endedAt).toISOString(),
      freedBlobs: gc.report.freedBlobs,
      scannedBlobs: gc.report.scannedBlobs,
      reachableBlobs: gc.report.reachableBlobs,
      durationMs: gc.report.durationMs,
    },
  };
}

/** "3 s ago", "4 min ago", "2 h ago". */
function ago(iso: string, now: number): string {
  const s = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (s < 120) return `${s} s ago`;
  if (s < 7200) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

function localTime(iso: string): string {
  return new Date(iso).toTimeString().slice(0, 8);
}

/** The status as a person reads it. */
export function formatStatus(status: ServerStatus, now = Date.now()): string {
  const lines = [
    `Arbor server (pid ${status.pid}, up since ${localTime(status.startedAt)}, ${ago(status.startedAt, now).replace(' ago', '')}) holds ${status.dataDir}`,
    `  NBD    ${status.nbdSocket ?? '(no unix socket)'}  ${status.nbdConnections} connection${status.nbdConnections === 1 ? '' : 's'}`,
    `  CSI    ${status.csiEndpoint ?? '(not served)'}${status.csiEndpoint ? `  node ${status.nodeId}` : ''}`,
    `  admin  ${status.adminSocket}`,
    `  gc     ${
      status.lastGc
        ? `last at ${localTime(status.lastGc.endedAt)} (${ago(status.lastGc.endedAt, now)}): freed ${status.lastGc.freedBlobs} of ${status.lastGc.scannedBlobs} blobs in ${status.lastGc.durationMs} ms`
        : 'not run since the server started'
    }; every ${Math.round(status.gcIntervalMs / 1000)} s`,
    '',
  ];
  if (status.volumes.length === 0) {
    lines.push('No volume open.');
    return lines.join('\n') + '\n';
  }
  const rows = status.volumes.map((v) => [
    v.name,
    String(v.nbdConnections),
    v.uncommittedExtents === 0 && v.uncommittedMapNodes === 0
      ? 'none'
      : `${formatSize(v.uncommittedBytes)} in ${v.uncommittedExtents} extent${v.uncommittedExtents === 1 ? '' : 's'}${v.uncommittedForMs === undefined ? '' : `, for ${Math.round(v.uncommittedForMs)} ms`}`,
    v.lastCommitAt ? `${localTime(v.lastCommitAt)} (${ago(v.lastCommitAt, now)})` : 'not since opened',
  ]);
  return lines.join('\n') + '\n' + table(['OPEN VOLUME', 'CONNECTIONS', 'UNCOMMITTED', 'LAST COMMIT'], rows);
}

export const statusCommands: CommandSpec<CliContext>[] = [
  {
    path: ['status'],
    positionals: [],
    options: { json: { type: 'boolean', description: 'print the status as JSON' } },
    summary: 'Show what the running server holds: open volumes, NBD connections, data not yet committed, the last commit and the last gc.',
    async run(ctx, { values }) {
      if (isDistributed(ctx.location)) {
        throw new UsageError('arbor status asks the server holding an embedded data directory (--data-dir); with etcd and S3 each node holds its own volumes');
      }
      const socket = adminSocketPath(ctx.dataDir);
      const admin = await AdminClient.connect(socket);
      if (!admin) {
        throw new ArborError(
          'unavailable',
          `no Arbor server is running on ${ctx.dataDir} (nothing answers on ${socket}); start one with \`arbor --data-dir ${ctx.dataDir} serve\` (or \`npm start\` for ./arbor-data)`,
        );
      }
      try {
        const status = await admin.serverStatus();
        ctx.stdout.write(values.json ? json(status) : formatStatus(status));
      } finally {
        admin.close();
      }
    },
  },
];
