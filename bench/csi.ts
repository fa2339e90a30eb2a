/**
 * npm run bench:csi — the CSI controller at scale, against `arbor serve` over its
 * real gRPC socket:
 *
 * - golden-image clones: the latency of CreateVolume from a snapshot (p50, p99) and
 *   clones per second, one at a time and 16 in flight; beside it, in the same run,
 *   `qemu-img create -b` making qcow2 overlays on a raw golden image (what a
 *   qcow2-based platform does per VM);
 * - the catalog at scale (issue 16): with BENCH_CATALOG_VOLUMES volumes and
 *   BENCH_CATALOG_SNAPSHOTS snapshots (BENCH_CATALOG_ONE_VOLUME of them of one
 *   volume), the time to page through every volume (ListVolumes), every snapshot
 *   (ListSnapshots) and the one volume's snapshots (ListSnapshots by
 *   source_volume_id), in pages of BENCH_PAGE; the cost of one page at a small
 *   catalog and at the large one; `arbor volume list` through the real CLI; and
 *   CreateSnapshot of one volume, BENCH_SNAPSHOTS times with 16 in flight.
 *
 * The catalog is built in process through the store's own calls (the same records
 * and keys CSI would write), with the SQLite catalog's commits unsynced so that
 * 100,000 objects take a minute or two rather than one fsync each; the server is
 * then started on it with synced commits, and everything measured goes through it.
 */
