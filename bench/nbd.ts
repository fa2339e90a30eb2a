/**
 * npm run bench:nbd — Arbor's data path beside its peers, every figure of issue 16
 * as a ratio taken in the same run (these machines are shared and noisy):
 *   - 4 KiB random reads (QD16) on a fresh clone of a filled golden volume (4 GiB,
 *     64 KiB extents, the default) against `nbdkit file` on the raw golden image;
 *   - first writes on a fresh clone: one 4 KiB write at a random page of every
 *     extent, extents in order (fio's strided zones), so every write is a
 *     copy-on-write of a shared extent, against a fresh qcow2 overlay on the raw
 *     image (qemu-nbd; each write allocates a cluster and copies it from the backing
 *     file) and `nbdkit file` on a raw copy (no copy at all); the same writes into a
 *     fresh sparse file through nbdkit (new data, as a clone's are) are printed beside
 *     them, for comparison;
 *   - 4 KiB random writes once a clone is written (all over, by one sequential
 *     pass: the first writes' clone holds one page per extent, so most writes to it
 *     are still first writes; both rows are printed), 1 MiB sequential reads and
 *     writes (QD4), against `nbdkit file`;
 *   - 4 KiB random reads through the 100th generation of clones of clones (each
 *     generation written a little, then snapshotted and cloned) against the first;
 *   - 100 volumes attached, each with one idle connection and 64 KiB written: the
 *     server's resident memory;
 *   - 16 volumes doing 4 KiB random reads (and writes) at once: their aggregate
 *     IOPS against one volume doing the same alone;
 * Every row also gives the serving process's CPU over the run and how often its threads
 * were preempted, Arbor's and its peers' alike, so that a ratio comes with what bounds
 * it (more work per request, or less of the machine). Then prints every target with
 * met or MISSED. Then the cost of the QoS check
 * (issue 15) on the request path: one store and NBD server in this process, one
 * volume served through exports with the check (unlimited: the fast path; and
 * limited far above what fio reaches) and without it, runs alternated so drift falls
 * on both. Arbor's runs and its peer's that can be repeated alike are alternated
 * the same way, BENCH_PAIRED_ROUNDS times each (default 2), and a target takes the
 * ratio of their means. BENCH_RUNTIME (seconds per fio run, default 10), BENCH_GOLDEN_GIB (4);
 * BENCH_QOS_ONLY=1 runs only the QoS part.
 */
