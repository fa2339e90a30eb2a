/**
 * npm run bench:diff — what the tree diff and the snapshot streams cost, with their
 * peers in the same run (the machine is shared and noisy: read the ratios):
 *   1. Store.diffSnapshots between two snapshots of a 1 GiB and a 64 GiB volume, each
 *      filled with one extent every 16 MiB (every leaf of the map exists) and then
 *      with the same 10 extents changed: median and p99, warm (one open store) and
 *      cold (a freshly opened store each time: the node cache empty, the page cache
 *      not). The ratio 64 GiB / 1 GiB should be ~1: the cost follows the nodes that
 *      differ. Beside it, a byte comparison of the 1 GiB pair: both snapshots read
 *      whole in process and compared extent by extent (the same answer, checked).
 *      Not used: `qemu-img compare` stops at the first difference (it is no diff),
 *      and `cmp -l` took ~17 s for the sparse 1 GiB pair here, which says more about
 *      cmp than about byte comparison.
 *   2. A 1 GiB volume written whole with random data, then 1% of its 64 KiB extents
 *      rewritten: the incremental `snapshot send` against the full one (stream bytes,
 *      seconds to a synced file), and `snapshot receive` of each into a second store;
 *      finding the changes (the tree diff vs reading both snapshots). The peer: qemu-img
 *      convert of a qcow2 overlay holding the same writes over the same raw image, as a
 *      standalone delta (-B) and as a whole image, also synced.
 *   3. The write pause of `arbor volume move` while fio writes at a steady rate
 *      (diff-move.ts).
 * Ends with one JSON line holding every figure (appended to $BENCH_JSONL too, if set).
 * BENCH_DIFF_RUNS (default 200) sets the diff repetitions, warm and cold;
 * BENCH_DIFF_PARTS (default 123) picks the parts to run.
 */
import { spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { Session, openSession } from '../cli/session';
import { receiveSnapshot } from '../cli/stream/receive';
import { sendSnapshot } from '../cli/stream/send';
import { silentLog } from '../lib/logger';
import { Progress } from '../lib/progress';
import { openDataDir } from '../store/embedded';
import { Store } from '../store/store';
import { volumeMovePause } from './diff-move';
import { fmt, have, nowMs, percentile, permutation, printTable, runBenchmark, settleDisk } from './support';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const extentBytes = 64 * KiB;
const chunkBytes = 4 * MiB;
const fillStrideBytes = 16 * MiB;
const changedExtentCount = 10;
const diffRuns = Number(process.env.BENCH_DIFF_RUNS ?? 200);
const parts = process.env.BENCH_DIFF_PARTS ?? '123';
/** Part 2: the share of extents rewritten between the two snapshots. */
const changedFraction = 0.01;

type Figures = Record<string, unknown>;

const benchStarted = nowMs();

/** A phase's start on stderr, with the seconds since the benchmark began (the whole should stay near 3 minutes). */
function progress(line: string): void {
  process.stderr.write(`[${fmt((nowMs() - benchStarted) / 1000, 1)} s] ${line}\n`);
}

function randomBuffer(bytes: number): Buffer {
  return randomFillSync(Buffer.allocUnsafe(bytes));
}

function stats(samples: number[]): { p50: number; p99: number } {
  return { p50: percentile(samples, 50), p99: percentile(samples, 99) };
}

/** Runs a command the benchmark needs; `okStatuses` lists the exit statuses that mean success. */
function run(command: string, args: string[], okStatuses = [0]): string {
  const result = spawnSync(command, args, { encoding: 'utf8', maxBuffer: 64 * MiB });
  if (result.error) throw result.error;
  if (!okStatuses.includes(result.status ?? -1)) throw new Error(`${command} ${args.join(' ')} exited ${result.status}: ${result.stderr}`);
  return result.stdout;
}

function timed<T>(fn: () => T): { value: T; ms: number } {
  const started = nowMs();
  const value = fn();
  return { value, ms: nowMs() - started };
}

async function timedAsync<T>(fn: () => Promise<T>): Promise<{ value: T; ms: number }> {
  const started = nowMs();
  const value = await fn();
  return { value, ms: nowMs() - started };
}

/** The extents (by index) whose bytes differ between two images of one size, found by reading both whole. */
async function byteCompare(
  read: (name: string) => Promise<(offset: number, target: Buffer) => Promise<void>>,
  a: string,
  b: string,
  sizeBytes: number,
): Promise<number[]> {
  const [readA, readB] = [await read(a), await read(b)];
  const [bufA, bufB] = [Buffer.allocUnsafe(chunkBytes), Buffer.allocUnsafe(chunkBytes)];
  const changed: number[] = [];
  for (let offset = 0; offset < sizeBytes; offset += chunkBytes) {
    await readA(offset, bufA);
    await readB(offset, bufB);
    for (let at = 0; at < chunkBytes; at += extentBytes) {
      if (bufA.compare(bufB, at, at + extentBytes, at, at + extentBytes) !== 0) changed.push((offset + at) / extentBytes);
    }
  }
  return changed;
}

function extentsOf(ranges: Array<{ offset: number; length: number }>): number[] {
  return ranges.flatMap((r) => Array.from({ length: r.length / extentBytes }, (_, i) => r.offset / extentBytes + i));
}

function sameList(a: number[], b: number[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

// ---- 1. tree diff cost against volume size ----

/** The same 10 extents in both volumes, spread over the first GiB, each one the fill wrote (so both snapshots hold data there). */
function changedOffsets(): number[] {
  return Array.from({ length: changedExtentCount }, (_, k) => Math.floor((k * GiB) / changedExtentCount / fillStrideBytes) * fillStrideBytes);
}

async function prepareDiffVolume(store: Store, name: string, sizeBytes: number): Promise<void> {
  await store.createVolume(name, { sizeBytes, extentSizeBytes: extentBytes });
  const volume = await store.openVolume({ name });
  for (let offset = 0; offset < sizeBytes; offset += fillStrideBytes) await volume.write(offset, randomBuffer(extentBytes));
  await volume.flush();
  await store.createSnapshot({ name }, `${name}-a`);
  for (const offset of changedOffsets()) await volume.write(offset, randomBuffer(extentBytes));
  await volume.flush();
  await store.createSnapshot({ name }, `${name}-b`);
}

/** Times one diff of each volume per round, alternating which goes first. */
async function diffRounds(store: Store, names: string[], rounds: number, out: Record<string, number[]>, round0 = 0): Promise<void> {
  for (let i = 0; i < rounds; i++) {
    const order = (round0 + i) % 2 === 0 ? names : [...names].reverse();
    for (const name of order) {
      const started = nowMs();
      const ranges = await store.diffSnapshots({ name: `${name}-a` }, { name: `${name}-b` });
      out[name].push(nowMs() - started);
      if (ranges.length !== changedExtentCount) throw new Error(`diff of ${name} found ${ranges.length} ranges, not ${changedExtentCount}`);
    }
  }
}

async function diffCost(dir: string, figures: Figures): Promise<void> {
  const dataDir = path.join(dir, 'diff');
  const volumes = [
    { name: 'v1g', label: '1 GiB', sizeBytes: GiB },
    { name: 'v64g', label: '64 GiB', sizeBytes: 64 * GiB },
  ];
  const names = volumes.map((v) => v.name);
  progress(`1. filling a 1 GiB and a 64 GiB volume (one 64 KiB extent every ${fillStrideBytes / MiB} MiB), changing ${changedExtentCount} extents...`);
  let store = await openDataDir(dataDir);
  for (const v of volumes) await prepareDiffVolume(store, v.name, v.sizeBytes);
  await store.close();
  settleDisk();

  progress(`   ${diffRuns} warm rounds (one store, after 10 rounds to warm it)...`);
  store = await openDataDir(dataDir);
  const warm: Record<string, number[]> = { v1g: [], v64g: [] };
  await diffRounds(store, names, 10, { v1g: [], v64g: [] }); // warm the JIT and the node cache
  await diffRounds(store, names, diffRuns, warm);
  await store.close();

  progress(`   ${diffRuns} cold rounds (a freshly opened store each)...`);
  const cold: Record<string, number[]> = { v1g: [], v64g: [] };
  const opens: number[] = [];
  for (let i = 0; i < diffRuns; i++) {
    const opened = await timedAsync(() => openDataDir(dataDir));
    opens.push(opened.ms);
    store = opened.value;
    await diffRounds(store, names, 1, cold, i);
    await store.close();
  }

  progress('   the byte comparison of the 1 GiB pair...');
  store = await openDataDir(dataDir);
  const reader = async (name: string) => {
    const snapshot = await store.openSnapshot({ name });
    return (offset: number, target: Buffer) => snapshot.readInto(offset, target, 0, target.length);
  };
  const expected = extentsOf(await store.diffSnapshots({ name: 'v1g-a' }, { name: 'v1g-b' }));
  const inProcess = await timedAsync(() => byteCompare(reader, 'v1g-a', 'v1g-b', GiB));
  if (!sameList(inProcess.value, expected)) throw new Error(`the byte comparison found extents ${inProcess.value} where the tree diff found ${expected}`);
  await store.close();

  const w = { v1g: stats(warm.v1g), v64g: stats(warm.v64g) };
  const c = { v1g: stats(cold.v1g), v64g: stats(cold.v64g) };
  const rows = volumes.map((v) => [
    v.label,
    fmt(w[v.name as 'v1g'].p50, 3),
    fmt(w[v.name as 'v1g'].p99, 3),
    fmt(c[v.name as 'v1g'].p50, 3),
    fmt(c[v.name as 'v1g'].p99, 3),
  ]);
  rows.push(['64 GiB / 1 GiB', fmt(w.v64g.p50 / w.v1g.p50), fmt(w.v64g.p99 / w.v1g.p99), fmt(c.v64g.p50 / c.v1g.p50), fmt(c.v64g.p99 / c.v1g.p99)]);
  printTable(
    `1. Store.diffSnapshots, ${changedExtentCount} changed 64 KiB extents, ms over ${diffRuns} runs (cold: store just opened, its open p50 ${fmt(percentile(opens, 50), 1)} ms not counted)`,
    ['volume', 'warm p50', 'warm p99', 'cold p50', 'cold p99'],
    rows,
  );
  const peerRows = [['tree diff, 1 GiB, warm p50 / cold p50', `${fmt(w.v1g.p50, 3)} / ${fmt(c.v1g.p50, 3)}`, '1']];
  peerRows.push(['read both snapshots in process, compare per extent', fmt(inProcess.ms, 0), fmt(inProcess.ms / c.v1g.p50, 0)]);
  printTable('   the same 1 GiB diff done by comparing bytes (one run each)', ['method', 'ms', 'x tree diff cold p50'], peerRows);
  figures.diff = {
    changedExtents: changedExtentCount,
    fillStrideBytes,
    runs: diffRuns,
    warmMs: w,
    coldMs: c,
    storeOpenMsP50: percentile(opens, 50),
    ratio64to1: { warmP50: w.v64g.p50 / w.v1g.p50, warmP99: w.v64g.p99 / w.v1g.p99, coldP50: c.v64g.p50 / c.v1g.p50, coldP99: c.v64g.p99 / c.v1g.p99 },
    byteCompare1GiBMs: inProcess.ms,
  };
}

// ---- 2. incremental send and receive against a full one ----

const quiet = (): Progress => new Progress(new Writable({ write: (_chunk, _encoding, done) => done() }), '');

/** Sends to a file and syncs it, as `arbor snapshot send -o FILE` does. */
async function sendToFile(session: Session, snapshot: string, base: string | undefined, file: string) {
  const record = await session.api.getSnapshot({ name: snapshot });
  const baseRecord = base === undefined ? undefined : await session.api.getSnapshot({ name: base });
  const fd = fs.openSync(file, 'w');
  const output = fs.createWriteStream('', { fd, autoClose: false });
  const sent = await sendSnapshot(session, record, baseRecord, output, quiet);
  await new Promise<void>((resolve, reject) => output.once('error', reject).end(resolve));
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  return sent;
}

async function receiveFromFile(session: Session, file: string, volume: string, snapshot: string) {
  return receiveSnapshot(session, fs.createReadStream(file, { highWaterMark: MiB }), { volume, snapshot }, quiet);
}

/** Writes the whole volume and the raw image with the same random data, then 1% of the extents in both the volume and a qcow2 overlay. */
async function prepareSendVolume(dir: string, dataDir: string): Promise<{ changed: Map<number, Buffer> }> {
  const store = await openDataDir(dataDir);
  try {
    await store.createVolume('src', { sizeBytes: GiB, extentSizeBytes: extentBytes });
    const volume = await store.openVolume({ name: 'src' });
    const raw = fs.openSync(path.join(dir, 'base.raw'), 'w');
    for (let offset = 0; offset < GiB; offset += chunkBytes) {
      const data = randomBuffer(chunkBytes);
      fs.writeSync(raw, data, 0, data.length, offset);
      await volume.write(offset, data);
    }
    fs.closeSync(raw);
    await volume.flush();
    await store.createSnapshot({ name: 'src' }, 's0');
    const extents = GiB / extentBytes;
    const picked = permutation(extents, 14)
      .slice(0, Math.round(extents * changedFraction))
      .sort((a, b) => a - b);
    const changed = new Map(picked.map((extent) => [extent, randomBuffer(extentBytes)]));
    for (const [extent, data] of changed) await volume.write(extent * extentBytes, data);
    await volume.flush();
    await store.createSnapshot({ name: 'src' }, 's1');
    return { changed };
  } finally {
    await store.close();
  }
}

/** The same writes into a qcow2 overlay over base.raw (qemu-io, one process for all of them). */
function writeOverlay(dir: string, changed: Map<number, Buffer>): string {
  const overlay = path.join(dir, 'overlay.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', path.join(dir, 'base.raw'), '-F', 'raw', overlay]);
  const pieces = path.join(dir, 'pieces');
  fs.mkdirSync(pieces);
  const commands: string[] = [];
  for (const [extent, data] of changed) {
    const file = path.join(pieces, String(extent));
    fs.writeFileSync(file, data);
    commands.push('-c', `write -q -s ${file} ${extent * extentBytes} ${extentBytes}`);
  }
  run('qemu-io', ['-f', 'qcow2', ...commands, overlay]);
  return overlay;
}

/** qemu-img convert to a synced file: its time and the file's size. */
function qemuConvert(args: string[], output: string): { ms: number; bytes: number } {
  const { ms } = timed(() => {
    run('qemu-img', ['convert', ...args, output]);
    const fd = fs.openSync(output, 'r');
    fs.fsyncSync(fd);
    fs.closeSync(fd);
  });
  return { ms, bytes: fs.statSync(output).size };
}

async function sendCost(dir: string, figures: Figures): Promise<void> {
  const srcDir = path.join(dir, 'send-src');
  const dstDir = path.join(dir, 'send-dst');
  progress('2. writing 1 GiB of random data into a volume and a raw image, then 1% of the extents...');
  const { changed } = await prepareSendVolume(dir, srcDir);
  const overlay = have('qemu-img') && have('qemu-io') ? writeOverlay(dir, changed) : undefined;
  settleDisk();

  const src = await openSession({ dataDir: srcDir }, silentLog);
  const dst = await openSession({ dataDir: dstDir }, silentLog);
  try {
    progress('   finding the changes: tree diff and byte comparison...');
    const diffs: number[] = [];
    let found: number[] = [];
    for (let i = 0; i < 10; i++) {
      const r = await timedAsync(() => src.api.diffSnapshots({ name: 's0' }, { name: 's1' }));
      diffs.push(r.ms);
      found = extentsOf(r.value);
    }
    if (!sameList(found, [...changed.keys()])) throw new Error(`the tree diff found ${found.length} extents, not the ${changed.size} written`);
    const images = async (name: string) => {
      const image = await src.openImage(`src@${name}`);
      return (offset: number, target: Buffer) => image.readInto(offset, target, 0, target.length);
    };
    const compared = await timedAsync(() => byteCompare(images, 's0', 's1', GiB));
    if (!sameList(compared.value, found)) throw new Error('the byte comparison and the tree diff disagree on the fully written volume');

    progress('   sending full and incremental streams, receiving them into a second store...');
    settleDisk();
    // The full stream is of the base snapshot (the same 1 GiB of random data as s1): the receiver needs it under the incremental one.
    const full = await timedAsync(() => sendToFile(src, 's0', undefined, path.join(dir, 'full.stream')));
    settleDisk();
    const incremental = await timedAsync(() => sendToFile(src, 's1', 's0', path.join(dir, 'incremental.stream')));
    settleDisk();
    const fullReceive = await timedAsync(() => receiveFromFile(dst, path.join(dir, 'full.stream'), 'chain', 's0'));
    settleDisk();
    const incrementalReceive = await timedAsync(() => receiveFromFile(dst, path.join(dir, 'incremental.stream'), 'chain', 's1'));
    await checkReceived(dst, changed);

    let qemu: { delta: { ms: number; bytes: number }; whole: { ms: number; bytes: number } } | undefined;
    if (overlay) {
      progress('   qemu-img convert of the qcow2 overlay, as a delta and whole...');
      settleDisk();
      const delta = qemuConvert(['-f', 'qcow2', '-O', 'qcow2', '-B', path.join(dir, 'base.raw'), '-F', 'raw', overlay], path.join(dir, 'delta.qcow2'));
      settleDisk();
      const whole = qemuConvert(['-f', 'qcow2', '-O', 'qcow2', overlay], path.join(dir, 'whole.qcow2'));
      qemu = { delta, whole };
    }

    const mib = (bytes: number) => fmt(bytes / MiB, 1);
    const s = (ms: number) => fmt(ms / 1000, 2);
    const rows = [
      ['arbor full send (of s0)', mib(full.value.streamBytes), s(full.ms), s(fullReceive.ms)],
      ['arbor incremental send (s0 -> s1)', mib(incremental.value.streamBytes), s(incremental.ms), s(incrementalReceive.ms)],
      [
        'incremental / full',
        fmt(incremental.value.streamBytes / full.value.streamBytes, 4),
        fmt(incremental.ms / full.ms, 4),
        fmt(incrementalReceive.ms / fullReceive.ms, 4),
      ],
    ];
    if (qemu) {
      rows.push(['qemu-img convert overlay -> whole qcow2', mib(qemu.whole.bytes), s(qemu.whole.ms), 'n/a']);
      rows.push(['qemu-img convert -B base: delta qcow2', mib(qemu.delta.bytes), s(qemu.delta.ms), 'n/a']);
      rows.push(['delta / whole', fmt(qemu.delta.bytes / qemu.whole.bytes, 4), fmt(qemu.delta.ms / qemu.whole.ms, 4), '']);
      rows.push(['arbor incremental / qcow2 delta', fmt(incremental.value.streamBytes / qemu.delta.bytes), fmt(incremental.ms / qemu.delta.ms), '']);
    }
    printTable(
      `2. 1 GiB volume of random data, ${changed.size} of ${GiB / extentBytes} 64 KiB extents (${mib(changed.size * extentBytes)} MiB) rewritten; output synced to a file`,
      ['stream', 'MiB', 'send s', 'receive s'],
      rows,
    );
    const d = stats(diffs);
    printTable(
      '   finding the changes between the two snapshots',
      ['method', 'ms', 'x tree diff'],
      [
        ['tree diff (Store.diffSnapshots, p50 of 10)', fmt(d.p50, 2), '1'],
        ['read both snapshots, compare per extent', fmt(compared.ms, 0), fmt(compared.ms / d.p50, 0)],
      ],
    );
    figures.send = {
      changedExtents: changed.size,
      full: { streamBytes: full.value.streamBytes, sendMs: full.ms, receiveMs: fullReceive.ms },
      incremental: { streamBytes: incremental.value.streamBytes, sendMs: incremental.ms, receiveMs: incrementalReceive.ms },
      ratio: { bytes: incremental.value.streamBytes / full.value.streamBytes, send: incremental.ms / full.ms, receive: incrementalReceive.ms / fullReceive.ms },
      qcow2: qemu && { deltaBytes: qemu.delta.bytes, deltaMs: qemu.delta.ms, wholeBytes: qemu.whole.bytes, wholeMs: qemu.whole.ms },
      findChanges: { treeDiffMsP50: d.p50, byteCompareMs: compared.ms },
    };
  } finally {
    await src.close();
    await dst.close();
  }
}

/** The incrementally received snapshot holds the rewritten extents (the receive checked its digest; this checks where the bytes went). */
async function checkReceived(dst: Session, changed: Map<number, Buffer>): Promise<void> {
  const image = await dst.openImage('chain@s1');
  try {
    const buffer = Buffer.allocUnsafe(extentBytes);
    for (const [extent, data] of changed) {
      await image.readInto(extent * extentBytes, buffer, 0, extentBytes);
      if (!buffer.equals(data)) throw new Error(`the received chain@s1 differs from the sent snapshot at extent ${extent}`);
    }
  } finally {
    await image.close();
  }
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'arbor-bench-diff-'));
  const figures: Figures = { bench: 'diff', at: new Date().toISOString(), cores: os.cpus().length };
  const started = nowMs();
  try {
    console.log(`arbor bench:diff on ${os.cpus().length} cores, data in ${dir}`);
    if (parts.includes('1')) await diffCost(dir, figures);
    if (parts.includes('2')) await sendCost(dir, figures);
    if (parts.includes('3')) {
      progress('3. volume move of a written volume between two arbor serve...');
      figures.move = await volumeMovePause(dir);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  figures.totalSeconds = (nowMs() - started) / 1000;
  const line = JSON.stringify(figures);
  console.log(`\n${line}`);
  if (process.env.BENCH_JSONL) fs.appendFileSync(process.env.BENCH_JSONL, `${line}\n`);
}

runBenchmark(main);
