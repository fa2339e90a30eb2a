import assert from 'node:assert/strict';
import { ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { committedMarks } from '../../store/allocator';
import { classOf, serialOf } from '../../store/blob-id';
import { openDataDir } from '../../store/embedded';
import { Store } from '../../store/store';
import { CrashOp, decodeSector, sectorBytes } from '../support/crash-workload';
import { Random, seedFromEnv } from '../support/random';
import { orphanBlobs } from '../support/store-inspect';
import { tempDir } from '../support/tmp';

/**
 * Crash test: a child process runs a write / flush / snapshot / clone / delete / gc
 * workload against a real data directory and is killed with SIGKILL at a random
 * moment. After each kill the store reopens and every sector must hold what a
 * block device may hold after a crash: the last value made durable (by a flush, a
 * FUA write or a snapshot that returned) or a value written after it; every
 * snapshot that returned is byte-identical to the volume when it was taken; no
 * blob id is handed out twice; and gc leaves no orphan.
 */
const kills = Number(process.env.ARBOR_CRASH_KILLS ?? 60);
const seed = seedFromEnv('ARBOR_CRASH_SEED');
const volumeBytes = 2 * 1024 * 1024;
const sectors = volumeBytes / sectorBytes;
const worker = path.join(__dirname, 'crash-worker.js');
/** The largest extent size of the test's volumes. */
const longWriteAlign = 65536;

/** What each sector of a volume must hold: its durable value and the values written after it. */
interface SectorModel {
  durable: Int32Array;
  pending: Map<number, number[]>;
}

type Existence = 'yes' | 'maybe';

describe('crash safety: SIGKILL mid-workload, then reopen', function () {
  this.timeout(20 * 60 * 1000);
  let dir: { dir: string; cleanup: () => void };

  before(() => {
    dir = tempDir();
  });
  after(() => dir.cleanup());

  it(`${kills} kills lose no flushed write, change no snapshot and leak nothing (seed ${seed})`, async () => {
    const rng = new Random(seed);
    const dataDir = path.join(dir.dir, 'data');
    const planFile = path.join(dir.dir, 'plan.json');
    // The state every volume and snapshot is known to hold: sector -> op index (-1 zeros).
    let volumes = new Map<string, Int32Array>();
    let snapshots = new Map<string, Int32Array>();
    let store: Store = await openDataDir(dataDir);
    for (const [i, extent] of [4096, 16384, 65536].entries()) {
      await store.createVolume(`base${i}`, { sizeBytes: volumeBytes, extentSizeBytes: extent });
      volumes.set(`base${i}`, new Int32Array(sectors).fill(-1));
    }
    await store.close();
    let nextK = 1;
    let acknowledgedOps = 0;

    for (let iteration = 0; iteration < kills; iteration++) {
      const plan = planWorkload(rng, nextK, new Set(volumes.keys()), new Set(snapshots.keys()));
      nextK += plan.length;
      fs.writeFileSync(planFile, JSON.stringify(plan));
      const { lastDone, finished } = await runUntilKilled(dataDir, planFile, rng, plan[0].k - 1);
      const done = plan.filter((op) => op.k <= lastDone).length;
      acknowledgedOps += done;

      const expected = replay(plan, lastDone, volumes, snapshots);
      store = await openDataDir(dataDir);
      const context = `seed ${seed}, kill ${iteration}, after op ${lastDone}${finished ? ' (finished)' : ''}`;
      try {
        ({ volumes, snapshots } = await checkStore(store, expected, context));
        await store.collectGarbage();
        assert.deepEqual(await orphanBlobs(store), [], `${context}: gc leaves no orphan`);
        const marks = await committedMarks(store.ctx.catalog);
        const ids = await store.ctx.blobs.list();
        assert.ok(
          ids.every((id) => serialOf(id) < marks[classOf(id)]),
          `${context}: every blob id is below its class's committed mark`,
        );
      } finally {
        await store.close();
      }
    }
    console.log(
      `      seed ${seed}: ${kills} kills, ${acknowledgedOps} operations acknowledged, ${volumes.size} volumes and ${snapshots.size} snapshots at the end`,
    );
  });
});

function planWorkload(rng: Random, firstK: number, volumeNames: Set<string>, snapshotNames: Set<string>): CrashOp[] {
  const volumes = new Set(volumeNames);
  const snaps = new Set(snapshotNames);
  const plan: CrashOp[] = [];
  for (let k = firstK; plan.length < 1500; k++) {
    const kind = rng.weighted({
      write: 50,
      zero: 8,
      flush: 12,
      snap: snaps.size < 12 ? 5 : 0,
      clone: snaps.size > 0 && volumes.size < 8 ? 2 : 0,
      delsnap: snaps.size > 3 ? 3 : 0,
      delvol: volumes.size > 4 ? 2 : 0,
      gc: 1,
    });
    const v = rng.pick([...volumes]);
    // One write in ten is long and aligned, as a guest's sequential write is: whole
    // extents into consecutive new blobs, written as one (in the thread pool).
    const long = rng.chance(0.1);
    const offset = long ? rng.int(0, volumeBytes / longWriteAlign - 1) * longWriteAlign : rng.int(0, sectors - 1) * sectorBytes;
    const length = Math.min(long ? rng.int(4, 16) * longWriteAlign : rng.int(1, 80) * sectorBytes, volumeBytes - offset);
    switch (kind) {
      case 'write':
        plan.push({ t: 'write', k, v, offset, length, fua: rng.chance(0.15) });
        break;
      case 'zero':
        plan.push({ t: 'zero', k, v, offset, length, hole: rng.chance(0.5) });
        break;
      case 'flush':
        plan.push({ t: 'flush', k, v });
        break;
      case 'snap':
        plan.push({ t: 'snap', k, v, s: `s${k}` });
        snaps.add(`s${k}`);
        break;
      case 'clone': {
        const s = rng.pick([...snaps]);
        plan.push({ t: 'clone', k, s, v: `c${k}` });
        volumes.add(`c${k}`);
        break;
      }
      case 'delsnap': {
        const s = rng.pick([...snaps]);
        plan.push({ t: 'delsnap', k, s });
        snaps.delete(s);
        break;
      }
      case 'delvol': {
        const victim = rng.pick([...volumes].filter((name) => !name.startsWith('base')));
        if (!victim) break;
        plan.push({ t: 'delvol', k, v: victim });
        volumes.delete(victim);
        break;
      }
      case 'gc':
        plan.push({ t: 'gc', k });
        break;
    }
  }
  return plan;
}

/** Runs the plan until killed; `lastDone` is the last op the child reported done (`beforeFirst` if none). */
async function runUntilKilled(dataDir: string, planFile: string, rng: Random, beforeFirst: number): Promise<{ lastDone: number; finished: boolean }> {
  const child: ChildProcess = spawn(process.execPath, [worker, dataDir, planFile], { stdio: ['ignore', 'pipe', 'inherit'] });
  let output = '';
  let ready = false;
  // 'close', not 'exit': only then has every line the child wrote been read.
  const exited = new Promise<void>((resolve) => child.once('close', () => resolve()));
  const readyOrExit = new Promise<void>((resolve) => {
    child.stdout!.on('data', (chunk: Buffer) => {
      output += chunk.toString();
      if (!ready && output.includes('ready\n')) {
        ready = true;
        resolve();
      }
    });
    void exited.then(resolve);
  });
  // Now and then kill it while it is still opening the store.
  if (rng.chance(0.1)) await sleep(rng.int(20, 150));
  else {
    await readyOrExit;
    await sleep(rng.int(5, 400));
  }
  child.kill('SIGKILL');
  await exited;
  if (output.includes('error ')) throw new Error(`the crash worker failed by itself:\n${output.slice(output.indexOf('error '))}`);
  const done = [...output.matchAll(/^done (\d+)$/gm)].map((m) => Number(m[1]));
  return { lastDone: done.length ? done[done.length - 1] : beforeFirst, finished: output.includes('finished\n') };
}

interface Expected {
  volumes: Map<string, { model: SectorModel; exists: Existence }>;
  snapshots: Map<string, { sectors: Int32Array; exists: Existence }>;
}

/**
 * What may be in the store after the kill: ops up to `lastDone` returned; the one
 * after it may have done any part of its work.
 */
function replay(plan: CrashOp[], lastDone: number, volumes: Map<string, Int32Array>, snapshots: Map<string, Int32Array>): Expected {
  const expected: Expected = { volumes: new Map(), snapshots: new Map() };
  for (const [name, state] of volumes) expected.volumes.set(name, { model: { durable: state.slice(), pending: new Map() }, exists: 'yes' });
  for (const [name, state] of snapshots) expected.snapshots.set(name, { sectors: state.slice(), exists: 'yes' });
  const latest = (m: SectorModel): Int32Array => {
    const out = m.durable.slice();
    for (const [sector, values] of m.pending) out[sector] = values[values.length - 1];
    return out;
  };
  const makeDurable = (m: SectorModel): void => {
    for (const [sector, values] of m.pending) m.durable[sector] = values[values.length - 1];
    m.pending.clear();
  };
  for (const op of plan) {
    if (op.k > lastDone + 1) break;
    const acknowledged = op.k <= lastDone;
    const exists: Existence = acknowledged ? 'yes' : 'maybe';
    switch (op.t) {
      case 'write':
      case 'zero': {
        const m = expected.volumes.get(op.v)!.model;
        const value = op.t === 'write' ? op.k : -1;
        for (let s = op.offset / sectorBytes; s < (op.offset + op.length) / sectorBytes; s++) {
          if (op.t === 'write' && op.fua && acknowledged) {
            m.durable[s] = value;
            m.pending.delete(s);
          } else {
            const values = m.pending.get(s) ?? [];
            values.push(value);
            m.pending.set(s, values);
          }
        }
        break;
      }
      case 'flush':
        if (acknowledged) makeDurable(expected.volumes.get(op.v)!.model);
        break;
      case 'snap': {
        const m = expected.volumes.get(op.v)!.model;
        expected.snapshots.set(op.s, { sectors: latest(m), exists });
        if (acknowledged) makeDurable(m);
        break;
      }
      case 'clone':
        expected.volumes.set(op.v, { model: { durable: expected.snapshots.get(op.s)!.sectors.slice(), pending: new Map() }, exists });
        break;
      case 'delsnap':
        if (acknowledged) expected.snapshots.delete(op.s);
        else expected.snapshots.get(op.s)!.exists = 'maybe';
        break;
      case 'delvol':
        if (acknowledged) expected.volumes.delete(op.v);
        else expected.volumes.get(op.v)!.exists = 'maybe';
        break;
      case 'gc':
        break;
    }
  }
  return expected;
}

async function readSectors(image: { readInto(o: number, t: Buffer, to: number, l: number): Promise<void> }, what: string): Promise<Int32Array> {
  const data = Buffer.allocUnsafe(volumeBytes);
  await image.readInto(0, data, 0, volumeBytes);
  const out = new Int32Array(sectors);
  for (let s = 0; s < sectors; s++) {
    const value = decodeSector(data, s * sectorBytes, s);
    if (value === undefined) throw new Error(`${what}: sector ${s} holds bytes no operation wrote`);
    out[s] = value;
  }
  return out;
}

async function checkStore(
  store: Store,
  expected: Expected,
  context: string,
): Promise<{ volumes: Map<string, Int32Array>; snapshots: Map<string, Int32Array> }> {
  const volumes = new Map<string, Int32Array>();
  const snapshots = new Map<string, Int32Array>();
  for (const record of await store.listVolumes()) {
    const want = expected.volumes.get(record.name);
    if (!want) throw new Error(`${context}: volume ${record.name} exists but should not`);
    const got = await readSectors(await store.openVolume({ id: record.id }), `${context}: volume ${record.name}`);
    for (let s = 0; s < sectors; s++) {
      const allowed = [want.model.durable[s], ...(want.model.pending.get(s) ?? [])];
      if (!allowed.includes(got[s])) {
        throw new Error(`${context}: volume ${record.name} sector ${s} holds op ${got[s]}; allowed: ${allowed.join(', ')} (durable ${want.model.durable[s]})`);
      }
    }
    volumes.set(record.name, got);
  }
  for (const [name, want] of expected.volumes) {
    if (want.exists === 'yes' && !volumes.has(name)) throw new Error(`${context}: volume ${name} was acknowledged but is gone`);
  }
  for (const record of await store.listSnapshots()) {
    const want = expected.snapshots.get(record.name);
    if (!want) throw new Error(`${context}: snapshot ${record.name} exists but should not`);
    const got = await readSectors(await store.openSnapshot({ id: record.id }), `${context}: snapshot ${record.name}`);
    for (let s = 0; s < sectors; s++) {
      if (got[s] !== want.sectors[s])
        throw new Error(`${context}: snapshot ${record.name} sector ${s} holds op ${got[s]}, it was taken holding ${want.sectors[s]}`);
    }
    snapshots.set(record.name, got);
  }
  for (const [name, want] of expected.snapshots) {
    if (want.exists === 'yes' && !snapshots.has(name)) throw new Error(`${context}: snapshot ${name} was acknowledged but is gone`);
  }
  return { volumes, snapshots };
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
