/**
 * npm run bench:migrate — in the same run:
 *   (a) qemu-nbd   live migration of a writing guest (QEMU, TCG) whose disk is one raw
 *                  file served by qemu-nbd to both VMs: the baseline
 *   (b) arbor      the same migration on Arbor in embedded mode: the source VM on the
 *                  data node's unix socket, the target on a relay node's (NBD relayed to
 *                  the data node over mutual TLS)
 *       BENCH_MIGRATIONS times each (default 3), alternating; prints the total
 *       migration time and the guest's longest write stall (median and worst), and
 *       Arbor's ratios to the baseline. Every run's volume is checked as the tests do.
 *   (c) fio (nbd engine) 4 KiB random read and write at QD16 on one volume, through
 *       the data node's socket (local attach) and the relay node's (remote attach),
 *       BENCH_RUNTIME seconds each after a 2 s ramp (default 10): IOPS and remote/local.
 * The volumes (qemu-nbd's raw files, the nodes' data directories) are on disk, in a
 * temporary directory removed at the end.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { requireCommands, spawnDaemon, waitFor } from '../test/support/etcd';
import { EmbeddedNodes, startEmbeddedNodes } from '../test/support/migration/arbor-nodes';
import { runMigrationBetweenServers } from '../test/support/migration/between-servers';
import { defaultBlocks } from '../test/support/migration/limits';
import { MigrationRun, runMigration } from '../test/support/migration/migrate';
import { describeRun } from '../test/support/migration/report';
import { blockBytes } from '../test/support/migration/stamp';
import { rawImageReader } from '../test/support/migration/verify';
import { tempDir } from '../test/support/tmp';
import { fioNbd, FioResult, fmt, printTable, runBenchmark, settleDisk, Workload, workloads } from './support';

const migrations = Number(process.env.BENCH_MIGRATIONS ?? 3);
const runtime = Number(process.env.BENCH_RUNTIME ?? 10);
const fioVolumeBytes = 1024 * 1024 * 1024;
const randomWorkloads = workloads.filter((w) => w.bs === '4k');

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

/** One migration with both VMs on a fresh raw file that qemu-nbd serves on one socket. */
async function qemuNbdMigration(dir: string, i: number): Promise<MigrationRun> {
  const image = path.join(dir, `qemu-nbd-${i}.raw`);
  const socketPath = path.join(dir, `qemu-nbd-${i}.sock`);
  fs.writeFileSync(image, Buffer.alloc(0));
  fs.truncateSync(image, defaultBlocks * blockBytes);
  const args = ['--persistent', '--shared=4', '--format=raw', '--socket', socketPath, '--export-name', 'disk', image];
  const daemon = spawnDaemon('qemu-nbd', 'qemu-nbd', args, path.join(dir, `qemu-nbd-${i}.log`));
  try {
    await waitFor(`qemu-nbd serving ${image}`, 10_000, daemon, async () => fs.existsSync(socketPath));
    return await runMigration({ disk: { socketPath, exportName: 'disk' }, readBlock: rawImageReader(image) });
  } finally {
    await daemon.stop();
  }
}

/** One migration from the data node's socket to the relay node's, on a fresh volume. */
async function arborMigration(nodes: EmbeddedNodes, i: number): Promise<MigrationRun> {
  const name = `vm-disk-${i}`;
  await nodes.dataNode.cliOk('volume', 'create', name, '--size', '64MiB');
  return runMigrationBetweenServers({
    exportName: name,
    sourceSocket: nodes.dataNode.nbdSocket,
    targetSocket: nodes.relayNode.nbdSocket,
    verifySocket: nodes.dataNode.nbdSocket,
  });
}

function migrationRow(setup: string, runs: MigrationRun[]): string[] {
  const totals = runs.map((run) => run.totalMs);
  const stalls = runs.map((run) => run.longestStallMs);
  return [
    setup,
    String(runs.length),
    fmt(median(totals), 0),
    fmt(Math.max(...totals), 0),
    fmt(median(runs.map((run) => run.qemu.downtimeMs ?? NaN)), 0),
    fmt(median(stalls), 0),
    fmt(Math.max(...stalls), 0),
    fmt(median(runs.map((run) => run.typicalGapMs)), 1),
  ];
}

