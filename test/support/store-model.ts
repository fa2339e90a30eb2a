import assert from 'node:assert/strict';
import { isArborError } from '../../store/errors';
import { QosLimits, qosKey, qosPrefix } from '../../store/qos';
import { keys } from '../../store/records';
import { Store } from '../../store/store';
import { Random, seedFromEnv } from './random';
import { SparseBytes } from './sparse-model';
import { compareWithModel, orphanBlobs } from './store-inspect';
import { memoryTempDir } from './tmp';

/**
 * Model-based randomized test: seeded sequences of every store operation across
 * many volumes, snapshots and clones, checked byte for byte against a plain
 * in-memory model. A failure prints its seed; ARBOR_MODEL_SEED=<seed> replays it.
 */
const seed = seedFromEnv('ARBOR_MODEL_SEED');
const trace = process.env.ARBOR_MODEL_TRACE === '1';

interface ModelVolume {
  bytes: SparseBytes;
  extentSize: number;
  /** Its QoS limits: set only by setVolumeQos, never inherited by a clone. */
  qos: QosLimits;
}

/** Limits as setVolumeQos keeps them: any subset, {} for none. */
function randomQos(rng: Random): QosLimits {
  const qos: QosLimits = {};
  if (rng.chance(0.6)) qos.maxIops = rng.int(1, 100_000);
  if (rng.chance(0.5)) qos.maxBandwidthBytes = rng.int(1, 4096) * 65536;
  if (rng.chance(0.3)) qos.burstSeconds = rng.pick([0.05, 0.1, 1, 30]);
  if (qos.maxIops === undefined && qos.maxBandwidthBytes === undefined) delete qos.burstSeconds;
  return qos;
}

