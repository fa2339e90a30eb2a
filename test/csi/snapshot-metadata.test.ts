import assert from 'node:assert/strict';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { csiClient, CsiClient, expectCode, readAll, status } from '../../csi/client';
import { defaultTuplesPerMessage } from '../../controller/snapshot-metadata';
import { CMD_FLAG } from '../../node-plugin/nbd/protocol';
import { NbdClient } from '../../node-plugin/nbd/client';
import { serverForSuite } from '../support/arbor-server';
import { Random, seedFromEnv } from '../support/random';

const KiB = 1024;
const MiB = 1024 * KiB;
const seed = seedFromEnv('ARBOR_METADATA_SEED');
const block = { access_mode: { mode: 'SINGLE_NODE_WRITER' }, block: {} };

interface Range {
  offset: number;
  length: number;
}
interface Tuple {
  byte_offset: string;
  size_bytes: string;
}
interface MetadataMessage {
  block_metadata_type: string;
  volume_capacity_bytes: string;
  block_metadata: Tuple[];
}

function addRange(ranges: Range[], offset: number, length: number): void {
  const last = ranges[ranges.length - 1];
  if (last && last.offset + last.length === offset) last.length += length;
  else ranges.push({ offset, length });
}

/** The byte comparison of two images, as extent-aligned ranges within `capacity` (the target's): what the delta must say. */
function byteDiff(base: Buffer, target: Buffer, extentSize: number, capacity: number): Range[] {
  const ranges: Range[] = [];
  const at = (image: Buffer, offset: number, length: number) => {
    const out = Buffer.alloc(length);
    if (offset < image.length) image.copy(out, 0, offset, Math.min(offset + length, image.length));
    return out;
  };
  for (let offset = 0; offset < capacity; offset += extentSize) {
    const length = Math.min(extentSize, capacity - offset);
    if (!at(base, offset, length).equals(at(target, offset, length))) addRange(ranges, offset, length);
  }
  return ranges;
}

/**
 * The SnapshotMetadata service of `arbor serve`, over its real CSI socket: volumes
 * written over NBD, snapshots and clones made through the Controller service, and
 * every answer checked against a model of the bytes (read back from the snapshots'
 * own NBD exports) and against the spec's rules for the stream.
 */
