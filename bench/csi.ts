/**
 * npm run bench:csi — how fast golden-image clones are made through CSI: the
 * latency of CreateVolume from a snapshot (p50, p99) and clones per second, one at a
 * time and 16 in flight, against `arbor serve` over its real gRPC socket; beside it,
 * in the same run, `qemu-img create -b` making qcow2 overlays on a raw golden image
 * (what a qcow2-based platform does per VM).
 */
import { ChildProcess, execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { csiClient } from '../csi/client';
import { fmt, nowMs, percentile, printTable, timeEach, runBenchmark, stopServer } from './support';

const cli = path.join(__dirname, '../cli/main.js');
const count = Number(process.env.BENCH_CLONES ?? 500);

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'arbor-bench-csi-'));
  const socket = path.join(dir, 'csi.sock');
  let server: ChildProcess | undefined;
  try {
    const dataDir = path.join(dir, 'data');
    server = spawn(
      process.execPath,
      [cli, '--data-dir', dataDir, 'serve', '--nbd-socket', path.join(dir, 'nbd.sock'), '--csi-endpoint', `unix://${socket}`, '--node-id', 'bench'],
      {
        stdio: 'ignore',
        env: { ...process.env, ARBOR_LOG_LEVEL: 'warn' },
      },
    );
    for (let i = 0; i < 200 && !fs.existsSync(socket); i++) await new Promise((r) => setTimeout(r, 50));
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
    const csi = csiClient(socket);
    const goldenId = ((await csi.controller.ListVolumes({})).entries as Array<{ volume: { volume_id: string } }>)[0].volume.volume_id;
    const snapshot = ((await csi.controller.CreateSnapshot({ source_volume_id: goldenId, name: 'gold' })).snapshot as { snapshot_id: string }).snapshot_id;
    const request = (name: string) => ({
      name,
      volume_capabilities: [{ access_mode: { mode: 'SINGLE_NODE_WRITER' }, block: {} }],
      volume_content_source: { snapshot: { snapshot_id: snapshot } },
    });

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
    csi.close();

    const rows = [
      [
        'arbor CreateVolume from snapshot (CSI, 1 at a time)',
        fmt(percentile(sequential, 50)),
        fmt(percentile(sequential, 99)),
        fmt(1000 / (sequential.reduce((a, b) => a + b, 0) / sequential.length), 0),
      ],
      ['arbor CreateVolume from snapshot (CSI, 16 in flight)', '-', '-', fmt(parallelPerSecond, 0)],
      [
        'qemu-img create -b (qcow2 overlay on the raw golden)',
        fmt(percentile(qemu, 50)),
        fmt(percentile(qemu, 99)),
        fmt(1000 / (qemu.reduce((a, b) => a + b, 0) / qemu.length), 0),
      ],
    ];
    printTable(`golden-image clones: ${count} clones of a 1 GiB golden volume, ${os.cpus().length} cores`, ['how', 'p50 ms', 'p99 ms', 'clones/s'], rows);
    console.log(`\narbor / qemu-img overlay: p50 latency ${fmt(percentile(sequential, 50) / percentile(qemu, 50))}x`);
  } finally {
    await stopServer(server);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

runBenchmark(main);
