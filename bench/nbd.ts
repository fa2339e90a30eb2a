/**
 * npm run bench:nbd — fio (nbd engine, unix socket) against, in the same run:
 *   arbor        a fresh clone of a filled 4 GiB golden volume, served by arbor serve,
 *                with 64 KiB extents (the default) and with 4 KiB extents
 *   qemu raw     qemu-nbd serving the 4 GiB golden raw file
 *   qemu qcow2   qemu-nbd serving a fresh qcow2 overlay on that raw file
 * for 4 KiB random reads and writes at queue depth 16 and 1 MiB sequential reads
 * and writes. Prints IOPS, MiB/s, p50/p99 completion latency and Arbor's ratio to
 * each peer. BENCH_RUNTIME (seconds per run, default 10) trades time for noise.
 */
import { ChildProcess, execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fioNbd, fmt, printTable, settleDisk, runBenchmark, stopServer, workloads } from './support';

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

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'arbor-bench-nbd-'));
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
  } finally {
    await stopServer(server);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

runBenchmark(main);