import { ChildProcess, execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { CsiClient, csiClient } from '../csi/client';
import { openDataDir } from '../store/embedded';
import { fmt, nowMs, percentile, printTable, timeEach, runBenchmark, stopServer } from './support';
import { cliPath as cli } from '../test/support/arbor-server';

const count = Number(process.env.BENCH_CLONES ?? 500);
const catalogVolumes = Number(process.env.BENCH_CATALOG_VOLUMES ?? 10_000);
const catalogSnapshots = Number(process.env.BENCH_CATALOG_SNAPSHOTS ?? 90_000);
const oneVolumeSnapshots = Math.min(catalogSnapshots, Number(process.env.BENCH_CATALOG_ONE_VOLUME ?? 10_000));
const pageSize = Number(process.env.BENCH_PAGE ?? 500);
const snapshotCount = Number(process.env.BENCH_SNAPSHOTS ?? 10_000);
/** The small catalog a page's cost is first measured at. */
const smallVolumes = 500;
const smallSnapshots = 500;
const smallOneVolume = 250;
/** The page measured for its cost: one of this many entries from the middle of the listing. */
const probePage = 100;

const targets = { listAllMs: 1000, cliMs: 1000, snapshotsPerSecond: 1000, pageCostRatio: 1.5 };

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'arbor-bench-csi-'));
  const socket = path.join(dir, 'csi.sock');
  const dataDir = path.join(dir, 'data');
  let server: ChildProcess | undefined;
  const results: string[][] = [];
  try {
    // Every snapshot the catalog holds, by id: a listing must return each exactly once.
    const snapshotIds = new Set<string>();
    // The small catalog, for the cost of one page before the catalog grows.
    let built = await buildCatalog(
      dataDir,
      { volumes: 0, snapshots: 0, oneVolume: 0 },
      { volumes: smallVolumes, snapshots: smallSnapshots, oneVolume: smallOneVolume },
      snapshotIds,
    );
    server = await startServer(dir, dataDir, socket);
    let csi = benchClient(socket);
    const smallCost = await pageCosts(csi, built.oneVolumeId);

    snapshotIds.add(await cloneBenchmark(dir, dataDir, csi));
    csi.close();
    await stopServer(server);

    const buildStarted = nowMs();
    built = await buildCatalog(dataDir, built.counts, { volumes: catalogVolumes, snapshots: catalogSnapshots, oneVolume: oneVolumeSnapshots }, snapshotIds);
    const buildSeconds = (nowMs() - buildStarted) / 1000;
    server = await startServer(dir, dataDir, socket);
    csi = benchClient(socket);
    const largeCost = await pageCosts(csi, built.oneVolumeId);
    const objects = built.counts.volumes + built.counts.snapshots + 2 + 2 * count;
    console.log(
      `\ncatalog: ${built.counts.volumes} volumes and ${built.counts.snapshots} snapshots (${built.counts.oneVolume} of one volume), built in process in ${fmt(buildSeconds, 1)} s`,
    );

    const volumes = await pageAll(csi, 'ListVolumes', {});
    const snapshots = await pageAll(csi, 'ListSnapshots', {});
    const filtered = await pageAll(csi, 'ListSnapshots', { source_volume_id: built.oneVolumeId });
    const check = (what: string, got: number, want: number) => {
      if (got !== want) throw new Error(`${what}: paging returned ${got} entries, the catalog holds ${want}`);
    };
    // Beside the catalog: the golden volume, its snapshot and its clones. Each id was seen once (pageAll).
    check('ListVolumes', volumes.entries, built.counts.volumes + 1 + 2 * count);
    check('ListSnapshots', snapshots.entries, built.counts.snapshots + 1);
    check('ListSnapshots by source_volume_id', filtered.entries, built.counts.oneVolume);
    for (const [what, listed] of [
      ['ListSnapshots', snapshots],
      ['ListSnapshots by source_volume_id', filtered],
    ] as const) {
      const stranger = [...listed.ids].find((id) => !snapshotIds.has(id));
      if (stranger !== undefined) throw new Error(`${what}: paging returned ${stranger}, which the catalog does not hold`);
    }
    if (snapshots.ids.size !== snapshotIds.size)
      throw new Error(`ListSnapshots: paging returned ${snapshots.ids.size} snapshots, the catalog holds ${snapshotIds.size}`);
    const strangerSource = [...filtered.sources].find((source) => source !== built.oneVolumeId);
    if (strangerSource !== undefined) throw new Error(`ListSnapshots by source_volume_id: paging returned a snapshot of ${strangerSource}`);
    const listRow = (what: string, r: { entries: number; pages: number; ms: number }) => [
      `${what}: ${r.entries} in ${r.pages} pages of ${pageSize}`,
      `< ${targets.listAllMs} ms`,
      `${fmt(r.ms)} ms`,
      verdict(r.ms < targets.listAllMs),
    ];
    results.push(listRow('page through ListVolumes', volumes), listRow('page through ListSnapshots', snapshots));
    results.push(listRow('page through ListSnapshots by source_volume_id', filtered));
    for (const what of ['ListVolumes', 'ListSnapshots', 'ListSnapshots by source_volume_id'] as const) {
      const ratio = largeCost[what] / smallCost[what];
      results.push([
        `one page of ${probePage} (${what}): ${fmt(smallCost[what])} ms at ${smallVolumes + smallSnapshots} objects, ${fmt(largeCost[what])} ms at ${objects}`,
        `ratio < ${targets.pageCostRatio}`,
        `${fmt(ratio)}x`,
        verdict(ratio < targets.pageCostRatio),
      ]);
    }

    const cliRuns = await timeEach(3, async () => {
      execFileSync(process.execPath, [cli, '--data-dir', dataDir, 'volume', 'list'], { stdio: ['ignore', 'ignore', 'inherit'], maxBuffer: 1 << 30 });
    });
    const cliMs = percentile(cliRuns, 50);
    results.push([`arbor volume list (${volumes.entries} volumes, median of 3)`, `< ${targets.cliMs} ms`, `${fmt(cliMs)} ms`, verdict(cliMs < targets.cliMs)]);

    const rate = await snapshotRate(csi);
    results.push([
      `CreateSnapshot of one volume, ${snapshotCount} with 16 in flight`,
      `>= ${targets.snapshotsPerSecond}/s`,
      `${fmt(rate, 0)}/s`,
      verdict(rate >= targets.snapshotsPerSecond),
    ]);
    csi.close();
    printTable(`the catalog at scale: ${objects} volumes and snapshots, ${os.cpus().length} cores`, ['what', 'target', 'measured', ''], results);
  } finally {
    await stopServer(server);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

function verdict(pass: boolean): string {
  return pass ? 'PASS' : 'MISS';
}

async function startServer(dir: string, dataDir: string, socket: string): Promise<ChildProcess> {
  fs.rmSync(socket, { force: true });
  const server = spawn(
    process.execPath,
    [cli, '--data-dir', dataDir, 'serve', '--nbd-socket', path.join(dir, 'nbd.sock'), '--csi-endpoint', `unix://${socket}`, '--node-id', 'bench'],
    { stdio: 'ignore', env: { ...process.env, ARBOR_LOG_LEVEL: 'warn' } },
  );
  for (let i = 0; i < 1200 && !fs.existsSync(socket); i++) await new Promise((r) => setTimeout(r, 50));
  if (!fs.existsSync(socket)) throw new Error('arbor serve did not open its CSI socket');
  return server;
}

interface Counts {
  volumes: number;
  snapshots: number;
  oneVolume: number;
}

/**
 * Grows the catalog from `have` to `want` through the store in this process (the
 * server is stopped meanwhile): volumes `cat-N`, the first of which takes the
 * one-volume snapshots, the others' spread evenly.
 */
async function buildCatalog(dataDir: string, have: Counts, want: Counts, snapshotIds: Set<string>): Promise<{ counts: Counts; oneVolumeId: string }> {
  const store = await openDataDir(dataDir, undefined, { unsyncedCatalog: true });
  try {
    const volumeName = (i: number) => `cat-${String(i).padStart(6, '0')}`;
    await inParallel(want.volumes - have.volumes, 32, async (i) => {
      await store.createVolume(volumeName(have.volumes + i), { sizeBytes: 1 << 30 });
    });
    const jobs: Array<{ volume: string; name: string }> = [];
    for (let i = have.oneVolume; i < want.oneVolume; i++) jobs.push({ volume: volumeName(0), name: `one-${i}` });
    const spread = want.snapshots - want.oneVolume - (have.snapshots - have.oneVolume);
    const others = Math.max(1, want.volumes - 1);
    for (let i = 0; i < spread; i++) {
      const n = have.snapshots - have.oneVolume + i;
      jobs.push({ volume: volumeName(1 + (n % others)), name: `spread-${n}` });
    }
    await inParallel(jobs.length, 32, async (i) => {
      snapshotIds.add((await store.createSnapshot({ name: jobs[i].volume }, jobs[i].name)).id);
    });
    return { counts: want, oneVolumeId: (await store.getVolume({ name: volumeName(0) })).id };
  } finally {
    await store.close();
  }
}

async function inParallel(n: number, width: number, fn: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: width }, async () => {
      while (next < n) await fn(next++);
    }),
  );
}