import { ChildProcess, execFile, execFileSync, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { csiClient } from '../csi/client';
import { silentLog } from '../lib/logger';
import { NbdClient } from '../node-plugin/nbd/client';
import { NbdServer } from '../node-plugin/nbd/server';
import { StoreExports } from '../node-plugin/store-exports';
import { openDataDir } from '../store/embedded';
import {
  FioResult,
  TargetResult,
  Workload,
  checkTarget,
  fioJobArgs,
  fioMany,
  fioNbd,
  fioResult,
  fmt,
  nowMs,
  printTable,
  printTargets,
  pageCacheWrites,
  settleDisk,
  runBenchmark,
  stopServer,
  workloads,
} from './support';
import { cliPath as cli } from '../test/support/arbor-server';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const runtime = Number(process.env.BENCH_RUNTIME ?? 10);
const goldenBytes = Number(process.env.BENCH_GOLDEN_GIB ?? 4) * GiB;
const generations = 100;
const attachedVolumes = 100;
const concurrentVolumes = 16;
/** Runs of each side of a paired comparison (see `paired` in main). */
const pairedRounds = Number(process.env.BENCH_PAIRED_ROUNDS ?? 2);

/** The mean of several runs of one workload on one target. */
function meanOf(runs: FioResult[]): FioResult {
  const mean = (pick: (r: FioResult) => number) => runs.reduce((sum, r) => sum + pick(r), 0) / runs.length;
  return { iops: mean((r) => r.iops), mibs: mean((r) => r.mibs), p50us: mean((r) => r.p50us), p99us: mean((r) => r.p99us), ios: mean((r) => r.ios) };
}

function sh(command: string, args: string[]): string {
  return execFileSync(command, args, { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
}

async function waitForSocket(socketPath: string): Promise<void> {
  for (let i = 0; i < 200 && !fs.existsSync(socketPath); i++) await new Promise((r) => setTimeout(r, 50));
  if (!fs.existsSync(socketPath)) throw new Error(`${socketPath} did not appear`);
}

/** A server fio runs against: where, and which process serves it (its CPU is measured). */
interface Served {
  uri: string;
  pid: number;
}

async function qemuNbd(dir: string, format: string, file: string): Promise<Served & { stop: () => Promise<void> }> {
  const socket = path.join(dir, `qemu-${path.basename(file)}.sock`);
  const child: ChildProcess = spawn('qemu-nbd', ['-t', '-e', '8', '-f', format, '-k', socket, file], { stdio: 'ignore' });
  await waitForSocket(socket);
  return {
    uri: `nbd+unix:///?socket=${socket}`,
    pid: child.pid!,
    stop: async () => {
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
      fs.rmSync(socket, { force: true });
    },
  };
}

/** `nbdkit file` on `file` (read-only when asked), on a unix socket in `dir`. */
async function nbdkit(dir: string, file: string, readOnly: boolean): Promise<Served & { stop: () => Promise<void> }> {
  const socket = path.join(dir, `nbdkit-${path.basename(file)}.sock`);
  const child: ChildProcess = spawn('nbdkit', ['--foreground', '--exit-with-parent', ...(readOnly ? ['-r'] : []), '--unix', socket, 'file', file], {
    stdio: 'ignore',
  });
  await waitForSocket(socket);
  return {
    uri: `nbd+unix:///?socket=${socket}`,
    pid: child.pid!,
    stop: async () => {
      if (child.exitCode !== null) return;
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
    },
  };
}

type Csi = ReturnType<typeof csiClient>;

/** The id of the only volume there is (the golden one, before any clone). */
async function onlyVolumeId(csi: Csi): Promise<string> {
  const { entries } = (await csi.controller.ListVolumes({})) as { entries: Array<{ volume: { volume_id: string } }> };
  if (entries.length !== 1) throw new Error(`expected the golden volume alone, found ${entries.length} volumes`);
  return entries[0].volume.volume_id;
}

async function createSnapshot(csi: Csi, volumeId: string, name: string): Promise<string> {
  const response = (await csi.controller.CreateSnapshot({ source_volume_id: volumeId, name })) as { snapshot: { snapshot_id: string } };
  return response.snapshot.snapshot_id;
}

/** A Block volume cloned from a snapshot through CSI (what a CDI golden-image clone becomes); its id. */
async function cloneSnapshot(csi: Csi, snapshotId: string, name: string): Promise<string> {
  const response = (await csi.controller.CreateVolume({
    name,
    volume_capabilities: [{ access_mode: { mode: 'SINGLE_NODE_WRITER' }, block: {} }],
    volume_content_source: { snapshot: { snapshot_id: snapshotId } },
  })) as { volume: { volume_id: string } };
  return response.volume.volume_id;
}

/** Writes 64 KiB of random data at a random extent through NBD, and flushes. */
async function writeALittle(nbdSocket: string, volume: string, client?: NbdClient): Promise<void> {
  const own = client ?? (await NbdClient.connect({ socketPath: nbdSocket, exportName: volume }));
  const extents = Math.floor(own.sizeBytes / (64 * 1024));
  await own.write(crypto.randomInt(0, extents) * 64 * 1024, crypto.randomBytes(64 * 1024));
  await own.flush();
  if (!client) await own.disconnect();
}

/** Generation 1 is a clone of the golden snapshot; generation g+1 a clone of a snapshot of generation g, written a little first. */
async function cloneGenerations(csi: Csi, goldSnapshot: string, nbdSocket: string, count: number): Promise<{ first: string; last: string }> {
  let snapshot = goldSnapshot;
  let volume = '';
  for (let g = 1; g <= count; g++) {
    volume = `generation-${g}`;
    const id = await cloneSnapshot(csi, snapshot, volume);
    if (g === count) break;
    await writeALittle(nbdSocket, volume);
    snapshot = await createSnapshot(csi, id, `generation-${g}-snap`);
  }
  return { first: 'generation-1', last: volume };
}

/** `count` fresh clones, each with one NBD connection kept open (idle) after 64 KiB were written through it. */
async function attachIdleVolumes(csi: Csi, goldSnapshot: string, nbdSocket: string, count: number): Promise<{ close: () => Promise<void> }> {
  const clients: NbdClient[] = [];
  for (let i = 0; i < count; i++) {
    const volume = `attached-${i}`;
    await cloneSnapshot(csi, goldSnapshot, volume);
    const client = await NbdClient.connect({ socketPath: nbdSocket, exportName: volume });
    clients.push(client);
    await writeALittle(nbdSocket, volume, client);
  }
  return { close: async () => void (await Promise.all(clients.map((c) => c.disconnect()))) };
}

/** Bytes a process has passed to write(2) and its kin so far (/proc/PID/io wchar). */
function bytesWritten(pid: number): number {
  return Number(/^wchar:\s+(\d+)$/m.exec(fs.readFileSync(`/proc/${pid}/io`, 'utf8'))![1]);
}

/** Resident memory of a process now, and its peak, in bytes (from /proc). */
function residentMemory(pid: number): { rss: number; peak: number } {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const kib = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status)![1]) * 1024;
  return { rss: kib('VmRSS'), peak: kib('VmHWM') };
}

const clockTicksPerSecond = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim());

