import assert from 'node:assert/strict';
import { isArborError } from '../../store/errors';
import { openDataDir } from '../../store/embedded';
import { decodeVolume, keys } from '../../store/records';
import { Store } from '../../store/store';
import { Random, seedFromEnv } from '../support/random';
import { localSession, receiveFromBuffer, sendToBuffer } from '../support/snapshot-stream';
import { memoryTempDir } from '../support/tmp';

const KiB = 1024;
const seed = seedFromEnv('ARBOR_SEND_SEED');
const steps = Number(process.env.ARBOR_SEND_STEPS ?? 160);

/** Bytes of the extents whose contents differ between two images (the shorter one read as zeros past its end). */
function changedExtentBytes(from: Buffer, to: Buffer, extentSize: number): number {
  let changed = 0;
  for (let offset = 0; offset < to.length; offset += extentSize) {
    const end = Math.min(offset + extentSize, to.length);
    const before = Buffer.alloc(end - offset);
    if (offset < from.length) from.copy(before, 0, offset, Math.min(end, from.length));
    if (!before.equals(to.subarray(offset, end))) changed += end - offset;
  }
  return changed;
}

interface ModelSnapshot {
  name: string;
  volume: string;
  image: Buffer;
}

/**
 * Model-based: random writes (new bytes, the same bytes again, zeros), trims,
 * write-zeroes, a growth and a clone in store A, each snapshot sent to store B (the
 * first in full, then incremental from what B holds, sometimes from an older base
 * with force, and a clone's snapshots from its parent's lineage) and received there
 * through the CLI's own send and receive code, in pieces of random sizes. After
 * each receive B's snapshot and its volume read back as the model says, and an
 * incremental stream carries no more data than the extents that changed.
 * A failure prints its seed; ARBOR_SEND_SEED=<seed> replays it.
 */