type ListCall = 'ListVolumes' | 'ListSnapshots';

/**
 * The bench's CSI client decodes int64 fields as numbers, as a Go sidecar decodes
 * them into int64s: proto-loader's strings (a Long made per field, then printed)
 * cost the client more than the server spent reading the catalog for the same page,
 * which is this client's cost, not the driver's. Every field is still decoded.
 */
function benchClient(socket: string): CsiClient {
  return csiClient(socket, { int64: 'number' });
}

/**
 * Pages through a listing, timing it, then checks what came back: an id seen twice
 * fails the run. `entries` counts what came back, `ids` is each once, `sources` the
 * snapshots' source volumes. While timed, each page is decoded whole and its ids are
 * only kept; they are checked once the clock stopped.
 */
async function pageAll(
  csi: CsiClient,
  call: ListCall,
  request: object,
): Promise<{ entries: number; ids: Set<string>; sources: Set<string>; pages: number; ms: number; middleToken: string }> {
  const started = nowMs();
  const tokens: string[] = [];
  const listed: Array<string | undefined> = [];
  const sources: string[] = [];
  let token = '';
  let pages = 0;
  do {
    const reply = await csi.controller[call]({ ...request, max_entries: pageSize, starting_token: token });
    for (const entry of reply.entries as ListEntry[]) {
      listed.push(entry.snapshot?.snapshot_id ?? entry.volume?.volume_id);
      if (entry.snapshot) sources.push(entry.snapshot.source_volume_id);
    }
    pages++;
    token = reply.next_token as string;
    if (token) tokens.push(token);
  } while (token);
  const ms = nowMs() - started;
  const ids = new Set<string>();
  for (const id of listed) {
    if (!id) throw new Error(`${call}: an entry without an id`);
    if (ids.has(id)) throw new Error(`${call}: ${id} came back twice`);
    ids.add(id);
  }
  return { entries: listed.length, ids, sources: new Set(sources), pages, ms, middleToken: tokens[Math.floor(tokens.length / 2)] ?? '' };
}

/** What pageAll reads of a ListVolumes or ListSnapshots entry. */
interface ListEntry {
  volume?: { volume_id: string };
  snapshot?: { snapshot_id: string; source_volume_id: string };
}

/**
 * The median cost of one page of `probePage` entries of each listing, from the
 * middle of it (where a listing that scanned from its start would pay the most).
 */