/** A process's CPU so far (all its threads) and how often its threads were preempted, from /proc. */
interface ProcessTimes {
  userSeconds: number;
  systemSeconds: number;
  preemptions: number;
  atMs: number;
}

function processTimes(pid: number): ProcessTimes {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command (which may hold spaces), from the state (field 3): utime is 14, stime 15.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  let preemptions = 0;
  for (const thread of fs.readdirSync(`/proc/${pid}/task`)) {
    try {
      const status = fs.readFileSync(`/proc/${pid}/task/${thread}/status`, 'utf8');
      preemptions += Number(/^nonvoluntary_ctxt_switches:\s+(\d+)$/m.exec(status)![1]);
    } catch {
      // The thread ended meanwhile.
    }
  }
  return {
    userSeconds: Number(fields[11]) / clockTicksPerSecond,
    systemSeconds: Number(fields[12]) / clockTicksPerSecond,
    preemptions,
    atMs: nowMs(),
  };
}

/**
 * The server's side of a row: its CPU as cores, user and system; CPU per I/O (cores /
 * IOPS); and its threads' involuntary context switches a second: where a server falls
 * behind its peer, whether it worked more per request or got less of the machine. A
 * timed run is taken whole (the ramp runs at the same rate); a one-pass run over the
 * time its I/O took, since fio's start and exit, idle for the server, are a large part
 * of a run of a second or two.
 */
function serverColumns(before: ProcessTimes, after: ProcessTimes, result: FioResult, onePass: boolean): string[] {
  const iops = result.iops;
  const seconds = onePass ? result.ios / iops : (after.atMs - before.atMs) / 1000;
  const user = (after.userSeconds - before.userSeconds) / seconds;
  const system = (after.systemSeconds - before.systemSeconds) / seconds;
  return [
    fmt(user + system, 2),
    fmt(user, 2),
    fmt(system, 2),
    fmt(((user + system) / iops) * 1e6, 1),
    fmt((after.preemptions - before.preemptions) / seconds, 0),
  ];
}

/** fio against a server in this process: it must not block the event loop (fioNbd does). */
function fioAsync(uri: string, w: Workload, sizeBytes: number, runtimeSeconds: number): Promise<FioResult> {
  return new Promise((resolve, reject) =>
    execFile('fio', ['--ioengine=nbd', `--uri=${uri}`, ...fioJobArgs(w, sizeBytes, runtimeSeconds)], { maxBuffer: 64 * 1024 * 1024 }, (err, out) =>
      err ? reject(err) : resolve(fioResult(out, w)),
    ),
  );
}