async function main(): Promise<void> {
  requireCommands(
    ['qemu-system-x86_64', 'qemu-nbd', 'modprobe', 'openssl', 'fio'],
    'qemu-system-x86 qemu-utils linux-image-amd64 busybox-static kmod openssl fio',
  );
  if (!Number.isInteger(migrations) || migrations < 1) throw new Error(`BENCH_MIGRATIONS must be a positive integer, not ${process.env.BENCH_MIGRATIONS}`);
  // On disk, as a node's data would be: the guest's every write is fsync'd through to it.
  const dir = tempDir('arbor-bench-migrate-');
  let nodes: EmbeddedNodes | undefined;
  try {
    nodes = await startEmbeddedNodes(path.join(dir.dir, 'arbor'));
    const runs: Record<'qemu-nbd' | 'arbor', MigrationRun[]> = { 'qemu-nbd': [], arbor: [] };
    const problems: string[] = [];
    for (let i = 1; i <= migrations; i++) {
      for (const setup of ['qemu-nbd', 'arbor'] as const) {
        const run = setup === 'qemu-nbd' ? await qemuNbdMigration(dir.dir, i) : await arborMigration(nodes, i);
        process.stderr.write(`${describeRun(`${setup} #${i}`, run)}\n`);
        problems.push(...run.problems.map((problem) => `${setup} #${i}: ${problem}`));
        runs[setup].push(run);
      }
    }

    process.stderr.write(`filling a ${fioVolumeBytes / 1024 / 1024} MiB volume for fio through the data node...\n`);
    await nodes.dataNode.cliOk('volume', 'create', 'fio', '--size', String(fioVolumeBytes));
    const local = nodes.dataNode.uri('fio');
    const remote = nodes.relayNode.uri('fio');
    // Written through once, so the random reads read data and the random writes overwrite it.
    execFileSync(
      'fio',
      ['--name=fill', '--ioengine=nbd', `--uri=${local}`, '--rw=write', '--bs=1m', '--iodepth=4', `--size=${fioVolumeBytes}`, '--output-format=terse'],
      {
        stdio: 'ignore',
      },
    );
    const fio: Array<{ w: Workload; local: FioResult; remote: FioResult }> = [];
    for (const w of randomWorkloads) {
      process.stderr.write(`${w.name}, local and remote...\n`);
      settleDisk();
      const l = fioNbd(local, w, fioVolumeBytes, runtime);
      settleDisk();
      const r = fioNbd(remote, w, fioVolumeBytes, runtime);
      fio.push({ w, local: l, remote: r });
    }

    const headers = [
      'setup',
      'runs',
      'total ms (median)',
      'total ms (max)',
      'QEMU downtime ms',
      'longest stall ms (median)',
      'longest stall ms (max)',
      'typical gap ms',
    ];
    printTable(`live migration of a writing guest (QEMU TCG, ${os.cpus().length} cores), host-measured`, headers, [
      migrationRow('qemu-nbd, one raw file', runs['qemu-nbd']),
      migrationRow('arbor embedded, data node -> relay node', runs.arbor),
    ]);
    const ratio = (pick: (run: MigrationRun) => number) => fmt(median(runs.arbor.map(pick)) / median(runs['qemu-nbd'].map(pick)));
    printTable(
      'arbor / qemu-nbd (medians; lower is better)',
      ['total migration time', 'longest write stall'],
      [[ratio((run) => run.totalMs), ratio((run) => run.longestStallMs)]],
    );
    printTable(
      `fio --ioengine=nbd on one volume, ${runtime} s per run after 2 s ramp: local attach (data node's socket) vs remote (relay node's, mutual TLS)`,
      ['workload', 'local IOPS', 'remote IOPS', 'remote / local', 'local p50/p99 µs', 'remote p50/p99 µs'],
      fio.map(({ w, local: l, remote: r }) => [
        w.name,
        fmt(l.iops, 0),
        fmt(r.iops, 0),
        fmt(r.iops / l.iops),
        `${fmt(l.p50us, 0)}/${fmt(l.p99us, 0)}`,
        `${fmt(r.p50us, 0)}/${fmt(r.p99us, 0)}`,
      ]),
    );
    if (problems.length > 0) throw new Error(`the volume or the guest's writes were wrong after a migration:\n${problems.join('\n')}`);
  } finally {
    if (nodes) await nodes.stop();
    dir.cleanup();
  }
}

runBenchmark(main);