async function pageCosts(csi: CsiClient, oneVolumeId: string): Promise<Record<'ListVolumes' | 'ListSnapshots' | 'ListSnapshots by source_volume_id', number>> {
  const cost = async (call: ListCall, request: object) => {
    const { middleToken } = await pageAll(csi, call, request);
    const probe = { ...request, max_entries: probePage, starting_token: middleToken };
    for (let i = 0; i < 20; i++) await csi.controller[call](probe);
    return percentile(await timeEach(30, () => csi.controller[call](probe).then(() => {})), 50);
  };
  return {
    ListVolumes: await cost('ListVolumes', {}),
    ListSnapshots: await cost('ListSnapshots', {}),
    'ListSnapshots by source_volume_id': await cost('ListSnapshots', { source_volume_id: oneVolumeId }),
  };
}

/** CreateSnapshot of one fresh volume, `snapshotCount` times with 16 in flight: snapshots per second. */
async function snapshotRate(csi: CsiClient): Promise<number> {
  const created = await csi.controller.CreateVolume({
    name: 'snapshot-rate',
    capacity_range: { required_bytes: String(1 << 30) },
    volume_capabilities: blockCapability,
  });
  const volumeId = (created.volume as { volume_id: string }).volume_id;
  const started = nowMs();
  let next = 0;
  await Promise.all(
    Array.from({ length: 16 }, async () => {
      while (next < snapshotCount) await csi.controller.CreateSnapshot({ source_volume_id: volumeId, name: `rate-${next++}` });
    }),
  );
  return snapshotCount / ((nowMs() - started) / 1000);
}

const blockCapability = [{ access_mode: { mode: 'SINGLE_NODE_WRITER' }, block: {} }];

/** Golden-image clones through CSI, and qemu-img overlays beside them. Returns the id of the golden volume's snapshot. */
async function cloneBenchmark(dir: string, dataDir: string, csi: CsiClient): Promise<string> {
  const golden = path.join(dir, 'golden.raw');
  execFileSync('fio', [
    '--name=fill',
    '--ioengine=psync',
    `--filename=${golden}`,
    '--rw=write',
    '--bs=1m',
    '--size=1g',
    '--refill_buffers',
    '--output-format=terse',
  ]);
  execFileSync(process.execPath, [cli, '--data-dir', dataDir, 'volume', 'create', 'golden', '--size', '1GiB']);
  execFileSync(process.execPath, [cli, '--data-dir', dataDir, 'volume', 'import', 'golden', golden]);
  const goldenId = (await csi.controller.ListVolumes({})).entries as Array<{ volume: { volume_id: string; volume_context: { name: string } } }>;
  const id = goldenId.find((e) => e.volume.volume_context.name === 'golden')!.volume.volume_id;
  const snapshot = ((await csi.controller.CreateSnapshot({ source_volume_id: id, name: 'gold' })).snapshot as { snapshot_id: string }).snapshot_id;
  const request = (name: string) => ({ name, volume_capabilities: blockCapability, volume_content_source: { snapshot: { snapshot_id: snapshot } } });

  const sequential = await timeEach(count, (i) => csi.controller.CreateVolume(request(`seq-${i}`)).then(() => {}));
  const started = nowMs();
  let next = 0;
  await Promise.all(
    Array.from({ length: 16 }, async () => {
      while (next < count) await csi.controller.CreateVolume(request(`par-${next++}`));
    }),
  );
  const parallelPerSecond = count / ((nowMs() - started) / 1000);

  const overlays = path.join(dir, 'overlays');
  fs.mkdirSync(overlays);
  const qemu = await timeEach(Math.min(count, 200), async (i) => {
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', golden, '-F', 'raw', path.join(overlays, `vm-${i}.qcow2`)]);
  });
  fs.rmSync(overlays, { recursive: true, force: true });
  fs.rmSync(golden, { force: true });
  const perSecond = (ms: number[]) => fmt(1000 / (ms.reduce((a, b) => a + b, 0) / ms.length), 0);
  const rows = [
    ['arbor CreateVolume from snapshot (CSI, 1 at a time)', fmt(percentile(sequential, 50)), fmt(percentile(sequential, 99)), perSecond(sequential)],
    ['arbor CreateVolume from snapshot (CSI, 16 in flight)', '-', '-', fmt(parallelPerSecond, 0)],
    ['qemu-img create -b (qcow2 overlay on the raw golden)', fmt(percentile(qemu, 50)), fmt(percentile(qemu, 99)), perSecond(qemu)],
  ];
  printTable(`golden-image clones: ${count} clones of a 1 GiB golden volume, ${os.cpus().length} cores`, ['how', 'p50 ms', 'p99 ms', 'clones/s'], rows);
  console.log(`\narbor / qemu-img overlay: p50 latency ${fmt(percentile(sequential, 50) / percentile(qemu, 50))}x`);
  return snapshot;
}

runBenchmark(main);