/** IOPS of 4 KiB random reads and writes through the QoS check (unlimited, and limited out of reach) and around it. */
async function qosCost(dir: string): Promise<void> {
  const store = await openDataDir(path.join(dir, 'qos-data'));
  const servers: NbdServer[] = [];
  try {
    const sizeBytes = 1024 * 1024 * 1024;
    await store.createVolume('unlimited', { sizeBytes });
    await store.createVolume('high-limit', { sizeBytes });
    // Far above what one fio reaches here: every request does the bucket arithmetic, none waits.
    await store.setVolumeQos({ name: 'high-limit' }, { maxIops: 5_000_000, maxBandwidthBytes: 64 * 1024 ** 3 });
    const uris: Record<string, string> = {};
    for (const [who, qos] of [
      ['with', true],
      ['without', false],
    ] as const) {
      const server = new NbdServer(new StoreExports(store, { qos }), silentLog);
      const socket = path.join(dir, `qos-${who}.sock`);
      await server.listenUnix(socket);
      servers.push(server);
      uris[who] = socket;
    }
    const targets = [
      ['QoS check, unlimited volume', `nbd+unix:///unlimited?socket=${uris.with}`],
      ['QoS check, limit never reached', `nbd+unix:///high-limit?socket=${uris.with}`],
      ['no QoS check (bypassed)', `nbd+unix:///unlimited?socket=${uris.without}`],
    ] as const;
    // Written through once, so every write run overwrites owned extents in place, whichever runs first.
    for (const name of ['unlimited', 'high-limit']) {
      process.stderr.write(`QoS cost: filling ${name}...\n`);
      await new Promise<void>((resolve, reject) =>
        execFile(
          'fio',
          ['--name=fill', '--ioengine=nbd', `--uri=nbd+unix:///${name}?socket=${uris.without}`, '--rw=write', '--bs=1m', '--iodepth=4', `--size=${sizeBytes}`],
          (err) => (err ? reject(err) : resolve()),
        ),
      );
    }
    const rounds = 3;
    const rows: string[][] = [];
    for (const w of workloads.filter((x) => x.bs === '4k')) {
      const iops = new Map<string, number[]>(targets.map(([who]) => [who, []]));
      for (let round = 0; round < rounds; round++) {
        for (const [who, uri] of round % 2 === 0 ? targets : [...targets].reverse()) {
          process.stderr.write(`QoS cost: ${w.name}, ${who}, round ${round + 1}...\n`);
          iops.get(who)!.push((await fioAsync(uri, w, sizeBytes, Math.max(3, Math.round(runtime / 2)))).iops);
        }
      }
      const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
      const bypassed = mean(iops.get('no QoS check (bypassed)')!);
      for (const [who] of targets) {
        const m = mean(iops.get(who)!);
        rows.push([
          w.name,
          who,
          fmt(m, 0),
          iops
            .get(who)!
            .map((x) => fmt(x, 0))
            .join(' / '),
          fmt(m / bypassed, 3),
        ]);
      }
    }
    printTable(
      `cost of the QoS check on the NBD request path: one server in this process, ${rounds} alternated runs each, ${os.cpus().length} cores`,
      ['workload', 'path', 'mean IOPS', 'runs', '/ bypassed'],
      rows,
    );
  } finally {
    for (const server of servers) await server.close();
    await store.close();
  }
}

/**
 * What a full run writes to the temporary directory's disk, in golden images: the raw
 * golden, the golden volume, nbdkit's raw copy and fresh sparse files, a clone written
 * all over, the clones the timed sequential writes fill, and the QoS part's volumes.
 * A run on 4 GiB filled the last 22 GB of a disk, so the check comes first.
 */
const goldensOfDisk = 7;

/** An empty sparse file of the golden image's size in `dir`. */
function sparseFile(dir: string, name: string): string {
  const file = path.join(dir, name);
  fs.closeSync(fs.openSync(file, 'w'));
  fs.truncateSync(file, goldenBytes);
  return file;
}

