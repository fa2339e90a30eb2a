import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { openDataDir } from '../../store/embedded';
import { openStore } from '../../store/open';
import { NbdClient } from '../../node-plugin/nbd/client';
import { cliPath, startServer } from '../support/arbor-server';
import { distributedForSuite } from '../support/distributed';
import { Random } from '../support/random';
import { run } from '../support/run';
import { localSession, sendToBuffer, stateOf, stateOfDataDir, streamLayout } from '../support/snapshot-stream';
import { memoryTempDir } from '../support/tmp';
import { Writer } from '../support/verifying-writer';

const MiB = 1024 * 1024;

/**
 * Snapshot streams into and out of a store on etcd and S3 (real etcd, real Ceph
 * RGW): a full and an incremental stream from a data directory received by the
 * CLI joined to the distributed store, then both sent back from it into another
 * data directory, every image byte-exact.
 */
describe('snapshot send and receive on etcd and S3', function () {
  this.timeout(120_000);
  const servers = distributedForSuite();
  let temp: { dir: string; cleanup: () => void };
  const file = (name: string) => path.join(temp.dir, name);
  before(() => (temp = memoryTempDir()));
  after(() => temp?.cleanup());

  it('receives a full and an incremental stream, refuses a corrupted one, and sends both back byte-exact', async () => {
    const location = servers.location('send-receive', temp.dir);
    const distributed = async (...args: string[]) => {
      const result = await run(process.execPath, [cliPath, '--data-dir', file('cli'), ...servers.args(location), ...args], { env: servers.env() });
      return { ...result, ok: () => (assert.equal(result.status, 0, `arbor ${args.join(' ')}: ${result.stderr}`), result.stdout) };
    };

    // The source: a data directory, 6 MiB written, then 1 MiB changed and the volume grown.
    const source = file('source');
    const store = await openDataDir(source);
    try {
      const random = new Random(5);
      await store.createVolume('v', { sizeBytes: 8 * MiB });
      const v = await store.openVolume({ name: 'v' });
      await v.write(0, random.bytes(6 * MiB));
      await store.createSnapshot({ name: 'v' }, 's1');
      await v.write(3 * MiB + 777, random.bytes(MiB));
      await v.trim(0, MiB);
      await store.resizeVolume({ name: 'v' }, 12 * MiB);
      await v.write(11 * MiB, random.bytes(4096));
      await store.createSnapshot({ name: 'v' }, 's2');
      const session = localSession(store);
      fs.writeFileSync(file('full1'), (await sendToBuffer(session, 's1')).stream);
      fs.writeFileSync(file('inc12'), (await sendToBuffer(session, 's2', 's1')).stream);
    } finally {
      await store.close();
    }
    const sent = (await stateOfDataDir(source)).images;

    (await distributed('snapshot', 'receive', 'v', '-i', file('full1'))).ok();
    const corrupted = fs.readFileSync(file('inc12'));
    corrupted[streamLayout(corrupted).records.find((r) => r.kind === 1)!.payloadAt! + 100] ^= 1;
    fs.writeFileSync(file('corrupted'), corrupted);
    const refused = await distributed('snapshot', 'receive', 'v', '-i', file('corrupted'));
    assert.equal(refused.status, 1);
    assert.match(refused.stderr, /not received: the stream is corrupted: its SHA-256 digest does not match its contents/);
    assert.match((await distributed('snapshot', 'receive', 'v', '-i', file('inc12'))).ok(), /^received v@s2 .*: 12 MiB, incremental from @s1/);

    const opened = await openStore(location, { nodeId: 'send-receive-check', ephemeralCache: true });
    try {
      const state = await stateOf(opened);
      assert.deepEqual(state.hidden, [], 'the refused receive left no staging volume');
      for (const name of ['v@s1', 'v@s2']) assert.equal(state.images[name], sent[name], `${name} on etcd and S3 reads as sent`);
      assert.equal(state.images.v, sent['v@s2']);
    } finally {
      await opened.close();
    }

    // And back: a full stream of s1 and an incremental one to s2, from the distributed store.
    (await distributed('snapshot', 'send', 'v@s1', '-o', file('back-full1'))).ok();
    (await distributed('snapshot', 'send', 'v@s2', '--from', 'v@s1', '-o', file('back-inc12'))).ok();
    const back = file('back');
    for (const stream of ['back-full1', 'back-inc12']) {
      const result = await run(process.execPath, [cliPath, '--data-dir', back, 'snapshot', 'receive', 'v', '-i', file(stream)]);
      assert.equal(result.status, 0, result.stderr);
    }
    const returned = await stateOfDataDir(back);
    for (const name of ['v@s1', 'v@s2', 'v'])
      assert.equal(returned.images[name], sent[name === 'v' ? 'v@s2' : name], `${name} sent back reads as the source's`);
    assert.ok(fs.statSync(file('back-inc12')).size < fs.statSync(file('inc12')).size + 4096, 'sent back, the incremental stream is as small as the first');
  });

  it('arbor volume move: from a data directory into etcd and S3, byte-exact; the source forgets the volume and keeps its snapshots', async () => {
    const location = servers.location('move', temp.dir);
    const from = file('move-from');
    const store = await openDataDir(from);
    try {
      await store.createVolume('disk', { sizeBytes: 8 * MiB, extentSizeBytes: 4096 });
      const disk = await store.openVolume({ name: 'disk' });
      await disk.write(MiB, new Random(6).bytes(5 * MiB));
      await disk.writeZeroes(7 * MiB, 64 * 1024, { noHole: true });
      await store.createSnapshot({ name: 'disk' }, 'mine');
    } finally {
      await store.close();
    }
    const expected = (await stateOfDataDir(from)).images.disk;
    const moved = await run(
      process.execPath,
      [cliPath, '--data-dir', from, 'volume', 'move', 'disk', '--to', file('move-cache'), '--to-store', location.storeUrl!, '--to-blobs', location.blobsUrl!],
      { env: servers.env() },
    );
    assert.equal(moved.status, 0, moved.stderr);
    assert.match(moved.stdout, /moved volume disk \(8 MiB\) in \d+ ms, 1 rounds; no connection used it: nothing was paused/);

    const opened = await openStore(location, { nodeId: 'move-check', ephemeralCache: true });
    try {
      const state = await stateOf(opened);
      assert.equal(state.images.disk, expected, 'the volume on etcd and S3 reads as it did in the data directory');
      assert.deepEqual(state.hidden, []);
      assert.deepEqual(
        (await opened.listSnapshots()).map((s) => s.name),
        [],
        "the move's snapshots are gone",
      );
    } finally {
      await opened.close();
    }
    const left = await stateOfDataDir(from);
    assert.equal(left.images.disk, undefined, 'the source no longer has the volume');
    assert.ok(left.images['disk@mine'], 'its own snapshot stays');
  });

  it('arbor volume move: a volume in use on an embedded arbor serve moves into etcd and S3, its connection switched to a distributed server (--to-nbd-socket)', async () => {
    const location = servers.location('move-live', temp.dir);
    const [source, destination] = await Promise.all([
      startServer(file('live-source')),
      startServer(file('live-destination'), [...servers.args(location), '--node-id', 'move-destination']),
    ]);
    try {
      await source.cliOk('volume', 'create', 'live', '--size', '16MiB');
      const client = await NbdClient.connect({ socketPath: source.nbdSocket, exportName: 'live' });
      const writer = new Writer(client, new Random(10), 16 * MiB);
      writer.start();
      try {
        await new Promise((resolve) => setTimeout(resolve, 500));
        const report = await source.cliOk(
          'volume',
          'move',
          'live',
          '--to',
          file('live-cache'),
          '--to-store',
          location.storeUrl!,
          '--to-blobs',
          location.blobsUrl!,
          '--to-nbd-socket',
          destination.nbdSocket,
        );
        assert.match(report, /moved volume live \(16 MiB\) .* writes paused \d+ ms; 1 connections switched to the destination/);
        await new Promise((resolve) => setTimeout(resolve, 300));
        await writer.stop();
        await writer.verify(client, 'through the switched connection');
        await client.flush();
        const direct = await NbdClient.connect({ socketPath: destination.nbdSocket, exportName: 'live' });
        await writer.verify(direct, 'on the distributed server');
        await direct.disconnect();
      } finally {
        await writer.halt();
        await client.disconnect().catch(() => {});
      }
    } finally {
      assert.equal(await source.stop(), 0, 'the source stops cleanly');
      assert.equal(await destination.stop(), 0, 'the destination stops cleanly');
    }
  });
});