describe(`snapshot send and receive against a model of the images (seed ${seed})`, function () {
  this.timeout(120_000);
  let dirs: Array<{ dir: string; cleanup: () => void }> = [];
  let a: Store;
  let b: Store;

  beforeEach(async () => {
    dirs = [memoryTempDir(), memoryTempDir()];
    a = await openDataDir(dirs[0].dir);
    b = await openDataDir(dirs[1].dir);
  });
  afterEach(async () => {
    await a?.close();
    await b?.close();
    for (const d of dirs) d.cleanup();
  });

  for (const extentSize of [4 * KiB, 64 * KiB]) {
    it(`extents of ${extentSize / KiB} KiB: a full stream then a chain of incremental ones reproduce every snapshot byte-exact`, async () => {
      const random = new Random(seed + extentSize);
      const sessionA = localSession(a);
      const sessionB = localSession(b);
      const images = new Map<string, Buffer>();
      const snapshots: ModelSnapshot[] = [];
      /** The snapshots B holds, in the order received; B's volume v reads as the last one. */
      const received: ModelSnapshot[] = [];
      const tally = { full: 0, incremental: 0, olderBase: 0, fromClone: 0, grown: 0, refusedWithoutForce: 0, refusedSmaller: 0, skipped: 0 };
      let step = 0;

      const pieceBytes = () => random.pick([1, 7, 17, 512, 4096, 65536, 1 << 20, 8 << 20]);
      const readVolume = async (store: Store, name: string): Promise<Buffer> => {
        const handle = await store.acquireVolume({ name });
        try {
          return await handle.volume.read(0, handle.volume.sizeBytes);
        } finally {
          await handle.release();
        }
      };

      const transfer = async (snapshot: ModelSnapshot): Promise<void> => {
        const head = received[received.length - 1];
        if (!head) {
          const { stream, summary } = await sendToBuffer(sessionA, snapshot.name);
          const got = await receiveFromBuffer(sessionB, stream, { volume: 'v' }, pieceBytes);
          assert.equal(got.header.base, undefined);
          assert.equal(got.streamBytes, summary.streamBytes);
          tally.full++;
        } else {
          if (head.image.length > snapshot.image.length) {
            // A clone of an earlier, smaller snapshot (or v after c grew): no incremental stream can shrink B's volume.
            await assert.rejects(
              sendToBuffer(sessionA, snapshot.name, head.name),
              (err: unknown) => isArborError(err, 'failed-precondition') && /is smaller than its base .*: volumes only grow/.test(err.message),
            );
            tally.refusedSmaller++;
          }
          // Mostly from what B's volume is at; sometimes from an older snapshot B holds, which only --force may do.
          const olders = received.filter((s) => s !== head && s.image.length <= snapshot.image.length);
          if (head.image.length > snapshot.image.length && olders.length === 0) return void tally.skipped++;
          const older = head.image.length > snapshot.image.length || (olders.length > 0 && random.chance(0.25));
          const base = older ? random.pick(olders) : head;
          const { stream, summary } = await sendToBuffer(sessionA, snapshot.name, base.name);
          const changed = changedExtentBytes(base.image, snapshot.image, extentSize);
          assert.ok(
            summary.dataBytes <= changed,
            `the stream from ${base.name} to ${snapshot.name} carries ${summary.dataBytes} data bytes, ${changed} changed`,
          );
          const diffed = (await a.diffSnapshots({ name: base.name }, { name: snapshot.name })).reduce((sum, r) => sum + r.length, 0);
          assert.equal(summary.coveredBytes, diffed, 'the stream covers the ranges the diff names');
          let got = older
            ? await receiveFromBuffer(sessionB, stream, { volume: 'v' }, pieceBytes).catch((err: unknown) => {
                assert.ok(isArborError(err, 'failed-precondition'), String(err));
                assert.match(err.message, new RegExp(`^volume v was written after @${base.name}; receiving would discard those writes: .*--force`));
                tally.refusedWithoutForce++;
                return undefined;
              })
            : undefined;
          // Without --force, a receive on an older base is accepted only where B's volume is still that base's tree (every stream since changed nothing).
          if (got) assert.ok(head.image.equals(base.image), `a receive on ${base.name} while B is at ${head.name} needs --force`);
          got ??= await receiveFromBuffer(sessionB, stream, { volume: 'v', force: older }, pieceBytes);
          assert.equal(got.header.base?.name, base.name);
          tally.incremental++;
          if (older) tally.olderBase++;
          if (snapshot.volume !== 'v') tally.fromClone++;
        }
        received.push(snapshot);
        const there = await b.getSnapshot({ volume: { name: 'v' }, name: snapshot.name });
        assert.equal(there.volumeName, 'v');
        assert.equal(there.createdAt, (await a.getSnapshot({ name: snapshot.name })).createdAt, 'a received snapshot keeps the time it was taken');
        assert.equal(there.sizeBytes, snapshot.image.length);
        const reader = await b.openSnapshot({ volume: { name: 'v' }, name: snapshot.name });
        assert.ok((await reader.read(0, reader.sizeBytes)).equals(snapshot.image), `B's ${snapshot.name} reads as A's`);
        // Read through a counted use, as an NBD client would: the next receive into v must still be accepted.
        assert.ok((await readVolume(b, 'v')).equals(snapshot.image), `B's volume v reads as ${snapshot.name}`);
      };

      try {
        const size = extentSize * random.int(24, 40);
        await a.createVolume('v', { sizeBytes: size, extentSizeBytes: extentSize });
        images.set('v', Buffer.alloc(size));
        for (step = 0; step < steps; step++) {
          const name = images.has('c') && random.chance(0.35) ? 'c' : 'v';
          const image = images.get(name)!;
          const volume = await a.openVolume({ name });
          const offset = random.int(0, image.length - 1);
          const length = Math.min(random.int(1, 3 * extentSize), image.length - offset);
          const op = random.weighted({ write: 35, same: 6, zeros: 5, trim: 10, writeZeroes: 8, grow: 1.5, clone: 2, snapshot: 10 });
          if (op === 'write' || op === 'zeros') {
            const data = op === 'write' ? random.bytes(length) : Buffer.alloc(length);
            await volume.write(offset, data);
            data.copy(image, offset);
          } else if (op === 'same') {
            // The same bytes again: new blobs, the same contents; the diff must not send them.
            await volume.write(offset, Buffer.from(image.subarray(offset, offset + length)));
          } else if (op === 'trim') {
            await volume.trim(offset, length);
            image.fill(0, offset, offset + length);
          } else if (op === 'writeZeroes') {
            await volume.writeZeroes(offset, length, { noHole: random.chance(0.5), fua: false, fast: false });
            image.fill(0, offset, offset + length);
          } else if (op === 'grow' && image.length < 2 * size) {
            // Not always by whole extents: the last extent of the grown volume may be a part of one.
            const grown = image.length + extentSize * random.int(1, 8) + 512 * random.int(0, 3);
            await a.resizeVolume({ name }, grown);
            images.set(name, Buffer.concat([image, Buffer.alloc(grown - image.length)]));
            tally.grown++;
          } else if (op === 'clone' && !images.has('c') && snapshots.length >= 2) {
            const from = random.pick(snapshots.filter((s) => s.volume === 'v'));
            await a.cloneVolume('c', { snapshot: { name: from.name } });
            images.set('c', Buffer.from(from.image));
          } else if (op === 'snapshot') {
            const snapshot = { name: `s${snapshots.length}`, volume: name, image: Buffer.from(image) };
            await a.createSnapshot({ name }, snapshot.name);
            snapshots.push(snapshot);
            await transfer(snapshot);
          }
        }
        const last = { name: `s${snapshots.length}`, volume: 'v', image: Buffer.from(images.get('v')!) };
        await a.createSnapshot({ name: 'v' }, last.name);
        await transfer(last);
        assert.ok(tally.incremental >= 8, `the run sent ${tally.incremental} incremental streams`);
        assert.deepEqual(
          (await b.listVolumes()).map((v) => v.name),
          ['v'],
        );
        assert.deepEqual(
          (await b.ctx.catalog.list(keys.volumes)).map((e) => decodeVolume(e).name),
          ['v'],
          'no staging volume is left behind',
        );
      } catch (err) {
        (err as Error).message = `seed ${seed}, step ${step}: ${(err as Error).message}\n  replay with ARBOR_SEND_SEED=${seed}`;
        throw err;
      }
      console.log(`      seed ${seed}: ${JSON.stringify(tally)}`);
    });
  }
});
