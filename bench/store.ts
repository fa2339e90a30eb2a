/**
 * npm run bench:store — what the copy-on-write engine costs, measured on this
 * machine in one run, as ratios so the noise of a shared VM cancels out:
 *   1. snapshot and clone latency on a 1 GiB and a 64 GiB volume, each holding 1 GiB
 *      (equal latencies = O(1) in volume size);
 *   2. 4 KiB random reads through a clone at depth 1 and at depth 100 (equal = depth
 *      costs nothing), beside qemu-img bench through a qcow2 backing chain of the
 *      same depths;
 *   3. writes to a volume's own extents, then the first write to each extent after a
 *      snapshot (the copy-on-write).
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { openDataDir } from '../store/embedded';
import { Store } from '../store/store';
import { fmt, have, nowMs, percentile, permutation, printTable, settleDisk, timeEach, runBenchmark } from './support';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

async function fill(store: Store, name: string, sizeBytes: number, bytes: number): Promise<void> {
  await store.createVolume(name, { sizeBytes });
  const volume = await store.openVolume({ name });
  const chunk = Buffer.alloc(4 * MiB);
  for (let i = 0; i < chunk.length; i += 4) chunk.writeUInt32LE((i * 2654435761) >>> 0, i);
  const chunks = bytes / chunk.length;
  const stride = Math.floor(sizeBytes / chunks / chunk.length) * chunk.length;
  for (let i = 0; i < chunks; i++) await volume.write(i * stride, chunk);
  await volume.flush();
}

async function branchingLatency(store: Store): Promise<void> {
  const rows: string[][] = [];
  const results: Record<string, { snap: number[]; clone: number[] }> = {};
  for (const [label, size] of [
    ['1 GiB', GiB],
    ['64 GiB', 64 * GiB],
  ] as const) {
    const name = `lat-${size}`;
    process.stderr.write(`writing 1 GiB into the ${label} volume...\n`);
    await fill(store, name, size, GiB);
    settleDisk();
    const snap = await timeEach(200, (i) => store.createSnapshot({ name }, `${name}-s${i}`).then(() => {}));
    const clone = await timeEach(200, (i) => store.cloneVolume(`${name}-c${i}`, { snapshot: { name: `${name}-s${i}` } }).then(() => {}));
    results[label] = { snap, clone };
    rows.push([label, fmt(percentile(snap, 50)), fmt(percentile(snap, 99)), fmt(percentile(clone, 50)), fmt(percentile(clone, 99))]);
  }
  const ratio = (kind: 'snap' | 'clone', p: number) => fmt(percentile(results['64 GiB'][kind], p) / percentile(results['1 GiB'][kind], p));
  rows.push(['64 GiB / 1 GiB', ratio('snap', 50), ratio('snap', 99), ratio('clone', 50), ratio('clone', 99)]);
  printTable('1. snapshot and clone latency, ms (1 GiB written in each volume)', ['volume', 'snapshot p50', 'snapshot p99', 'clone p50', 'clone p99'], rows);
}

async function randomReads(read: (offset: number) => Promise<void>, spanBytes: number, count: number): Promise<number> {
  const pages = permutation(spanBytes / 4096, 7).slice(0, count);
  const started = nowMs();
  for (const page of pages) await read(page * 4096);
  return count / ((nowMs() - started) / 1000);
}

async function depthReads(store: Store, dir: string): Promise<void> {
  const span = 256 * MiB;
  process.stderr.write('building 100 generations of clones...\n');
  await fill(store, 'gen0', span, span);
  for (let g = 1; g <= 100; g++) {
    await store.createSnapshot({ name: `gen${g - 1}` }, `gen${g - 1}-s`);
    await store.cloneVolume(`gen${g}`, { snapshot: { name: `gen${g - 1}-s` } });
    const volume = await store.openVolume({ name: `gen${g}` });
    await volume.write(g * 1024 * 1024, Buffer.alloc(4096, g));
    await volume.flush();
  }
  const buffer = Buffer.allocUnsafe(4096);
  const reader = (name: string) => async () => {
    const volume = await store.openVolume({ name });
    return (offset: number) => volume.readInto(offset, buffer, 0, 4096);
  };
  const count = 50000;
  settleDisk();
  await randomReads(await reader('gen1')(), span, count); // warm the page cache and node cache
  const depth1 = await randomReads(await reader('gen1')(), span, count);
  const depth100 = await randomReads(await reader('gen100')(), span, count);
  const rows = [['arbor clone', fmt(depth1, 0), fmt(depth100, 0), fmt(depth100 / depth1)]];
  if (have('qemu-img')) {
    process.stderr.write('building a qcow2 backing chain of depth 100 for comparison...\n');
    const q = path.join(dir, 'qcow2');
    fs.mkdirSync(q);
    const base = path.join(q, 'base.raw');
    const fd = fs.openSync(base, 'w');
    const chunk = Buffer.alloc(4 * MiB, 0x5a);
    for (let at = 0; at < span; at += chunk.length) fs.writeSync(fd, chunk, 0, chunk.length, at);
    fs.closeSync(fd);
    let previous = base;
    let previousFormat = 'raw';
    for (let g = 1; g <= 100; g++) {
      const layer = path.join(q, `gen${g}.qcow2`);
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', previous, '-F', previousFormat, layer]);
      execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P ${g} ${g * MiB} 4k`, layer], { stdio: 'ignore' });
      previous = layer;
      previousFormat = 'qcow2';
    }
    // qemu-img bench reads sequentially with a step; a large odd step scatters the reads.
    const qemuBench = (file: string): number => {
      const started = nowMs();
      execFileSync('qemu-img', [
        'bench',
        '-q',
        '-f',
        'qcow2',
        '-c',
        String(count),
        '-d',
        '1',
        '-s',
        '4096',
        '-S',
        String(4096 * 8191),
        '-t',
        'writeback',
        file,
      ]);
      return count / ((nowMs() - started) / 1000);
    };
    qemuBench(path.join(q, 'gen1.qcow2'));
    const q1 = qemuBench(path.join(q, 'gen1.qcow2'));
    const q100 = qemuBench(path.join(q, 'gen100.qcow2'));
    rows.push(['qcow2 chain (qemu-img bench)', fmt(q1, 0), fmt(q100, 0), fmt(q100 / q1)]);
  }
  printTable('2. 4 KiB random reads through a clone (reads/s, in-process, page cache warm)', ['', 'depth 1', 'depth 100', 'depth 100 / depth 1'], rows);
}

async function copyOnWriteCost(store: Store): Promise<void> {
  const size = 256 * MiB;
  await fill(store, 'cow', size, size);
  const volume = await store.openVolume({ name: 'cow' });
  const extentSize = volume.extentSizeBytes;
  const order = permutation(size / extentSize, 11);
  const rows: string[][] = [];
  for (const writeSize of [4096, extentSize]) {
    const data = Buffer.alloc(writeSize, 0x33);
    const run = async (): Promise<{ iops: number; microsEach: number; flushMs: number }> => {
      const started = nowMs();
      for (const extent of order) await volume.write(extent * extentSize, data);
      const written = nowMs();
      await volume.flush();
      return { iops: order.length / ((nowMs() - started) / 1000), microsEach: ((written - started) * 1000) / order.length, flushMs: nowMs() - written };
    };
    settleDisk();
    const owned = await run();
    await store.createSnapshot({ name: 'cow' }, `cow-${writeSize}`);
    settleDisk();
    const after = await run();
    rows.push([
      `${writeSize / 1024} KiB`,
      fmt(owned.iops, 0),
      fmt(owned.microsEach, 1),
      fmt(owned.flushMs, 0),
      fmt(after.iops, 0),
      fmt(after.microsEach, 1),
      fmt(after.flushMs, 0),
      fmt(after.iops / owned.iops),
    ]);
  }
  printTable(
    `3. ${order.length} writes, one per extent in random order, to the volume's own extents, then the same after a snapshot (copy-on-write); extent ${extentSize / 1024} KiB; IOPS include the flush at the end`,
    ['write', 'own IOPS', 'own µs/write', 'own flush ms', 'after-snap IOPS', 'after-snap µs/write', 'after-snap flush ms', 'after / own'],
    rows,
  );
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'arbor-bench-'));
  try {
    const store = await openDataDir(path.join(dir, 'data'));
    console.log(`arbor bench:store on ${os.cpus().length} cores, data in ${dir}`);
    await branchingLatency(store);
    await depthReads(store, dir);
    await copyOnWriteCost(store);
    await store.close();
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

runBenchmark(main);