/** Refuses to start a run that would fill the disk halfway through (fio then fails with I/O errors). */
function checkFreeDisk(dir: string): void {
  const stats = fs.statfsSync(dir);
  const freeBytes = stats.bavail * stats.bsize;
  const neededBytes = goldensOfDisk * goldenBytes;
  if (freeBytes < neededBytes) {
    throw new Error(
      `bench:nbd needs about ${neededBytes / GiB} GiB free under ${os.tmpdir()} (${goldensOfDisk} times the ${goldenBytes / GiB} GiB golden image) and finds ` +
        `${(freeBytes / GiB).toFixed(1)} GiB: free space there, set TMPDIR to a larger disk, or a smaller BENCH_GOLDEN_GIB`,
    );
  }
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'arbor-bench-nbd-'));
  try {
    checkFreeDisk(dir);
  } catch (err) {
    fs.rmSync(dir, { recursive: true, force: true });
    throw err;
  }
  if (process.env.BENCH_QOS_ONLY === '1') {
    try {
      await qosCost(dir);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
    return;
  }
  const cleanups: Array<() => Promise<void>> = [];
  let failureLog: string | undefined;
  let server: ChildProcess | undefined;
  try {
    const dataDir = path.join(dir, 'data');
    const nbdSocket = path.join(dir, 'arbor.sock');
    const csiSocket = path.join(dir, 'csi.sock');
    const serverLog = path.join(dir, 'serve.log');
    failureLog = serverLog;
    const arbor = (...args: string[]) => sh(process.execPath, [cli, '--data-dir', dataDir, ...args]);
    server = spawn(
      process.execPath,
      [cli, '--data-dir', dataDir, 'serve', '--nbd-socket', nbdSocket, '--csi-endpoint', `unix://${csiSocket}`, '--node-id', 'bench'],
      {
        // Its warnings and errors are kept: a failed run prints them (see the catch below).
        stdio: ['ignore', 'ignore', fs.openSync(serverLog, 'w')],
        env: { ...process.env, ARBOR_LOG_LEVEL: 'warn' },
      },
    );
    const serverPid = server.pid!;
    await waitForSocket(nbdSocket);
    await waitForSocket(csiSocket);
    const csi = csiClient(csiSocket);
    cleanups.push(async () => csi.close());
    const uri = (volume: string) => `nbd+unix:///${volume}?socket=${nbdSocket}`;
    const arborVolume = (volume: string): Served => ({ uri: uri(volume), pid: serverPid });

    process.stderr.write(`filling a ${goldenBytes / GiB} GiB golden raw image and the golden volume...\n`);
    const golden = path.join(dir, 'golden.raw');
    sh('fio', [
      '--name=fill',
      '--ioengine=psync',
      `--filename=${golden}`,
      '--rw=write',
      '--bs=1m',
      `--size=${goldenBytes}`,
      '--refill_buffers',
      '--output-format=terse',
    ]);
    arbor('volume', 'create', 'golden', '--size', String(goldenBytes));
    sh('qemu-img', ['convert', '-n', '-W', '-m', '8', '-f', 'raw', '-O', 'raw', golden, uri('golden')]);
    arbor('snapshot', 'create', 'golden@gold');
    const goldenVolumeId = await onlyVolumeId(csi);
    const goldSnapshot = await createSnapshot(csi, goldenVolumeId, 'gold-csi');
    let clones = 0;
    const freshClone = async () => {
      const name = `clone-${clones++}`;
      await cloneSnapshot(csi, goldSnapshot, name);
      return name;
    };
    // The peers' files: the golden image read-only for reads, a raw copy for writes.
    const copy = path.join(dir, 'copy.raw');
    sh('cp', ['--sparse=never', golden, copy]);
    const nbdkitRead = await nbdkit(dir, golden, true);
    const nbdkitWrite = await nbdkit(dir, copy, false);
    // And an empty sparse file: writes of new data, as a clone's are (not a target's
    // peer; on a VM where new page-cache pages are slow, it shows what new data costs).
    // One for the first writes' pattern, one for sequential writes: neither run may find
    // the other's pages cached.
    const nbdkitFresh = await nbdkit(dir, sparseFile(dir, 'fresh.raw'), false);
    const nbdkitFreshFirst = await nbdkit(dir, sparseFile(dir, 'fresh-first.raw'), false);
    cleanups.push(nbdkitRead.stop, nbdkitWrite.stop, nbdkitFresh.stop, nbdkitFreshFirst.stop);

    const rows: string[][] = [];
    /** One row: `fio` run against the server process `pid`, with that process's cost beside fio's figures. */
    const measured = (what: string, who: string, pid: number, onePass: boolean, fio: () => FioResult): FioResult => {
      settleDisk();
      process.stderr.write(`${what}: ${who}...\n`);
      const before = processTimes(pid);
      const res = fio();
      const cost = serverColumns(before, processTimes(pid), res, onePass);
      rows.push([what, who, fmt(res.iops, 0), fmt(res.mibs, 1), fmt(res.p50us, 1), fmt(res.p99us, 1), ...cost]);
      return res;
    };
    const run = (what: string, who: string, server: Served, w: Workload, extra: string[] = [], timeBased = true): FioResult =>
      measured(what, who, server.pid, !timeBased, () => fioNbd(server.uri, w, goldenBytes, runtime, extra, timeBased));
    /** One fio job per server at once (one server process behind all of them), as one row of their sum. */
    const runMany = (what: string, who: string, servers: Served[], w: Workload): FioResult =>
      measured(what, who, servers[0].pid, false, () =>
        fioMany(
          servers.map((server) => server.uri),
          w,
          goldenBytes,
          runtime,
        ),
      );
    const targets: TargetResult[] = [];
    /**
     * Arbor and its peer, `pairedRounds` times each, alternated (a b, then b a) so that
     * drift on this shared machine falls on both: each row is printed, a target takes
     * the ratio of the means. `a` and `b` get the round's index (a fresh clone per
     * round where a run changes what the next would measure).
     */
    const paired = (a: (round: number) => FioResult, b: (round: number) => FioResult): [FioResult, FioResult] => {
      const runs: [FioResult[], FioResult[]] = [[], []];
      for (let round = 0; round < pairedRounds; round++) {
        const order = round % 2 === 0 ? [0, 1] : [1, 0];
        for (const side of order) runs[side].push(side === 0 ? a(round) : b(round));
      }
      return [meanOf(runs[0]), meanOf(runs[1])];
    };

    const randRead = workloads[0];
    const randWrite = workloads[1];
    const seqRead = workloads[2];
    const seqWrite = workloads[3];

    const readClone = await freshClone();
    const [reads, readsPeer] = paired(
      () => run('4 KiB random read QD16', 'arbor, fresh clone', arborVolume(readClone), randRead),
      () => run('4 KiB random read QD16', 'nbdkit file, raw golden', nbdkitRead, randRead),
    );
    targets.push(checkTarget('4 KiB random read QD16 / nbdkit file', reads.iops / readsPeer.iops, { atLeast: 1.2 }));

    // One write into every extent (and every qcow2 cluster): each is a first write.
    const firstWrite: Workload = { ...randWrite, name: '4 KiB first writes QD16' };
    const strided = ['--zonemode=strided', '--zonesize=4k', `--zonerange=${64 * 1024}`, `--io_size=${goldenBytes / 16}`];
    const writeClone = await freshClone();
    const writtenBefore = bytesWritten(serverPid);
    const first = run('4 KiB first writes QD16', 'arbor, fresh clone', arborVolume(writeClone), firstWrite, strided, false);
    const firstWriteBytes = (bytesWritten(serverPid) - writtenBefore) / (goldenBytes / (64 * 1024));
    const overlay = path.join(dir, 'overlay.qcow2');
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', golden, '-F', 'raw', overlay]);
    const qcow = await qemuNbd(dir, 'qcow2', overlay);
    const firstQcow = run('4 KiB first writes QD16', 'qemu-nbd, fresh qcow2 overlay', qcow, firstWrite, strided, false);
    await qcow.stop();
    const firstPeer = run('4 KiB first writes QD16', 'nbdkit file, raw copy', nbdkitWrite, firstWrite, strided, false);
    const firstNew = run('4 KiB first writes QD16', 'nbdkit file, fresh sparse file', nbdkitFreshFirst, firstWrite, strided, false);
    targets.push(checkTarget('4 KiB first writes QD16 / qemu-nbd qcow2 overlay', first.iops / firstQcow.iops, { atLeast: 2.0 }));
    targets.push(checkTarget('4 KiB first writes QD16 / nbdkit file', first.iops / firstPeer.iops, { atLeast: 1.0 }));

    // The clone the first writes ran on holds one page of each extent: most writes to it
    // are still first writes into its patches (new data). A clone written all over
    // (one sequential pass, untimed) is what "once written" means: every write lands
    // in place, on data the clone owns, as nbdkit's land on its raw copy.
    run('4 KiB random write QD16', 'arbor, clone with one page per extent written', arborVolume(writeClone), randWrite);
    const filledClone = await freshClone();
    settleDisk();
    process.stderr.write('writing a fresh clone all over (1 MiB sequential writes, one pass)...\n');
    fioNbd(uri(filledClone), seqWrite, goldenBytes, runtime, [], false);
    const [written, writtenPeer] = paired(
      () => run('4 KiB random write QD16', 'arbor, clone written all over', arborVolume(filledClone), randWrite),
      () => run('4 KiB random write QD16', 'nbdkit file, raw copy', nbdkitWrite, randWrite),
    );
    targets.push(checkTarget('4 KiB random write QD16, written clone / nbdkit file', written.iops / writtenPeer.iops, { atLeast: 1.0 }));

    const [seqReads, seqReadsPeer] = paired(
      () => run('1 MiB sequential read QD4', 'arbor, fresh clone', arborVolume(readClone), seqRead),
      () => run('1 MiB sequential read QD4', 'nbdkit file, raw golden', nbdkitRead, seqRead),
    );
    targets.push(checkTarget('1 MiB sequential read QD4 / nbdkit file', seqReads.mibs / seqReadsPeer.mibs, { atLeast: 0.9 }));
    // A fresh clone each round: on the round before's clone, the writes would land in place.
    const seqClones: string[] = [];
    for (let round = 0; round < pairedRounds; round++) seqClones.push(await freshClone());
    const [seqWrites, seqWritesPeer] = paired(
      (round) => run('1 MiB sequential write QD4', 'arbor, fresh clone', arborVolume(seqClones[round]), seqWrite),
      () => run('1 MiB sequential write QD4', 'nbdkit file, raw copy', nbdkitWrite, seqWrite),
    );
    targets.push(checkTarget('1 MiB sequential write QD4 / nbdkit file', seqWrites.mibs / seqWritesPeer.mibs, { atLeast: 0.9 }));
    const seqWritesNew = run('1 MiB sequential write QD4', 'nbdkit file, fresh sparse file', nbdkitFresh, seqWrite);
    const pageCache = pageCacheWrites(dir);

    process.stderr.write(`building ${generations} generations of clones of clones...\n`);
    const lineage = await cloneGenerations(csi, goldSnapshot, nbdSocket, generations);
    const [genLast, genFirst] = paired(
      () => run('4 KiB random read QD16', `arbor, clone generation ${generations}`, arborVolume(lineage.last), randRead),
      () => run('4 KiB random read QD16', 'arbor, clone generation 1', arborVolume(lineage.first), randRead),
    );
    targets.push(checkTarget(`4 KiB random read, clone generation ${generations} / generation 1`, genLast.iops / genFirst.iops, { atLeast: 0.95 }));

    const concurrent: string[] = [];
    const peerScaling: string[] = [];
    for (let i = 0; i < concurrentVolumes; i++) concurrent.push(await freshClone());
    for (const [w, label, peer] of [
      [randRead, 'read', nbdkitRead],
      [randWrite, 'write', nbdkitWrite],
    ] as const) {
      const alone = run(`4 KiB random ${label} QD16`, 'arbor, one volume alone', arborVolume(concurrent[0]), w);
      const together = runMany(`4 KiB random ${label} QD16 each`, `arbor, ${concurrentVolumes} volumes at once (sum)`, concurrent.map(arborVolume), w);
      targets.push(
        checkTarget(`4 KiB random ${label}, ${concurrentVolumes} volumes at once / one alone (aggregate IOPS)`, together.iops / alone.iops, { atLeast: 0.9 }),
      );
      // The same ${concurrentVolumes} fio jobs against nbdkit (one connection each, one
      // file): what the clients and the machine allow a server that scales, for
      // comparison (not a target).
      const peerAlone = run(`4 KiB random ${label} QD16`, 'nbdkit file, one connection alone', peer, w);
      const peerTogether = runMany(
        `4 KiB random ${label} QD16 each`,
        `nbdkit file, ${concurrentVolumes} connections at once (sum)`,
        concurrent.map(() => peer),
        w,
      );
      peerScaling.push(`${label}: nbdkit ${concurrentVolumes} connections / one ${fmt(peerTogether.iops / peerAlone.iops, 2)}x`);
    }

    process.stderr.write(`attaching ${attachedVolumes} volumes, each with an idle connection...\n`);
    const idle = await attachIdleVolumes(csi, goldSnapshot, nbdSocket, attachedVolumes);
    cleanups.push(idle.close);
    const memory = residentMemory(serverPid);
    targets.push(checkTarget(`${attachedVolumes} volumes attached, one idle connection each: server RSS`, memory.rss / MiB, { below: 300 }, ' MB', 0));

    printTable(
      `fio --ioengine=nbd, ${runtime} s per timed run after 2 s ramp (first writes: one pass), ${goldenBytes / GiB} GiB golden, ${os.cpus().length} cores`,
      ['workload', 'target', 'IOPS', 'MiB/s', 'p50 µs', 'p99 µs', 'server cores', 'user', 'sys', 'CPU µs/IO', 'preempted/s'],
      rows,
    );
    console.log(
      '\nserver columns: its CPU (all threads; /proc/PID/stat) in cores, user and system, over the whole run (ramp included), or for one-pass runs over the time their I/O took; CPU µs/IO = cores / IOPS; ' +
        "preempted/s = its threads' involuntary context switches (/proc/PID/task/*/status): less of the machine, not more work",
    );
    console.log(
      `bytes the server handed to write(2) per 4 KiB first write: ${fmt(firstWriteBytes / 1024, 1)} KiB (the pages written, map nodes at commit, and the reply; /proc/PID/io wchar)`,
    );
    console.log(
      `server memory with ${attachedVolumes} volumes attached: RSS ${fmt(memory.rss / MiB, 0)} MB, peak ${fmt(memory.peak / MiB, 0)} MB over the whole run`,
    );
    console.log(`the same ${concurrentVolumes}-job fio runs against nbdkit, for comparison: ${peerScaling.join('; ')}`);
    console.log(
      `new data, for comparison: the first writes' pattern into a fresh sparse file through nbdkit ${fmt(firstNew.iops, 0)} IOPS, into its raw copy ${fmt(firstPeer.iops, 0)} IOPS; Arbor's fresh clone / the sparse file ${fmt(first.iops / firstNew.iops, 2)}x`,
    );
    console.log(
      `new data, for comparison: 1 MiB sequential writes into a fresh sparse file through nbdkit ${fmt(seqWritesNew.mibs, 0)} MiB/s, into its raw copy ${fmt(seqWritesPeer.mibs, 0)} MiB/s; Arbor's fresh clone / the sparse file ${fmt(seqWrites.mibs / seqWritesNew.mibs, 2)}x`,
    );
    console.log(
      `this machine's page cache, for comparison (1 MiB pwrites, one thread): new data ${fmt(pageCache.newMibs, 0)} MiB/s, the same bytes over cached pages ${fmt(pageCache.cachedMibs, 0)} MiB/s (${fmt(pageCache.cachedMibs / pageCache.newMibs, 1)}x): a first write is new data, an overwrite of nbdkit's raw copy is not`,
    );
    printTargets('issue 16 targets (ratios taken in this run)', targets);
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
    await stopServer(server);
    server = undefined;
    await qosCost(dir);
  } catch (err) {
    if (failureLog && fs.existsSync(failureLog))
      process.stderr.write(`arbor serve's log (warnings and errors):\n${fs.readFileSync(failureLog, 'utf8').slice(-20000)}\n`);
    throw err;
  } finally {
    for (const cleanup of cleanups.reverse()) await cleanup().catch(() => undefined);
    await stopServer(server);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

runBenchmark(main);