describe(`CSI SnapshotMetadata over the socket (seed ${seed})`, function () {
  this.timeout(60_000);
  const suite = serverForSuite(async (dir) => ['--csi-endpoint', `unix://${path.join(dir, 'csi.sock')}`, '--node-id', 'metadata-node']);
  let csi: CsiClient;
  before(() => {
    csi = csiClient(path.join(suite.dir, 'csi.sock'));
  });
  after(() => csi?.close());

  const nbd = (exportName: string) => NbdClient.connect({ socketPath: suite.server.nbdSocket, exportName });

  const createVolume = async (name: string, sizeBytes: number, extentSize: number, extra: object = {}) =>
    (
      (await csi.controller.CreateVolume({
        name,
        volume_capabilities: [block],
        capacity_range: { required_bytes: String(sizeBytes) },
        parameters: { extentSize: `${extentSize / KiB}KiB` },
        ...extra,
      })) as { volume: { volume_id: string; capacity_bytes: string } }
    ).volume;
  const createSnapshot = async (volumeId: string, name: string) =>
    ((await csi.controller.CreateSnapshot({ source_volume_id: volumeId, name })).snapshot as { snapshot_id: string }).snapshot_id;

  /**
   * A metadata call's whole stream, checked against the spec as it is read: one type
   * (VARIABLE_LENGTH, Arbor's choice) and one capacity in every message, at most
   * max_results tuples in each, tuples of positive size in ascending order that never
   * overlap, the first ending after starting_offset, none past the capacity.
   */
  async function stream(
    method: 'GetMetadataAllocated' | 'GetMetadataDelta',
    request: Record<string, unknown>,
    capacity: number,
  ): Promise<{ messages: number; tuples: Range[] }> {
    const messages = await readAll<MetadataMessage>(csi.metadata[method](request));
    assert.ok(messages.length >= 1, 'the stream carries at least one message');
    const maxResults = Number(request.max_results ?? 0) || defaultTuplesPerMessage;
    const start = Number(request.starting_offset ?? 0);
    const tuples: Range[] = [];
    for (const message of messages) {
      assert.equal(message.block_metadata_type, 'VARIABLE_LENGTH');
      assert.equal(message.volume_capacity_bytes, String(capacity));
      assert.ok(message.block_metadata.length <= maxResults, `${message.block_metadata.length} tuples in one message, max_results ${maxResults}`);
      for (const t of message.block_metadata) {
        const tuple = { offset: Number(t.byte_offset), length: Number(t.size_bytes) };
        assert.ok(tuple.length > 0, `an empty tuple at ${tuple.offset}`);
        const previous = tuples[tuples.length - 1];
        if (previous) assert.ok(previous.offset + previous.length <= tuple.offset, `tuples overlap or go backwards at ${tuple.offset}`);
        else assert.ok(start < tuple.offset + tuple.length, `the first tuple (${tuple.offset}+${tuple.length}) ends before starting_offset ${start}`);
        assert.ok(tuple.offset + tuple.length <= capacity, `a tuple past the capacity ${capacity}`);
        tuples.push(tuple);
      }
    }
    return { messages: messages.length, tuples };
  }

  /** Tuples merged where they touch: VARIABLE_LENGTH leaves the cut between neighbours to the plugin. */
  const merged = (tuples: Range[]) => {
    const out: Range[] = [];
    for (const t of tuples) addRange(out, t.offset, t.length);
    return out;
  };

  /** `ranges` as an answer from `start` should be: those ending after it, the one holding it from the start of its extent. */
  const from = (ranges: Range[], start: number, extentSize: number) => {
    const aligned = Math.floor(start / extentSize) * extentSize;
    return ranges
      .filter((r) => r.offset + r.length > start)
      .map((r) => (r.offset < aligned ? { offset: aligned, length: r.offset + r.length - aligned } : { ...r }));
  };

  it('is advertised by Identity where arbor serve serves the controller', async () => {
    const caps = (await csi.identity.GetPluginCapabilities()).capabilities as Array<{ service?: { type: string } }>;
    assert.ok(caps.some((c) => c.service?.type === 'SNAPSHOT_METADATA_SERVICE'));
  });

  for (const extentSize of [4 * KiB, 64 * KiB]) {
    describe(`a random history of writes, trims, zeroes, growth, snapshots and clones, extents of ${extentSize / KiB} KiB`, () => {
      const random = new Random(seed + extentSize);
      interface Snapshot {
        id: string;
        name: string;
        /** The volume's name: the snapshot's NBD export is VOLUME@SNAPSHOT. */
        volume: string;
        image: Buffer;
        allocated: Set<number>;
      }
      const snapshots: Snapshot[] = [];

      before(async () => {
        interface Volume {
          id: string;
          name: string;
          image: Buffer;
          allocated: Set<number>;
          client: NbdClient;
        }
        const volumes: Volume[] = [];
        const prefix = `m${extentSize / KiB}k`;
        const size = extentSize * random.int(8, 40);
        const first = await createVolume(`${prefix}-v0`, size, extentSize);
        volumes.push({ id: first.volume_id, name: `${prefix}-v0`, image: Buffer.alloc(size), allocated: new Set(), client: await nbd(`${prefix}-v0`) });
        const extents = (a: number, b: number) => Array.from({ length: b - a }, (_, i) => a + i);
        const wholeExtents = (at: number, n: number, volumeSize: number) => {
          const end = at + n === volumeSize ? Math.ceil(volumeSize / extentSize) * extentSize : at + n;
          return extents(Math.ceil(at / extentSize), Math.floor(end / extentSize));
        };
        for (let step = 0; step < 100; step++) {
          const v = volumes[random.int(0, volumes.length - 1)];
          const offset = random.int(0, v.image.length - 1);
          const length = Math.min(random.int(1, 3 * extentSize), v.image.length - offset);
          const touched = extents(Math.floor(offset / extentSize), Math.ceil((offset + length) / extentSize));
          const op = random.int(0, 99);
          if (op < 40) {
            const data = random.bytes(length);
            await v.client.write(offset, data);
            data.copy(v.image, offset);
            for (const e of touched) v.allocated.add(e);
          } else if (op < 48) {
            // The same bytes again: a new extent for a shared one, and no difference.
            await v.client.write(offset, Buffer.from(v.image.subarray(offset, offset + length)));
            for (const e of touched) v.allocated.add(e);
          } else if (op < 58) {
            await v.client.trim(offset, length);
            v.image.fill(0, offset, offset + length);
            for (const e of wholeExtents(offset, length, v.image.length)) v.allocated.delete(e);
          } else if (op < 65) {
            await v.client.zero(offset, length, CMD_FLAG.NO_HOLE);
            v.image.fill(0, offset, offset + length);
            for (const e of wholeExtents(offset, length, v.image.length)) v.allocated.add(e);
          } else if (op < 69 && v.image.length < 64 * extentSize) {
            const grown = v.image.length + extentSize * random.int(1, 20);
            await csi.controller.ControllerExpandVolume({ volume_id: v.id, capacity_range: { required_bytes: String(grown) }, volume_capability: block });
            v.image = Buffer.concat([v.image, Buffer.alloc(grown - v.image.length)]);
            // An NBD connection keeps the size it was opened with.
            await v.client.disconnect();
            v.client = await nbd(v.name);
          } else if (op < 88) {
            const name = `${prefix}-s${snapshots.length}`;
            snapshots.push({ id: await createSnapshot(v.id, name), name, volume: v.name, image: Buffer.from(v.image), allocated: new Set(v.allocated) });
          } else if (snapshots.length > 0 && volumes.length < 5) {
            const source = random.pick(snapshots);
            const name = `${prefix}-v${volumes.length}`;
            const clone = await createVolume(name, source.image.length, extentSize, { volume_content_source: { snapshot: { snapshot_id: source.id } } });
            volumes.push({ id: clone.volume_id, name, image: Buffer.from(source.image), allocated: new Set(source.allocated), client: await nbd(name) });
          }
        }
        for (const v of volumes) await v.client.disconnect();
        assert.ok(snapshots.length >= 5, `the history took ${snapshots.length} snapshots`);
      });

      it('the model is what each snapshot holds, read back over NBD', async () => {
        for (const s of snapshots) {
          const client = await nbd(`${s.volume}@${s.name}`);
          try {
            assert.equal(client.sizeBytes, s.image.length, `${s.name} size`);
            assert.ok((await client.read(0, s.image.length)).equals(s.image), `${s.name} bytes`);
          } finally {
            await client.disconnect();
          }
        }
      });

      it('GetMetadataAllocated of every snapshot: the extents written and not trimmed whole since', async () => {
        for (const s of snapshots) {
          const expected: Range[] = [];
          for (const e of [...s.allocated].sort((a, b) => a - b)) addRange(expected, e * extentSize, Math.min(extentSize, s.image.length - e * extentSize));
          const { tuples } = await stream('GetMetadataAllocated', { snapshot_id: s.id, starting_offset: '0' }, s.image.length);
          assert.deepEqual(tuples, expected, `allocated ranges of ${s.name}`);
        }
      });

      it('GetMetadataDelta of every pair: exactly the extents whose bytes differ, within the target', async () => {
        for (const base of snapshots) {
          for (const target of snapshots) {
            const { tuples } = await stream(
              'GetMetadataDelta',
              { base_snapshot_id: base.id, target_snapshot_id: target.id, starting_offset: '0' },
              target.image.length,
            );
            assert.deepEqual(merged(tuples), byteDiff(base.image, target.image, extentSize, target.image.length), `${base.name} -> ${target.name}`);
          }
        }
      });

      it('paging by max_results and resuming at starting_offset reassemble the same answers', async () => {
        for (let round = 0; round < 40; round++) {
          const base = random.pick(snapshots);
          const target = random.pick(snapshots);
          const capacity = target.image.length;
          const [method, request] = random.chance(0.5)
            ? (['GetMetadataDelta', { base_snapshot_id: base.id, target_snapshot_id: target.id }] as const)
            : (['GetMetadataAllocated', { snapshot_id: target.id }] as const);
          const what = `${method} ${method === 'GetMetadataDelta' ? `${base.name} -> ` : ''}${target.name}`;
          const whole = (await stream(method, { ...request, starting_offset: '0' }, capacity)).tuples;

          const maxResults = random.int(1, 3);
          const paged = await stream(method, { ...request, starting_offset: '0', max_results: maxResults }, capacity);
          assert.deepEqual(paged.tuples, whole, `${what}, max_results ${maxResults}`);
          assert.equal(paged.messages, Math.max(1, Math.ceil(whole.length / maxResults)), `${what}: messages for max_results ${maxResults}`);

          // A client that lost the stream after k tuples asks again from the byte after the last one it got.
          const k = random.int(0, whole.length);
          const resumeAt = k === 0 ? 0 : whole[k - 1].offset + whole[k - 1].length;
          const resumed = await stream(method, { ...request, starting_offset: String(resumeAt), max_results: random.int(0, 2) }, capacity);
          assert.deepEqual(resumed.tuples, whole.slice(k), `${what} resumed at ${resumeAt}`);

          // Any byte: the range holding it comes from the start of its extent.
          const anywhere = random.int(0, capacity);
          const fromAnywhere = await stream(method, { ...request, starting_offset: String(anywhere) }, capacity);
          assert.deepEqual(fromAnywhere.tuples, from(whole, anywhere, extentSize), `${what} from ${anywhere}`);
        }
        const last = snapshots[snapshots.length - 1];
        const atEnd = await stream('GetMetadataAllocated', { snapshot_id: last.id, starting_offset: String(last.image.length) }, last.image.length);
        assert.deepEqual(atEnd, { messages: 1, tuples: [] }, 'at the end of the volume: one message, nothing in it');
      });
    });
  }

  describe('the spec’s errors, with its codes', () => {
    const ids: Record<string, string> = {};
    before(async () => {
      const volume = await createVolume('errors-a', 4 * MiB, 64 * KiB);
      const other = await createVolume('errors-b', 4 * MiB, 64 * KiB);
      ids.a = await createSnapshot(volume.volume_id, 'errors-a1');
      ids.a2 = await createSnapshot(volume.volume_id, 'errors-a2');
      ids.b = await createSnapshot(other.volume_id, 'errors-b1');
      const clone = await createVolume('errors-a-clone', 4 * MiB, 64 * KiB, { volume_content_source: { snapshot: { snapshot_id: ids.a } } });
      ids.clone = await createSnapshot(clone.volume_id, 'errors-clone1');
    });
    const allocated = (request: object) => readAll(csi.metadata.GetMetadataAllocated({ starting_offset: '0', ...request }));
    const delta = (request: object) => readAll(csi.metadata.GetMetadataDelta({ starting_offset: '0', ...request }));
    const unknown = 'snap-0123456789abcdef';

    it('INVALID_ARGUMENT for a missing or malformed snapshot id, or a negative max_results', async () => {
      await expectCode(allocated({}), status.INVALID_ARGUMENT, 'no snapshot_id');
      assert.match(await expectCode(allocated({ snapshot_id: 'errors-a1' }), status.INVALID_ARGUMENT, 'a name, not an id'), /not an Arbor snapshot id/);
      await expectCode(allocated({ snapshot_id: ids.a, max_results: -1 }), status.INVALID_ARGUMENT, 'negative max_results');
      await expectCode(delta({ target_snapshot_id: ids.a }), status.INVALID_ARGUMENT, 'no base_snapshot_id');
      await expectCode(delta({ base_snapshot_id: ids.a }), status.INVALID_ARGUMENT, 'no target_snapshot_id');
      await expectCode(delta({ base_snapshot_id: 'a/b', target_snapshot_id: ids.a }), status.INVALID_ARGUMENT, 'a malformed base');
      await expectCode(delta({ base_snapshot_id: ids.a, target_snapshot_id: ids.a2, max_results: -5 }), status.INVALID_ARGUMENT, 'negative max_results');
    });

    it('NOT_FOUND for a snapshot that does not exist (or no longer does)', async () => {
      await expectCode(allocated({ snapshot_id: unknown }), status.NOT_FOUND, 'unknown snapshot');
      assert.match(await expectCode(delta({ base_snapshot_id: unknown, target_snapshot_id: ids.a }), status.NOT_FOUND, 'unknown base'), /base_snapshot_id/);
      assert.match(await expectCode(delta({ base_snapshot_id: ids.a, target_snapshot_id: unknown }), status.NOT_FOUND, 'unknown target'), /target_snapshot_id/);
      const volume = await createVolume('errors-gone', 1 * MiB, 64 * KiB);
      const gone = await createSnapshot(volume.volume_id, 'errors-gone1');
      await csi.controller.DeleteSnapshot({ snapshot_id: gone });
      await expectCode(allocated({ snapshot_id: gone }), status.NOT_FOUND, 'a deleted snapshot');
    });

    it('OUT_OF_RANGE for a starting_offset that is negative or past the volume', async () => {
      await expectCode(allocated({ snapshot_id: ids.a, starting_offset: '-1' }), status.OUT_OF_RANGE, 'negative');
      await expectCode(allocated({ snapshot_id: ids.a, starting_offset: String(4 * MiB + 1) }), status.OUT_OF_RANGE, 'past the end');
      await expectCode(allocated({ snapshot_id: ids.a, starting_offset: '9223372036854775807' }), status.OUT_OF_RANGE, 'the largest int64');
      await expectCode(
        delta({ base_snapshot_id: ids.a, target_snapshot_id: ids.a2, starting_offset: String(4 * MiB + 1) }),
        status.OUT_OF_RANGE,
        'delta past the end',
      );
      assert.equal((await allocated({ snapshot_id: ids.a, starting_offset: String(4 * MiB) })).length, 1, 'at the end exactly: one empty message');
    });

    it('INVALID_ARGUMENT for snapshots of volumes of different lineages; a clone and its source are one', async () => {
      const message = await expectCode(delta({ base_snapshot_id: ids.a, target_snapshot_id: ids.b }), status.INVALID_ARGUMENT, 'different volumes');
      assert.match(message, /errors-a.*errors-b.*not of one lineage/);
      await delta({ base_snapshot_id: ids.a, target_snapshot_id: ids.clone });
      await delta({ base_snapshot_id: ids.clone, target_snapshot_id: ids.a2 });
    });
  });

  it('a client that cancels mid-stream stops the stream; the server goes on serving', async () => {
    const extentSize = 4 * KiB;
    const size = 64 * MiB;
    const volume = await createVolume('cancelled', size, extentSize);
    const client = await nbd('cancelled');
    // Every other extent written: one tuple each, 8192 in all.
    const data = Buffer.alloc(extentSize, 7);
    for (let batch = 0; batch < size / extentSize; batch += 512) {
      await Promise.all(Array.from({ length: 256 }, (_, i) => client.write((batch + 2 * i) * extentSize, data)));
    }
    await client.disconnect();
    const snapshot = await createSnapshot(volume.volume_id, 'cancelled1');
    const tuples = size / extentSize / 2;

    const call = csi.metadata.GetMetadataAllocated({ snapshot_id: snapshot, starting_offset: '0', max_results: 1 });
    const ended = new Promise<grpc.ServiceError>((resolve, reject) => {
      call.on('error', resolve);
      call.on('end', () => reject(new Error('the stream ended although it was cancelled')));
    });
    await new Promise<void>((resolve) => call.once('data', () => resolve()));
    // A reader that stops reading: the server must wait for it, not queue the other 8191 messages.
    call.pause();
    await new Promise((r) => setTimeout(r, 300));
    call.cancel();
    assert.equal((await ended).code, status.CANCELLED);

    const deadline = Date.now() + 10_000;
    let line: { messages: number } | undefined;
    while (!line && Date.now() < deadline) {
      const found = suite.server
        .log()
        .split('\n')
        .find((l) => l.includes('CSI call cancelled by the client') && l.includes(snapshot));
      if (found) line = JSON.parse(found) as { messages: number };
      else await new Promise((r) => setTimeout(r, 50));
    }
    assert.ok(line, 'the server logged the cancel');
    assert.ok(line.messages < tuples, `the server stopped after ${line.messages} of ${tuples} messages`);

    assert.deepEqual((await csi.identity.Probe()).ready, { value: true });
    const whole = await stream('GetMetadataAllocated', { snapshot_id: snapshot, starting_offset: '0' }, size);
    assert.equal(whole.tuples.length, tuples);
    assert.equal(whole.messages, Math.ceil(tuples / defaultTuplesPerMessage));
  });
});
