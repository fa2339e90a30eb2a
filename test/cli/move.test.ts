import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { NbdClient } from '../../node-plugin/nbd/client';
import { ArborServer, cliPath, startServer } from '../support/arbor-server';
import { Random } from '../support/random';
import { Writer } from '../support/verifying-writer';
import { ok } from '../support/run';
import { tempDir } from '../support/tmp';

const MiB = 1024 * 1024;

describe('arbor volume move: a volume in use moves to another store', function () {
  this.timeout(180_000);
  let temp: { dir: string; cleanup: () => void };
  let source: ArborServer;
  let destination: ArborServer;

  before(async () => {
    temp = tempDir();
    [source, destination] = await Promise.all([startServer(path.join(temp.dir, 'a')), startServer(path.join(temp.dir, 'b'))]);
  });
  after(async () => {
    try {
      assert.equal(await source?.stop(), 0, 'the source server stops cleanly on SIGTERM');
      assert.equal(await destination?.stop(), 0, 'the destination server stops cleanly on SIGTERM');
    } finally {
      temp.cleanup();
    }
  });

  it('while a client writes: rounds, a short pause, the connection switched; nothing written is lost, and the volume is served from the destination', async () => {
    await source.cliOk('volume', 'create', 'vm-disk', '--size', '64MiB');
    await source.cliOk('snapshot', 'create', 'vm-disk@before');
    const client = await NbdClient.connect({ socketPath: source.nbdSocket, exportName: 'vm-disk' });
    const writer = new Writer(client, new Random(7), 64 * MiB);
    writer.start();
    try {
      await moveWhileWriting(client, writer);
    } finally {
      await writer.halt();
      await client.disconnect().catch(() => {});
    }
  });

  async function moveWhileWriting(client: NbdClient, writer: Writer): Promise<void> {
    await new Promise((resolve) => setTimeout(resolve, 1500));
    // A small last round: pre-copy goes on until a round changes at most 1 MiB.
    const report = await source.cliOk('volume', 'move', 'vm-disk', '--to', destination.dataDir, '--final-round', '1MiB');
    const writesAtSwitch = writer.writes;
    await new Promise((resolve) => setTimeout(resolve, 1000));
    await writer.stop();
    assert.ok(writer.writes > writesAtSwitch, `the client kept writing after the switch (${writesAtSwitch} then ${writer.writes} writes)`);

    const match = /moved volume vm-disk \(64 MiB\) in \d+ ms, (\d+) rounds; writes paused (\d+) ms; 1 connections switched to the destination/.exec(report);
    assert.ok(match, report);
    assert.match(report, /round 1 \(full\)/);
    assert.match(report, /\(final\): /);
    const pauseMs = Number(match[2]);
    assert.ok(pauseMs < 5000, `the pause (${pauseMs} ms) is within the default --max-pause`);

    // The same connection now reaches the destination (relayed); a new one to the destination reads the same.
    await writer.verify(client, 'through the switched connection');
    await client.flush();
    const direct = await NbdClient.connect({ socketPath: destination.nbdSocket, exportName: 'vm-disk' });
    await writer.verify(direct, 'on the destination directly');
    await direct.disconnect();
    // A client that connects to the source afterwards is sent to the destination too.
    const late = await NbdClient.connect({ socketPath: source.nbdSocket, exportName: 'vm-disk' });
    await writer.verify(late, 'through a connection made to the source after the move');
    await late.disconnect();

    assert.doesNotMatch(await source.cliOk('volume', 'list'), /vm-disk/, 'the source no longer has the volume');
    assert.match(await source.cliOk('snapshot', 'list'), /vm-disk@before/, "the source's own snapshots stay");
    assert.doesNotMatch(await source.cliOk('snapshot', 'list'), /move-/, "the move's snapshots are gone from the source");
    assert.doesNotMatch(await destination.cliOk('snapshot', 'list'), /move-/, 'and from the destination');
    assert.match(await destination.cliOk('volume', 'list'), /vm-disk +64 MiB/);
  }

  it('a last round longer than --max-pause is cancelled: the volume stays on the source, the writer never sees an error, the destination holds nothing', async () => {
    await source.cliOk('volume', 'create', 'busy', '--size', '64MiB');
    const client = await NbdClient.connect({ socketPath: source.nbdSocket, exportName: 'busy' });
    const writer = new Writer(client, new Random(8), 64 * MiB);
    writer.start();
    try {
      await new Promise((resolve) => setTimeout(resolve, 500));
      const result = await source.cli('volume', 'move', 'busy', '--to', destination.dataDir, '--max-pause', '1ms');
      assert.equal(result.status, 1, result.stdout);
      assert.match(
        result.stderr,
        /the last round of moving busy took longer than the longest pause allowed \(1 ms\): cancelled, the volume stays on the source/,
      );
      await new Promise((resolve) => setTimeout(resolve, 300));
      await writer.stop();
      await writer.verify(client, 'on the source after the cancelled move');
    } finally {
      await writer.halt();
      await client.disconnect().catch(() => {});
    }
    assert.match(await source.cliOk('volume', 'list'), /busy/);
    assert.doesNotMatch(await destination.cliOk('volume', 'list'), /busy/, 'the destination keeps no partial copy');
    assert.doesNotMatch(await destination.cliOk('volume', 'list', '--json'), /receive-/, 'nor a staging volume');
    assert.doesNotMatch(await source.cliOk('snapshot', 'list'), /move-/);
    assert.doesNotMatch(await destination.cliOk('snapshot', 'list'), /move-/);
  });

  it('refusals: a destination that has the volume already; a volume in use with no server at the destination to switch it to', async () => {
    await source.cliOk('volume', 'create', 'twin', '--size', '1MiB');
    await destination.cliOk('volume', 'create', 'twin', '--size', '1MiB');
    const twin = await source.cli('volume', 'move', 'twin', '--to', destination.dataDir);
    assert.equal(twin.status, 1);
    assert.match(twin.stderr, /the destination already has a volume twin; delete or rename it there first/);

    const plain = path.join(temp.dir, 'plain');
    const client = await NbdClient.connect({ socketPath: source.nbdSocket, exportName: 'twin' });
    const used = await source.cli('volume', 'move', 'twin', '--to', plain);
    await client.disconnect();
    assert.equal(used.status, 1);
    assert.match(used.stderr, /volume twin is in use \(1 connections\) and its users can only be switched to a running server/);
    assert.match(await source.cliOk('volume', 'list'), /twin/, 'the refused volume stays');
  });

  it('without a server: the CLI moves a volume between two data directories, byte-exact, keeping holes', async () => {
    const dir = path.join(temp.dir, 'offline');
    const arbor = (dataDir: string, ...args: string[]) => ok(process.execPath, [cliPath, '--data-dir', dataDir, ...args]);
    const [from, to] = [path.join(dir, 'from'), path.join(dir, 'to')];
    await arbor(from, 'volume', 'create', 'img', '--size', '16MiB', '--extent-size', '4KiB');
    const rng = new Random(9);
    const image = Buffer.alloc(16 * MiB);
    rng.bytes(3 * MiB).copy(image, 5 * MiB);
    const file = path.join(dir, 'img.raw');
    fs.writeFileSync(file, image);
    await arbor(from, 'volume', 'import', 'img', file);
    assert.match(
      await arbor(from, 'volume', 'move', 'img', '--to', to),
      /moved volume img \(16 MiB\) in \d+ ms, 1 rounds; no connection used it: nothing was paused/,
    );
    const out = path.join(dir, 'out.raw');
    await arbor(to, 'volume', 'export', 'img', out);
    assert.ok(fs.readFileSync(out).equals(image), 'byte-exact at the destination');
    assert.equal(JSON.parse(await arbor(to, 'volume', 'info', 'img', '--json')).allocatedBytes, 3 * MiB, 'only the data moved: holes stay holes');
    assert.doesNotMatch(await arbor(from, 'volume', 'list'), /img/);
  });
});
