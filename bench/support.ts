import { ChildProcess, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

/** Percentile of a sorted copy (nearest rank). */
export function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))];
}

export function nowMs(): number {
  return Number(process.hrtime.bigint()) / 1e6;
}

export async function timeEach(count: number, fn: (i: number) => Promise<void>): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < count; i++) {
    const started = nowMs();
    await fn(i);
    out.push(nowMs() - started);
  }
  return out;
}

export function fmt(n: number, digits = 2): string {
  return n >= 100 ? n.toFixed(0) : n.toFixed(digits);
}

export function have(command: string): boolean {
  try {
    execFileSync('which', [command], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

export function printTable(title: string, headers: string[], rows: string[][]): void {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  console.log(`\n${title}`);
  console.log(headers.map((h, i) => h.padEnd(widths[i])).join('  '));
  for (const row of rows) console.log(row.map((c, i) => c.padEnd(widths[i])).join('  '));
}

/** A seeded permutation of 0..n-1, so every run does the same I/O pattern. */
export function permutation(n: number, seed: number): number[] {
  const out = Array.from({ length: n }, (_, i) => i);
  let x = seed >>> 0 || 1;
  for (let i = n - 1; i > 0; i--) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    const j = x % (i + 1);
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

/** Waits for the page cache to be written back, so one phase's writes do not slow the next one down. */
export function settleDisk(): void {
  execFileSync('sync');
}

/**
 * What new data costs this machine's page cache beside the same bytes over cached
 * pages: 1 MiB pwrites from one thread, into a new file, then over it again. A server
 * that writes new data (a first copy-on-write write, a new blob) pays the first; one
 * that overwrites a file already cached (nbdkit on a raw copy) pays the second. On a
 * VM whose freed memory goes back to the host (virtio-balloon free page reporting),
 * every page the cache takes anew costs a fault in the host.
 */
export function pageCacheWrites(dir: string, bytes = 1024 * 1024 * 1024): { newMibs: number; cachedMibs: number } {
  const file = path.join(dir, 'page-cache-probe');
  const chunk = Buffer.alloc(1024 * 1024, 0x5a);
  const pass = (fd: number): number => {
    const started = nowMs();
    for (let at = 0; at < bytes; at += chunk.length) fs.writeSync(fd, chunk, 0, chunk.length, at);
    return bytes / (1024 * 1024) / ((nowMs() - started) / 1000);
  };
  const fd = fs.openSync(file, 'w+');
  try {
    const newMibs = pass(fd);
    return { newMibs, cachedMibs: pass(fd) };
  } finally {
    fs.closeSync(fd);
    fs.rmSync(file, { force: true });
  }
}

/** Stops a server the benchmark started (SIGTERM by PID) and waits until it has exited. */
export async function stopServer(server: ChildProcess | undefined): Promise<void> {
  if (!server || server.exitCode !== null || server.signalCode !== null) return;
  const exited = new Promise((resolve) => server.once('exit', resolve));
  server.kill('SIGTERM');
  await exited;
}

/** Runs a benchmark's main; a failure prints and exits 1. */
export function runBenchmark(main: () => Promise<void>): void {
  main().catch((err) => {
    console.error(err);
    process.exit(1);
  });
}

export interface Workload {
  name: string;
  rw: string;
  bs: string;
  iodepth: number;
}

export const workloads: Workload[] = [
  { name: '4 KiB random read, QD16', rw: 'randread', bs: '4k', iodepth: 16 },
  { name: '4 KiB random write, QD16', rw: 'randwrite', bs: '4k', iodepth: 16 },
  { name: '1 MiB sequential read, QD4', rw: 'read', bs: '1m', iodepth: 4 },
  { name: '1 MiB sequential write, QD4', rw: 'write', bs: '1m', iodepth: 4 },
];

export interface FioResult {
  iops: number;
  mibs: number;
  p50us: number;
  p99us: number;
  /** I/Os completed in the timed part (after the ramp). */
  ios: number;
}

/**
 * One fio run over NBD (its nbd engine) against `uri`: time-based after a 2 s ramp,
 * or (`timeBased` false) one pass of what `extra` asks for.
 */
export function fioNbd(uri: string, w: Workload, sizeBytes: number, runtimeSeconds: number, extra: string[] = [], timeBased = true): FioResult {
  const out = execFileSync('fio', ['--ioengine=nbd', `--uri=${uri}`, ...fioJobArgs(w, sizeBytes, runtimeSeconds, timeBased), ...extra], {
    encoding: 'utf8',
    maxBuffer: 64 * 1024 * 1024,
  });
  return fioResult(out, w);
}

/** The job every fio run here shares, whatever it runs against: the workload, time-based after a 2 s ramp, JSON out. */
export function fioJobArgs(w: Workload, sizeBytes: number, runtimeSeconds: number, timeBased = true): string[] {
  return [
    '--name=bench',
    `--rw=${w.rw}`,
    `--bs=${w.bs}`,
    `--iodepth=${w.iodepth}`,
    `--size=${sizeBytes}`,
    ...(timeBased ? [`--runtime=${runtimeSeconds}`, '--ramp_time=2', '--time_based'] : []),
    '--randrepeat=0',
    '--output-format=json',
  ];
}

/**
 * One fio run with one job per URI, all at once (time-based after a 2 s ramp): the
 * jobs' summed throughput, and the completion latency over all of them.
 */
export function fioMany(uris: string[], w: Workload, sizeBytes: number, runtimeSeconds: number): FioResult {
  const global = [
    '--ioengine=nbd',
    `--rw=${w.rw}`,
    `--bs=${w.bs}`,
    `--iodepth=${w.iodepth}`,
    `--size=${sizeBytes}`,
    `--runtime=${runtimeSeconds}`,
    '--ramp_time=2',
    '--time_based',
    '--randrepeat=0',
    '--group_reporting',
    '--output-format=json',
  ];
  const jobs = uris.flatMap((uri, i) => [`--name=volume${i}`, `--uri=${uri}`]);
  const out = execFileSync('fio', [...global, ...jobs], { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
  return fioResult(out, w);
}

/** Throughput and completion latency of the workload's direction, from fio's JSON (which may follow other output). */
export function fioResult(out: string, w: Workload): FioResult {
  const job = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
  const side = w.rw.includes('read') ? job.read : job.write;
  const pct = side.clat_ns.percentile as Record<string, number>;
  return { iops: side.iops, mibs: side.bw_bytes / 1024 / 1024, p50us: pct['50.000000'] / 1000, p99us: pct['99.000000'] / 1000, ios: side.total_ios };
}

/** One of an issue's targets: what was measured, the bound, and whether it holds. */
export interface TargetResult {
  target: string;
  measured: string;
  bound: string;
  met: boolean;
}

/** `value` against a lower (`atLeast`) or upper (`below`) bound, printed with `digits`. */
export function checkTarget(target: string, value: number, bound: { atLeast?: number; below?: number }, unit = 'x', digits = 2): TargetResult {
  const met = bound.atLeast !== undefined ? value >= bound.atLeast : value < bound.below!;
  const boundText = bound.atLeast !== undefined ? `>= ${bound.atLeast}${unit}` : `< ${bound.below}${unit}`;
  return { target, measured: `${fmt(value, digits)}${unit}`, bound: boundText, met };
}

export function printTargets(title: string, results: TargetResult[]): void {
  printTable(
    title,
    ['target', 'measured', 'bound', ''],
    results.map((r) => [r.target, r.measured, r.bound, r.met ? 'met' : 'MISSED']),
  );
}
