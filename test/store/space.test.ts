import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { Log } from '../../lib/logger';
import { openDataDir } from '../../store/embedded';
import { isArborError, isDiskFull } from '../../store/errors';
import { Random, seedFromEnv } from '../support/random';
import { tempDir } from '../support/tmp';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

/** A log that keeps each line as "level message". */
function recordingLog(lines: string[]): Log {
  const keep = (level: string) => (message: string) => void lines.push(`${level} ${message}`);
  return { debug: keep('debug'), info: keep('info'), warn: keep('warn'), error: keep('error') };
}

/** Writes `file` until its filesystem is full. */
function fillDisk(file: string): void {
  const fd = fs.openSync(file, 'w');
  try {
    for (const size of [MiB, 4096]) {
      try {
        for (;;) fs.writeSync(fd, Buffer.alloc(size, 1));
      } catch (err) {
        if (!isDiskFull(err)) throw err;
      }
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** Disk space the directory really uses (du counts allocated blocks, not file sizes). */
function diskUsage(dir: string): number {
  return Number(execFileSync('du', ['-s', '-B1', dir], { encoding: 'utf8' }).split('\t')[0]);
}

describe('space: disk usage follows written data, not volume size', function () {
  this.timeout(120_000);

  it('64 MiB written to a 64 GiB volume, its snapshot and a clone use about 64 MiB, and nothing once deleted', async () => {
    const dir = tempDir();
    try {
      const store = await openDataDir(dir.dir);
      const empty = diskUsage(dir.dir);
      await store.createVolume('big', { sizeBytes: 64 * GiB });
      const big = await store.openVolume({ name: 'big' });
      const rng = new Random(1);
      for (let i = 0; i < 16; i++) await big.write(i * 4 * GiB, rng.bytes(4 * MiB));
      await big.flush();
      const written = diskUsage(dir.dir) - empty;
      assert.ok(written >= 64 * MiB && written < 72 * MiB, `64 MiB written takes ${written} bytes`);
      await store.createSnapshot({ name: 'big' }, 'snap');
      await store.cloneVolume('clone', { snapshot: { name: 'snap' } });
      await (await store.openVolume({ name: 'clone' })).write(0, rng.bytes(4 * MiB));
      await store.collectGarbage();
      const shared = diskUsage(dir.dir) - empty;
      assert.ok(shared < written + 6 * MiB, `snapshot and clone share the data: ${shared} bytes after overwriting 4 MiB of the clone`);
      await store.deleteVolume({ name: 'clone' });
      await store.deleteVolume({ name: 'big' });
      await store.deleteSnapshot({ name: 'snap' });
      await store.collectGarbage();
      assert.deepEqual(await store.ctx.blobs.list(), []);
      await store.close();
      const left = diskUsage(dir.dir);
      assert.ok(left < empty + 1 * MiB, `after deleting everything the directory holds ${left} bytes (empty: ${empty})`);
    } finally {
      dir.cleanup();
    }
  });
});

/**
 * A store whose disk fills up: a real small filesystem (tmpfs, mounted here: the tests
 * run as root, as .ci/run does) under the data directory. Seeded random writes, trims,
 * flushes and reads against a model of the volume's 4 KiB blocks; a write refused for
 * want of space may have landed in part, so its blocks become unknown. What must hold:
 * writes fail only with a disk-full error, and only while the disk is full; flushes and
 * trims never fail; every known block reads back, also after the store is reopened; and
 * trimming brings writes back. Replay with ARBOR_FULL_SEED=<seed>.
 */
describe('space: a full disk refuses writes, and flushes, trims and reads go on', function () {
  this.timeout(300_000);
  const seed = seedFromEnv('ARBOR_FULL_SEED');
  const blockBytes = 4096;
  const diskBytes = 24 * MiB;
  const volumeBytes = 96 * MiB;
  const blocks = volumeBytes / blockBytes;
  let mounted: string | undefined;
  let dir: { dir: string; cleanup: () => void };

  before(() => {
    dir = tempDir();
    const dataDir = path.join(dir.dir, 'data');
    fs.mkdirSync(dataDir);
    try {
      execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${diskBytes}`, 'tmpfs', dataDir], { stdio: 'pipe' });
    } catch (err) {
      throw new Error(
        `mounting a ${diskBytes / MiB} MiB tmpfs for the data directory needs root (run the tests as root, as .ci/run does): ${(err as Error).message}`,
      );
    }
    mounted = dataDir;
  });
  after(() => {
    // Lazy: a failed test may leave the store's files open.
    if (mounted) execFileSync('umount', ['-l', mounted]);
    dir.cleanup();
  });

  it(`writes refused while full, everything else goes on, known blocks read back after a reopen (seed ${seed})`, async () => {
    const rng = new Random(seed);
    const logged: string[] = [];
    const log = recordingLog(logged);
    let store = await openDataDir(mounted!, log);
    await store.createVolume('v', { sizeBytes: volumeBytes });
    let volume = await store.openVolume({ name: 'v' });
    // Per block: the seed of its bytes (0: zeros), or -1 once unknown.
    const model = new Int32Array(blocks);
    const bytesOf = (tag: number) => Buffer.alloc(blockBytes, tag % 251);
    const tally = { writes: 0, refused: 0, rawNoSpace: 0, writesAfterRefusal: 0, trims: 0, flushes: 0, reads: 0 };
    let refusedYet = false;
    const check = async (first: number, count: number) => {
      const got = await volume.read(first * blockBytes, count * blockBytes);
      for (let b = 0; b < count; b++) {
        const tag = model[first + b];
        if (tag < 0) continue;
        const expected = tag === 0 ? Buffer.alloc(blockBytes) : bytesOf(tag);
        assert.ok(got.subarray(b * blockBytes, (b + 1) * blockBytes).equals(expected), `block ${first + b} holds what was written (seed ${seed})`);
      }
    };
    let tagSerial = 1;
    for (let op = 0; op < 600; op++) {
      const roll = rng.next();
      if (roll < 0.7) {
        const count = rng.pick([1, 3, 16, 64, 256]);
        const first = rng.int(0, blocks - count);
        const tags = Array.from({ length: count }, () => tagSerial++);
        const data = Buffer.concat(tags.map(bytesOf));
        try {
          await volume.write(first * blockBytes, data);
          tally.writes++;
          if (refusedYet) tally.writesAfterRefusal++;
          tags.forEach((tag, b) => (model[first + b] = tag));
        } catch (err) {
          assert.ok(isArborError(err, 'resource-exhausted') || isDiskFull(err), `a write fails only for want of space: ${(err as Error).message}`);
          if (isArborError(err))
            assert.match(err.message, /volume v: the node's disk under the store is full \(ENOSPC\), so writes are refused; trim or delete volumes/);
          tally.refused++;
          if (!isArborError(err)) tally.rawNoSpace++;
          refusedYet = true;
          model.fill(-1, first, first + count);
        }
      } else if (roll < 0.74) {
        const count = rng.int(1, blocks / 2);
        const first = rng.int(0, blocks - count);
        await volume.trim(first * blockBytes, count * blockBytes);
        model.fill(0, first, first + count);
        tally.trims++;
      } else if (roll < 0.87) {
        await volume.flush();
        tally.flushes++;
      } else {
        const count = rng.int(1, 256);
        await check(rng.int(0, blocks - count), count);
        tally.reads++;
      }
    }
    // Whatever the random part did: fill the volume in order until the disk refuses,
    // flush while full, then trim it all and write again.
    const chunk = MiB / blockBytes;
    let filledTo = 0;
    for (; filledTo < blocks; filledTo += chunk) {
      const tags = Array.from({ length: chunk }, () => tagSerial++);
      try {
        await volume.write(filledTo * blockBytes, Buffer.concat(tags.map(bytesOf)));
        tags.forEach((tag, b) => (model[filledTo + b] = tag));
      } catch (err) {
        assert.ok(isArborError(err, 'resource-exhausted') || isDiskFull(err), `a write fails only for want of space: ${(err as Error).message}`);
        model.fill(-1, filledTo, filledTo + chunk);
        tally.refused++;
        break;
      }
    }
    assert.ok(filledTo < blocks, `a ${volumeBytes / MiB} MiB volume does not fit a ${diskBytes / MiB} MiB disk`);
    await volume.flush();
    await check(0, blocks);
    await volume.trim(0, volumeBytes);
    model.fill(0);
    await volume.flush();
    const tags = Array.from({ length: chunk }, () => tagSerial++);
    await volume.write(0, Buffer.concat(tags.map(bytesOf)));
    tags.forEach((tag, b) => (model[b] = tag));
    await volume.flush();
    await check(0, blocks);

    // The disk filled by another program while the store is open, with writes not yet
    // committed: the commit meets the full disk, the reserve goes back, and the flush
    // still succeeds; writes are refused until the other program's file is gone.
    const late = Array.from({ length: chunk }, () => tagSerial++);
    await volume.write(4 * MiB, Buffer.concat(late.map(bytesOf)));
    late.forEach((tag, b) => (model[4 * chunk + b] = tag));
    fillDisk(path.join(mounted!, 'filler'));
    await volume.flush();
    assert.ok(
      logged.some((line) => line.startsWith('error the store gave its space reserve back')),
      'the reserve went back to the disk',
    );
    await assert.rejects(volume.write(6 * MiB, Buffer.alloc(4096, 1)), (err: unknown) => isArborError(err, 'resource-exhausted'));
    fs.rmSync(path.join(mounted!, 'filler'));
    await new Promise((resolve) => setTimeout(resolve, 300));
    await volume.write(6 * MiB, Buffer.alloc(4096, 9));
    model[6 * chunk] = 9;
    await volume.flush();
    await check(0, blocks);
    await store.close();
    store = await openDataDir(mounted!, log);
    volume = await store.openVolume({ name: 'v' });
    await check(0, blocks);
    await store.close();

    // A disk another program filled while no process held the store: it opens (its reserve
    // gives the room), refuses writes, reads, trims and flushes; writes come back once the
    // other program's file is gone.
    const filler = path.join(mounted!, 'filler');
    fillDisk(filler);
    store = await openDataDir(mounted!, log);
    volume = await store.openVolume({ name: 'v' });
    await assert.rejects(volume.write(2 * MiB, Buffer.alloc(MiB, 7)), (err: unknown) => isArborError(err, 'resource-exhausted'));
    await check(0, blocks);
    await volume.trim(0, MiB);
    model.fill(0, 0, chunk);
    await volume.flush();
    fs.rmSync(filler);
    await new Promise((resolve) => setTimeout(resolve, 300));
    await volume.write(2 * MiB, Buffer.alloc(MiB, 7));
    model.fill(7, 2 * chunk, 3 * chunk);
    await volume.flush();
    await check(0, blocks);
    await store.close();
    process.stderr.write(`      full-disk model: ${JSON.stringify(tally)}, seed ${seed}\n`);
    assert.equal(tally.rawNoSpace, 0, 'the store refuses writes before the disk does (its margin), so commits always fit');
    assert.ok(
      logged.some((line) => line.startsWith('error the disk under the store is full')),
      'the store said the disk is full',
    );
    assert.ok(
      logged.some((line) => line.startsWith('info the disk under the store has room again')),
      'and that it has room again',
    );
  });
});
