/**
 * bench:diff part 3 — the write pause of `arbor volume move` while a writer runs at
 * a steady rate: two `arbor serve` (source and destination data directories, each
 * with its NBD socket), a volume filled on the source, fio writing to it through
 * the source's socket at a fixed rate (QD1), and the move run meanwhile. Reports the
 * pause the move prints and the writer's completion latencies (its max is the pause
 * as a user sees it). While the move does not exist, this section says so.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { Daemon, sleep, spawnDaemon, waitFor } from '../test/support/etcd';
import { fmt, have, printTable } from './support';
import { cliPath as cli } from '../test/support/arbor-server';

const MiB = 1024 * 1024;
const volumeBytes = 256 * MiB;
/** The writer: 4 KiB random writes, one at a time, at this steady rate. */
const writerIops = 200;
const writerBlock = '4k';
/** How long the writer runs before the move starts and after it ends. */
const writerMarginMs = 2000;

/** A write this slow counts as a stall in the report. */
const stallMs = 50;
/** The last round's writes are looked for this much before the pause began as well (the move's clock and fio's are read separately). */
const lastRoundSlackMs = 500;

/**
 * Whether `arbor volume move` exists. Its --help must exit 0 *and* describe the
 * command: help for an unknown command prints the general usage, also with status 0.
 */
export function volumeMoveExists(): boolean {
  const help = spawnSync(process.execPath, [cli, 'volume', 'move', '--help'], { encoding: 'utf8' });
  return help.status === 0 && help.stdout.startsWith('usage: arbor volume move');
}

export interface MoveFigures {
  measured: boolean;
  reason?: string;
  volumeBytes?: number;
  writer?: { iops: number; block: string; writes: number; p50Ms: number; p99Ms: number; maxMs: number; maxAtMs: number; lastRoundStallMs: number };
  move?: { pauseMs: number; totalMs: number; rounds: string[]; switchedConnections: number };
}

function arbor(dataDir: string, ...args: string[]): string {
  const r = spawnSync(process.execPath, [cli, '--data-dir', dataDir, ...args], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`arbor ${args.join(' ')} exited ${r.status}: ${r.stderr}`);
  return r.stdout;
}

async function startServer(dir: string, name: string): Promise<{ daemon: Daemon; dataDir: string; uri: (exportName: string) => string }> {
  const dataDir = path.join(dir, name);
  const nbdSocket = path.join(dir, `${name}.nbd.sock`);
  const daemon = spawnDaemon(
    `arbor serve (${name})`,
    process.execPath,
    [cli, '--data-dir', dataDir, '--log-level', 'warn', 'serve', '--nbd-socket', nbdSocket],
    path.join(dir, `${name}.log`),
  );
  await waitFor(`arbor serve on ${dataDir}`, 30_000, daemon, async () => fs.existsSync(nbdSocket) && fs.existsSync(path.join(dataDir, 'arbor.sock')));
  return { daemon, dataDir, uri: (exportName) => `nbd+unix:///${exportName}?socket=${nbdSocket}` };
}

