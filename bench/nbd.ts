/**
 * npm run bench:nbd — fio (nbd engine, unix socket) against, in the same run:
 *   arbor        a fresh clone of a filled 4 GiB golden volume, served by arbor serve,
 *                with 64 KiB extents (the default) and with 4 KiB extents
 *   qemu raw     qemu-nbd serving the 4 GiB golden raw file
 *   qemu qcow2   qemu-nbd serving a fresh qcow2 overlay on that raw file
 * for 4 KiB random reads and writes at queue depth 16 and 1 MiB sequential reads
 * and writes. Prints IOPS, MiB/s, p50/p99 completion latency and Arbor's ratio to
 * each peer. BENCH_RUNTIME (seconds per run, default 10) trades time for noise.
 *
 * Then the cost of the QoS check (issue 15) on the request path: one store and
 * NBD server in this process, one volume served through exports with the check
 * (unlimited: the fast path; and limited far above what fio reaches: the bucket
 * arithmetic on every request) and without it (StoreExports { qos: false }), runs
 * alternated so drift falls on both. BENCH_QOS_ONLY=1 runs only this part.
 */
import { ChildProcess, execFile, execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { silentLog } from '../lib/logger';
import { NbdServer } from '../node-plugin/nbd/server';
import { StoreExports } from '../node-plugin/store-exports';
import { openDataDir } from '../store/embedded';
import { FioResult, Workload, fioJobArgs, fioNbd, fioResult, fmt, printTable, settleDisk, runBenchmark, stopServer, workloads } from './support';

const runtime = Number(process.env.BENCH_RUNTIME ?? 10);
const goldenBytes = 4 * 1024 * 1024 * 1024;
const cli = path.join(__dirname, '../cli/main.js');

function sh(command: string, args: string[]): string {
  return execFileSync(command, args, { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
}

async function waitForSocket(socketPath: string): Promise<void> {
  for (let i = 0; i < 200 && !fs.existsSync(socketPath); i++) await new Promise((r) => setTimeout(r, 50));
  if (!fs.existsSync(socketPath)) throw new Error(`${socketPath} did not appear`);
}

async function qemuNbd(dir: string, format: string, file: string): Promise<{ uri: string; stop: () => Promise<void> }> {
  const socket = path.join(dir, `qemu-${path.basename(file)}.sock`);
  const child: ChildProcess = spawn('qemu-nbd', ['-t', '-e', '8', '-f', format, '-k', socket, file], { stdio: 'ignore' });
  await waitForSocket(socket);
  return {
    uri: `nbd+unix:///?socket=${socket}`,
    stop: async () => {
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
      fs.rmSync(socket, { force: true });
    },
  };
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

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'arbor-bench-nbd-'));
  if (process.env.BENCH_QOS_ONLY === '1') {
    try {
      await qosCost(dir);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
    return;
  }
  let server: ChildProcess | undefined;
  try {
    const dataDir = path.join(dir, 'data');
    const nbdSocket = path.join(dir, 'arbor.sock');
    const arbor = (...args: string[]) => sh(process.execPath, [cli, '--data-dir', dataDir, ...args]);
    server = spawn(process.execPath, [cli, '--data-dir', dataDir, 'serve', '--nbd-socket', nbdSocket], {
      stdio: 'ignore',
      env: { ...process.env, ARBOR_LOG_LEVEL: 'warn' },
    });
    await waitForSocket(nbdSocket);
    await waitForSocket(path.join(dataDir, 'arbor.sock'));

    process.stderr.write('filling a 4 GiB golden raw image and the golden volume...\n');
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
    for (const [name, extent] of [
      ['golden', '64KiB'],
      ['golden4k', '4KiB'],
    ]) {
      arbor('volume', 'create', name, '--size', String(goldenBytes), '--extent-size', extent);
      sh('qemu-img', ['convert', '-n', '-W', '-m', '8', '-f', 'raw', '-O', 'raw', golden, `nbd+unix:///${name}?socket=${nbdSocket}`]);
      arbor('snapshot', 'create', `${name}@${name}-gold`);
    }

    const rows: string[][] = [];
    const ratios: string[][] = [];
    for (const [i, w] of workloads.entries()) {
      process.stderr.write(`${w.name}...\n`);
      // Fresh targets for every workload: writes must not find the work already done.
      arbor('volume', 'clone', 'golden@golden-gold', `clone${i}`);
      arbor('volume', 'clone', 'golden4k@golden4k-gold', `small${i}`);
      const overlay = path.join(dir, `overlay${i}.qcow2`);
      sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', golden, '-F', 'raw', overlay]);
      settleDisk();
      const a = fioNbd(`nbd+unix:///clone${i}?socket=${nbdSocket}`, w, goldenBytes, runtime);
      settleDisk();
      const a4 = fioNbd(`nbd+unix:///small${i}?socket=${nbdSocket}`, w, goldenBytes, runtime);
      settleDisk();
      const raw = await qemuNbd(dir, 'raw', golden);
      const r = fioNbd(raw.uri, w, goldenBytes, runtime);
      await raw.stop();
      settleDisk();
      const qcow = await qemuNbd(dir, 'qcow2', overlay);
      const q = fioNbd(qcow.uri, w, goldenBytes, runtime);
      await qcow.stop();
      for (const [who, res] of [
        ['arbor clone, 64 KiB extents', a],
        ['arbor clone, 4 KiB extents', a4],
        ['qemu-nbd raw', r],
        ['qemu-nbd qcow2 overlay', q],
      ] as const) {
        rows.push([w.name, who, fmt(res.iops, 0), fmt(res.mibs, 1), fmt(res.p50us, 1), fmt(res.p99us, 1)]);
      }
      ratios.push([w.name, fmt(a.iops / q.iops), fmt(a.iops / r.iops), fmt(a4.iops / q.iops), fmt(a4.iops / r.iops)]);
    }
    printTable(
      `fio --ioengine=nbd, ${runtime} s per run after 2 s ramp, ${os.cpus().length} cores`,
      ['workload', 'target', 'IOPS', 'MiB/s', 'p50 µs', 'p99 µs'],
      rows,
    );
    printTable(
      'arbor / peer (throughput; targets: >= 1.0 vs the qcow2 overlay, >= 0.8 vs raw for 4 KiB random)',
      ['workload', '64K ext / qcow2', '64K ext / raw', '4K ext / qcow2', '4K ext / raw'],
      ratios,
    );
    await stopServer(server);
    server = undefined;
    await qosCost(dir);
  } finally {
    await stopServer(server);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

runBenchmark(main);