/** The model run on a store that `open` opens (again, at every reopen) in a fresh directory. */
export function modelSuite(title: string, operations: number, open: (dir: string) => Promise<Store>): void {
  describe(title, function () {
    this.timeout(20 * 60 * 1000);
    let dataDir: { dir: string; cleanup: () => void };
    let store: Store;

    before(async () => {
      dataDir = memoryTempDir();
      store = await open(dataDir.dir);
    });

    after(async () => {
      await store?.close();
      dataDir.cleanup();
    });

    it(`${operations} operations match the model byte for byte (seed ${seed})`, async () => {
      const rng = new Random(seed);
      const volumes = new Map<string, ModelVolume>();
      const snapshots = new Map<string, { volume: string; id: string; bytes: SparseBytes }>();
      /** Ids of deleted snapshots: a clone of one is refused (the store may still remember its entry). */
      const deletedSnapshotIds: string[] = [];
      /** Snapshots named among their volume's (the CLI's scope), by VOLUME@NAME: names from a small pool, so volumes share them. */
      const volumeSnapshots = new Map<string, { volume: string; name: string; id: string; bytes: SparseBytes }>();
      const volumeSnapshotNames = ['daily', 'weekly', 'before upgrade', 'v@1', 'ünïcode'];
      const anyVolumeSnapshot = () => (volumeSnapshots.size ? volumeSnapshots.get(rng.pick([...volumeSnapshots.keys()]))! : undefined);
      const everNamed = { volumes: 0, snapshots: 0 };
      const tally: Record<string, number> = {};
      const timing: Record<string, number> = {};
      let step = 0;

      const anyVolume = (): string | undefined => (volumes.size ? rng.pick([...volumes.keys()]) : undefined);
      const anySnapshot = (): string | undefined => (snapshots.size ? rng.pick([...snapshots.keys()]) : undefined);
      const randomRange = (size: number, extentSize: number): { offset: number; length: number } => {
        const shape = rng.int(0, 3);
        let offset =
          shape === 0 ? rng.int(0, Math.floor(size / extentSize) - 1) * extentSize : shape === 1 ? rng.int(0, size / 512 - 1) * 512 : rng.int(0, size - 1);
        if (size > 64 * 1024 * 1024 && rng.chance(0.5)) offset = rng.int(0, 8) * extentSize * 512 + rng.int(0, 1024) * 512;
        offset = Math.min(offset, size - 1);
        const maxLength = Math.min(size - offset, extentSize * rng.pick([1, 2, 3, 5]));
        let length = shape === 0 ? Math.min(size - offset, extentSize * rng.int(1, 3)) : rng.int(1, maxLength);
        if (rng.chance(0.05)) length = size - offset;
        return { offset, length: Math.min(length, 8 * 1024 * 1024) };
      };
      const sequentialRun = (size: number, extentSize: number): { offset: number; length: number } => {
        const extents = Math.floor(size / extentSize);
        if (extents < 2) return randomRange(size, extentSize);
        const offset = rng.int(0, extents - 2) * extentSize;
        return { offset, length: Math.min(size - offset, extentSize * rng.int(2, 40), 8 * 1024 * 1024) };
      };
      const verify = async (name: string, kind: 'volume' | 'snapshot'): Promise<void> => {
        if (kind === 'volume') assert.deepEqual(await store.volumeQos({ name }), volumes.get(name)!.qos, `volume ${name}: QoS limits as set`);
        if (kind === 'volume') await compareWithModel(`volume ${name}`, await store.openVolume({ name }), volumes.get(name)!.bytes, () => rng.next());
        else await compareWithModel(`snapshot ${name}`, await store.openSnapshot({ name }), snapshots.get(name)!.bytes, () => rng.next());
      };
      const verifyVolumeSnapshot = async (key: string): Promise<void> => {
        const s = volumeSnapshots.get(key)!;
        const ref = { volume: { name: s.volume }, name: s.name };
        assert.equal((await store.findSnapshot(ref))?.id, s.id, `snapshot ${key} found among its volume's (the volume deleted or not)`);
        await compareWithModel(`snapshot ${key}`, await store.openSnapshot(ref), s.bytes, () => rng.next());
      };

      try {
        for (step = 0; step < operations; step++) {
          const op = rng.weighted({
            create: volumes.size < 3 ? 30 : volumes.size < 14 ? 4 : 0,
            write: 30,
            read: 12,
            trim: 6,
            zeroes: 6,
            status: 4,
            flush: 3,
            snapshot: snapshots.size < 16 ? 4 : 1,
            cloneSnapshot: volumes.size < 20 ? 2 : 0,
            cloneVolume: volumes.size < 20 ? 2 : 0,
            resize: 2,
            qos: 2,
            deleteVolume: volumes.size > 6 ? 2 : 0.3,
            deleteSnapshot: snapshots.size > 4 ? 2 : 0.3,
            volumeSnapshot: volumeSnapshots.size < 24 ? 3 : 0.5,
            deleteVolumeSnapshot: volumeSnapshots.size > 6 ? 2 : 0.3,
            csiNameClash: 0.5,
            gc: 0.6,
            reopen: 0.4,
            verify: 1.5,
            badInput: 1,
            list: 1,
          });
          tally[op] = (tally[op] ?? 0) + 1;
          const opStarted = Date.now();
          if (trace) console.log(`step ${step}: ${op} begins`);
          const note = (detail: string): void => {
            if (trace) console.log(`step ${step}: ${op} ${detail}`);
          };
          switch (op) {
            case 'create': {
              const name = `v${everNamed.volumes++}`;
              const extentSize = rng.pick([4096, 8192, 16384, 65536, 131072]);
              const huge = rng.chance(0.08);
              const size = huge ? rng.int(1, 4) * 1024 * 1024 * 1024 + rng.int(0, 64) * 512 : rng.int(1, 8192) * 512;
              note(`${name} size ${size} extent ${extentSize}`);
              const record = await store.createVolume(name, { sizeBytes: size, extentSizeBytes: extentSize });
              const again = await store.createVolume(name, { sizeBytes: size, extentSizeBytes: extentSize });
              assert.equal(again.id, record.id, 'creating the same volume twice returns the first');
              volumes.set(name, { bytes: new SparseBytes(size), extentSize, qos: {} });
              break;
            }
            case 'write': {
              const name = anyVolume();
              if (!name) break;
              const v = volumes.get(name)!;
              // Now and then a guest's sequential write: many whole extents, which go to
              // consecutive blobs written as one (in the thread pool when large).
              const { offset, length } = rng.chance(0.15) ? sequentialRun(v.bytes.size, v.extentSize) : randomRange(v.bytes.size, v.extentSize);
              const data = rng.chance(0.1) ? Buffer.alloc(length, rng.int(0, 255)) : rng.bytes(length);
              note(`${name} ${offset}+${length}`);
              await (await store.openVolume({ name })).write(offset, data, { fua: rng.chance(0.1) });
              v.bytes.write(offset, data);
              break;
            }
            case 'read': {
              const name = anyVolume();
              if (!name) break;
              const v = volumes.get(name)!;
              const { offset, length } = randomRange(v.bytes.size, v.extentSize);
              const got = await (await store.openVolume({ name })).read(offset, length);
              if (!got.equals(v.bytes.read(offset, length))) throw new Error(`read of volume ${name} at ${offset}+${length} differs from the model`);
              break;
            }
            case 'trim':
            case 'zeroes': {
              const name = anyVolume();
              if (!name) break;
              const v = volumes.get(name)!;
              const { offset, length } = randomRange(v.bytes.size, v.extentSize);
              const volume = await store.openVolume({ name });
              note(`${name} ${offset}+${length}`);
              if (op === 'trim') await volume.trim(offset, length);
              else await volume.writeZeroes(offset, length, { noHole: rng.chance(0.5), fua: rng.chance(0.1) });
              v.bytes.zero(offset, length);
              break;
            }
            case 'status': {
              const name = anyVolume();
              if (!name) break;
              const v = volumes.get(name)!;
              const { offset, length } = randomRange(v.bytes.size, v.extentSize);
              const status = await (await store.openVolume({ name })).blockStatus(offset, length);
              let at = offset;
              for (const range of status) {
                assert.equal(range.offset, at, 'block status ranges are contiguous');
                at += range.length;
                if (range.kind !== 'data' && range.length <= 64 * 1024 * 1024 && v.bytes.read(range.offset, range.length).some((b) => b !== 0)) {
                  throw new Error(`volume ${name}: ${range.kind} reported at ${range.offset}+${range.length} over data`);
                }
              }
              assert.equal(at, offset + length, 'block status covers the range');
              break;
            }
            case 'flush': {
              const name = anyVolume();
              if (name) await (await store.openVolume({ name })).flush();
              break;
            }
            case 'snapshot': {
              const name = anyVolume();
              if (!name) break;
              const snapName = `s${everNamed.snapshots++}`;
              note(`${name}@${snapName}`);
              const record = await store.createSnapshot({ name }, snapName);
              assert.equal((await store.createSnapshot({ name }, snapName)).id, record.id, 'a snapshot is idempotent by name');
              snapshots.set(snapName, { volume: name, id: record.id, bytes: volumes.get(name)!.bytes.clone() });
              break;
            }
            case 'volumeSnapshot': {
              const name = anyVolume();
              if (!name) break;
              const snapName = rng.pick(volumeSnapshotNames);
              const key = `${name}@${snapName}`;
              note(key);
              const record = await store.createSnapshot({ name }, snapName, 'volume');
              const known = volumeSnapshots.get(key);
              if (known) {
                assert.equal(record.id, known.id, `${key}: a snapshot is idempotent by its name among its volume's`);
              } else {
                assert.equal(await store.findSnapshot({ name: snapName }), undefined, `${key}: a volume-scoped name takes no store-wide name`);
                volumeSnapshots.set(key, { volume: name, name: snapName, id: record.id, bytes: volumes.get(name)!.bytes.clone() });
              }
              break;
            }
            case 'deleteVolumeSnapshot': {
              const s = anyVolumeSnapshot();
              if (!s) break;
              note(`${s.volume}@${s.name}`);
              await store.deleteSnapshot({ volume: { name: s.volume }, name: s.name });
              volumeSnapshots.delete(`${s.volume}@${s.name}`);
              break;
            }
            case 'csiNameClash': {
              // CSI's names stay unique in the store: one taken among a volume's, or by another volume's CSI snapshot, is refused.
              const s = anyVolumeSnapshot();
              const name = anyVolume();
              if (s && volumes.has(s.volume)) {
                await assert.rejects(store.createSnapshot({ name: s.volume }, s.name), (err) => isArborError(err, 'already-exists'));
              } else if (name && snapshots.size) {
                const snap = anySnapshot()!;
                if (snapshots.get(snap)!.volume !== name) {
                  await assert.rejects(store.createSnapshot({ name }, snap, 'store'), (err) => isArborError(err, 'already-exists'));
                }
              }
              break;
            }
            case 'cloneSnapshot': {
              const name = `v${everNamed.volumes++}`;
              if (deletedSnapshotIds.length && rng.chance(0.1)) {
                const id = rng.pick(deletedSnapshotIds);
                note(`deleted ${id} -> ${name}`);
                await assert.rejects(store.cloneVolume(name, { snapshot: { id } }), (err) => isArborError(err, 'not-found'));
                assert.equal(await store.findVolume({ name }), undefined, 'a clone of a deleted snapshot makes nothing');
                break;
              }
              const snap = anySnapshot();
              if (!snap) break;
              // By id a clone may go straight to its transaction, with the entry this store made or read last.
              const ref = rng.chance(0.5) ? { id: snapshots.get(snap)!.id } : { name: snap };
              const exclusive = rng.chance(0.3);
              note(`${snap} -> ${name}${'id' in ref ? ' by id' : ''}${exclusive ? ', exclusive' : ''}`);
              const record = await store.cloneVolume(name, { snapshot: ref }, { exclusive });
              if (exclusive) {
                await assert.rejects(store.cloneVolume(name, { snapshot: ref }, { exclusive }), (err) => isArborError(err, 'already-exists'));
                assert.deepEqual(await store.getVolume({ name }), record, 'an exclusive clone refused leaves the volume of the name as it was');
              } else {
                assert.equal((await store.cloneVolume(name, { snapshot: ref })).id, record.id, 'a clone is idempotent by name');
              }
              const extentSize = (await store.getSnapshot({ name: snap })).extentSizeBytes;
              volumes.set(name, { bytes: snapshots.get(snap)!.bytes.clone(), extentSize, qos: {} });
              break;
            }
            case 'cloneVolume': {
              const source = anyVolume();
              if (!source) break;
              const name = `v${everNamed.volumes++}`;
              note(`${source} -> ${name}`);
              await store.cloneVolume(name, { volume: { name: source } });
              volumes.set(name, { bytes: volumes.get(source)!.bytes.clone(), extentSize: volumes.get(source)!.extentSize, qos: {} });
              break;
            }
            case 'resize': {
              const name = anyVolume();
              if (!name) break;
              const v = volumes.get(name)!;
              const grow = rng.chance(0.2) ? rng.int(1, 2048) * 1024 * 1024 : rng.int(0, 4096) * 512;
              const size = v.bytes.size + grow;
              note(`${name} ${v.bytes.size} -> ${size}`);
              await store.resizeVolume({ name }, size);
              v.bytes.size = size;
              break;
            }
            case 'qos': {
              const name = anyVolume();
              if (!name) break;
              const qos = randomQos(rng);
              note(`${name} ${JSON.stringify(qos)}`);
              // A follower (what the NBD server holds) sees the change at once, in this process.
              const id = (await store.getVolume({ name })).id;
              let seen: QosLimits | undefined;
              const stop = await store.followVolumeQos(id, (limits) => (seen = limits));
              assert.deepEqual(seen, volumes.get(name)!.qos, 'a follower starts from the limits as set');
              assert.deepEqual(await store.setVolumeQos({ name }, qos), qos);
              assert.deepEqual(seen, qos, 'a follower learns new limits as they are set');
              stop();
              volumes.get(name)!.qos = qos;
              break;
            }
            case 'deleteVolume': {
              const name = anyVolume();
              if (!name) break;
              note(name);
              const id = (await store.getVolume({ name })).id;
              await store.deleteVolume({ name });
              assert.equal(await store.ctx.catalog.get(qosKey(id)), undefined, 'a deleted volume leaves no QoS limits');
              volumes.delete(name);
              break;
            }
            case 'deleteSnapshot': {
              const snap = anySnapshot();
              if (!snap) break;
              await store.deleteSnapshot({ name: snap });
              deletedSnapshotIds.push(snapshots.get(snap)!.id);
              snapshots.delete(snap);
              break;
            }
            case 'gc': {
              await store.collectGarbage();
              assert.deepEqual(await orphanBlobs(store), [], 'after a pass no blob is unreachable');
              break;
            }
            case 'reopen': {
              await store.close();
              store = await open(dataDir.dir);
              break;
            }
            case 'verify': {
              if (rng.chance(0.3) && volumeSnapshots.size) await verifyVolumeSnapshot(rng.pick([...volumeSnapshots.keys()]));
              else if (rng.chance(0.5) && snapshots.size) await verify(anySnapshot()!, 'snapshot');
              else if (volumes.size) await verify(anyVolume()!, 'volume');
              break;
            }
            case 'list': {
              // Paged listings (in pages of 1 to 5, in id order) hold exactly what the model holds.
              const limit = rng.int(1, 5);
              const pages = async <T extends { id: string }>(list: (after: string | undefined) => Promise<{ items: T[]; more: boolean }>) => {
                const items: T[] = [];
                for (let after: string | undefined; ;) {
                  const page = await list(after);
                  items.push(...page.items);
                  if (!page.more) break;
                  after = page.items[page.items.length - 1].id;
                }
                assert.deepEqual(
                  items.map((i) => i.id),
                  items.map((i) => i.id).sort(),
                  'a listing is in id order',
                );
                return items;
              };
              const sorted = (names: string[]) => [...names].sort();
              const volumesListed = await pages((after) => store.volumesPage({ after, limit }));
              assert.deepEqual(sorted(volumesListed.map((v) => v.name)), sorted([...volumes.keys()]), `volumes in pages of ${limit}`);
              const everySnapshot = [...[...snapshots].map(([name, s]) => `${s.volume}@${name}`), ...volumeSnapshots.keys()];
              const snapshotsListed = await pages((after) => store.snapshotsPage({ after, limit }));
              assert.deepEqual(sorted(snapshotsListed.map((s) => `${s.volumeName}@${s.name}`)), sorted(everySnapshot), `snapshots in pages of ${limit}`);
              const name = anyVolume();
              if (!name) break;
              const volumeId = (await store.getVolume({ name })).id;
              const ofVolume = await pages((after) => store.snapshotsPage({ volumeId, after, limit }));
              assert.deepEqual(
                sorted(ofVolume.map((s) => `${s.volumeName}@${s.name}`)),
                sorted(everySnapshot.filter((key) => key.startsWith(`${name}@`))),
                `snapshots of ${name} in pages of ${limit}`,
              );
              break;
            }
            case 'badInput': {
              const name = anyVolume();
              if (!name) break;
              const v = volumes.get(name)!;
              const volume = await store.openVolume({ name });
              const which = rng.int(0, 4);
              try {
                if (which === 0) await volume.write(v.bytes.size - 10, Buffer.alloc(20, 1));
                else if (which === 1) await store.resizeVolume({ name }, Math.max(512, v.bytes.size - 512));
                else if (which === 2) await store.createVolume(name, { sizeBytes: v.bytes.size + 512 });
                else if (which === 3) await volume.trim(v.bytes.size, 1);
                else
                  await store.setVolumeQos(
                    { name },
                    rng.pick([{ maxIops: 0 }, { maxIops: 1.5 }, { maxBandwidthBytes: -1 }, { maxIops: 10, burstSeconds: 0 }, { burstSeconds: 1 }]),
                  );
                if (!(which === 1 && v.bytes.size === 512)) throw new Error(`bad input ${which} on ${name} was accepted`);
              } catch (err) {
                if (!isArborError(err)) throw err;
                assert.ok(['out-of-range', 'already-exists', 'invalid-argument'].includes(err.code), err.message);
              }
              break;
            }
          }
          timing[op] = (timing[op] ?? 0) + Date.now() - opStarted;
        }
        // Everything still matches, after a last reopen.
        await store.close();
        store = await open(dataDir.dir);
        for (const name of volumes.keys()) await verify(name, 'volume');
        for (const name of snapshots.keys()) await verify(name, 'snapshot');
        for (const key of volumeSnapshots.keys()) await verifyVolumeSnapshot(key);
        // And once everything is deleted and collected, nothing is left.
        for (const name of volumes.keys()) await store.deleteVolume({ name });
        for (const name of snapshots.keys()) await store.deleteSnapshot({ name });
        for (const s of volumeSnapshots.values()) await store.deleteSnapshot({ id: s.id });
        await store.collectGarbage();
        assert.deepEqual(await store.ctx.blobs.list(), [], 'an empty store holds no blobs');
        assert.deepEqual(await store.ctx.catalog.list(qosPrefix), [], 'an empty store holds no QoS limits');
        assert.deepEqual(await store.ctx.catalog.list(keys.volumeSnapshotIndex), [], 'an empty store holds no snapshot index keys');
      } catch (err) {
        (err as Error).message = `seed ${seed}, step ${step}: ${(err as Error).message}\n  replay with ARBOR_MODEL_SEED=${seed}`;
        throw err;
      }
      if (trace) console.log(`      milliseconds per kind: ${JSON.stringify(timing)}`);
      console.log(`      seed ${seed}: ${JSON.stringify(tally)}; ${everNamed.volumes} volumes, ${everNamed.snapshots} snapshots`);
    });
  });
}