// ---- 3. volume move write pause ----
export async function volumeMovePause(dir: string): Promise<MoveFigures> {
  if (!volumeMoveExists()) {
    console.log('\n3. volume move write pause: not yet measured (`arbor volume move` does not exist yet)');
    return { measured: false, reason: 'arbor volume move does not exist yet' };
  }
  if (!have('fio')) {
    console.log('\n3. volume move write pause: not measured (fio, the writer, is not installed)');
    return { measured: false, reason: 'fio not installed' };
  }
  const daemons: Daemon[] = [];
  try {
    const source = await startServer(dir, 'move-src');
    daemons.push(source.daemon);
    const destination = await startServer(dir, 'move-dst');
    daemons.push(destination.daemon);
    arbor(source.dataDir, 'volume', 'create', 'moving', '--size', String(volumeBytes));
    const uri = source.uri('moving');
    const fill = spawnSync('fio', [
      '--name=fill',
      '--ioengine=nbd',
      `--uri=${uri}`,
      '--rw=write',
      '--bs=1m',
      '--iodepth=4',
      `--size=${volumeBytes}`,
      '--output-format=terse',
    ]);
    if (fill.status !== 0) throw new Error(`filling the volume to move failed: ${fill.stderr}`);

    // QD1 at a fixed rate, through the source's socket: the connection the move switches.
    const fioOut = path.join(dir, 'move-writer.json');
    const writer = spawnDaemon(
      'fio writer',
      'fio',
      [
        '--name=writer',
        '--ioengine=nbd',
        `--uri=${uri}`,
        '--rw=randwrite',
        `--bs=${writerBlock}`,
        '--iodepth=1',
        `--rate_iops=${writerIops}`,
        `--size=${volumeBytes}`,
        '--time_based',
        '--runtime=600',
        '--randrepeat=0',
        '--output-format=json',
        // Every write's completion latency, stamped with the epoch time it completed: the stalls can be placed against the move.
        `--write_lat_log=${path.join(dir, 'move-writer')}`,
        '--log_avg_msec=0',
        '--log_unix_epoch=1',
      ],
      fioOut,
    );
    daemons.push(writer);
    await sleep(writerMarginMs);
    if (!writer.running()) throw new Error(`the writer ended before the move:\n${writer.logTail()}`);
    const moveStarted = Date.now();
    const moved = spawnSync(process.execPath, [cli, '--data-dir', source.dataDir, 'volume', 'move', 'moving', '--to', destination.dataDir], {
      encoding: 'utf8',
    });
    const moveEnded = Date.now();
    await sleep(writerMarginMs);
    writer.signal('SIGINT');
    await writer.exited;
    if (moved.status !== 0) throw new Error(`arbor volume move exited ${moved.status}: ${moved.stderr}`);
    const report = parseMoveOutput(moved.stdout);
    if (!arbor(destination.dataDir, 'volume', 'list').includes('moving')) throw new Error('after the move the destination has no volume "moving"');

    const text = fs.readFileSync(fioOut, 'utf8');
    const job = JSON.parse(text.slice(text.indexOf('{'))).jobs[0];
    if (job.error !== 0) throw new Error(`the writer saw error ${job.error} during the move`);
    const writes = readLatencyLog(path.join(dir, 'move-writer_clat.1.log'));
    const sorted = writes.map((x) => x.ms).sort((x, y) => x - y);
    const at = (p: number) => sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
    const worst = writes.reduce((x, y) => (y.ms > x.ms ? y : x));
    // The last round's hold ends just before the move does (only its clean-up follows): the writes held there complete in this window.
    const lastRound = writes.filter((x) => x.at >= moveEnded - report.pauseMs - lastRoundSlackMs && x.at <= moveEnded);
    const lastRoundStall = Math.max(0, ...lastRound.map((x) => x.ms));
    const stalls = writes.filter((x) => x.ms >= stallMs && x.at >= moveStarted && x.at <= moveEnded);
    const w = {
      iops: writerIops,
      block: writerBlock,
      writes: writes.length,
      p50Ms: at(50),
      p99Ms: at(99),
      maxMs: worst.ms,
      maxAtMs: worst.at - moveStarted,
      lastRoundStallMs: lastRoundStall,
    };
    const s = (ms: number) => `+${fmt(ms / 1000, 2)} s`;
    printTable(
      `3. arbor volume move of a ${volumeBytes / MiB} MiB volume between two arbor serve; a writer at ${writerIops} IOPS (${writerBlock} random, QD1, fio through the source's NBD socket)`,
      [
        'move ms',
        'rounds',
        'pause ms (move says)',
        'writer stall in last round ms',
        'writer max ms',
        'writer max at',
        'writer p50 ms',
        'writer p99 ms',
        'writes',
      ],
      [
        [
          fmt(report.totalMs, 0),
          String(report.rounds.length),
          fmt(report.pauseMs, 0),
          fmt(lastRoundStall, 0),
          fmt(w.maxMs, 0),
          s(w.maxAtMs),
          fmt(w.p50Ms, 2),
          fmt(w.p99Ms, 2),
          String(w.writes),
        ],
      ],
    );
    console.log(`   rounds: ${report.rounds.join('; ')}`);
    console.log(
      `   writer stalls of ${stallMs} ms or more, after the move command started: ${stalls.map((x) => `${s(x.at - moveStarted)} ${fmt(x.ms, 0)} ms`).join(', ') || 'none'}`,
    );
    return { measured: true, volumeBytes, writer: w, move: report };
  } finally {
    for (const daemon of daemons.reverse()) await daemon.stop();
  }
}

/** The move's summary: "moved volume V (S) in N ms, R rounds; writes paused P ms; C connections switched ...", then a line per round. */
function parseMoveOutput(stdout: string): { pauseMs: number; totalMs: number; rounds: string[]; switchedConnections: number } {
  const summary = /in (\d+) ms, \d+ rounds; writes paused (\d+) ms; (\d+) connections switched/.exec(stdout);
  if (!summary) throw new Error(`cannot read the pause in the move's output:\n${stdout}`);
  const rounds = stdout
    .split('\n')
    .filter((line) => /^\s+round \d+/.test(line))
    .map((line) => line.trim());
  return { totalMs: Number(summary[1]), pauseMs: Number(summary[2]), switchedConnections: Number(summary[3]), rounds };
}

/** fio's completion latency log (log_unix_epoch): "epoch ms, latency ns, direction, block size, offset[, priority]" a line. */
function readLatencyLog(file: string): Array<{ at: number; ms: number }> {
  return fs
    .readFileSync(file, 'utf8')
    .split('\n')
    .filter((line) => line.trim() !== '')
    .map((line) => {
      const [at, ns] = line.split(',').map((field) => Number(field.trim()));
      return { at, ms: ns / 1e6 };
    });
}
