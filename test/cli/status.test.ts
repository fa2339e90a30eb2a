import assert from 'node:assert/strict';
import path from 'node:path';
import { NbdClient } from '../../node-plugin/nbd/client';
import type { ServerStatus, VolumeStatus } from '../../cli/status';
import { cliPath, startServer } from '../support/arbor-server';
import { ok, run } from '../support/run';
import { tempDir } from '../support/tmp';

const KiB = 1024;
const extentSize = 64 * KiB;

describe('arbor status: what a running server holds', function () {
  this.timeout(30_000);

  it('says clearly that no server runs, naming the data directory and how to start one (exit 1)', async () => {
    const { dir, cleanup } = tempDir();
    try {
      const dataDir = path.join(dir, 'nowhere');
      const result = await run(process.execPath, [cliPath, '--data-dir', dataDir, 'status']);
      assert.equal(result.status, 1);
      assert.match(result.stderr, new RegExp(`no Arbor server is running on ${dataDir}`));
      assert.match(result.stderr, /arbor --data-dir \S+ serve/);
    } finally {
      cleanup();
    }
  });

  it('shows a volume open with its connection and what it holds uncommitted, then committed after a flush, and the last gc', async () => {
    const { dir, cleanup } = tempDir();
    const server = await startServer(dir);
    let client: NbdClient | undefined;
    try {
      await server.cliOk('volume', 'create', 'written', '--size', '16MiB', '--extent-size', '64KiB');
      await server.cliOk('volume', 'create', 'idle', '--size', '16MiB');
      const status = async (): Promise<ServerStatus> => JSON.parse(await server.cliOk('status', '--json')) as ServerStatus;
      const volume = (s: ServerStatus, name: string): VolumeStatus => {
        const found = s.volumes.find((v) => v.name === name);
        assert.ok(found, `${name} is open: ${JSON.stringify(s.volumes)}`);
        return found;
      };

      const before = await status();
      assert.equal(before.pid, server.pid);
      assert.equal(before.nbdSocket, server.nbdSocket);
      assert.equal(before.nbdConnections, 0);
      assert.equal(before.lastGc, undefined, 'no gc yet');

      // Three extents written (two by one write across a boundary), nothing flushed.
      client = await NbdClient.connect({ socketPath: server.nbdSocket, exportName: 'written' });
      await client.write(extentSize - 4 * KiB, Buffer.alloc(8 * KiB, 0xab));
      await client.write(1024 * KiB, Buffer.alloc(4 * KiB, 0xcd));
      const dirty = await status();
      assert.equal(dirty.nbdConnections, 1);
      assert.deepEqual(dirty.nbdConnectionsByExport, { written: 1 });
      const written = volume(dirty, 'written');
      assert.equal(written.nbdConnections, 1);
      assert.equal(written.uncommittedExtents, 3);
      assert.equal(written.uncommittedBytes, 3 * extentSize);
      assert.ok(written.uncommittedMapNodes > 0, 'the map changed too');
      assert.ok(written.uncommittedForMs !== undefined && written.uncommittedForMs >= 0);
      assert.ok(!dirty.volumes.some((v) => v.name === 'idle'), 'a volume no one opened is not listed');
      const text = await server.cliOk('status');
      assert.match(text, new RegExp(`pid ${server.pid}\\b`));
      assert.match(text, /^written\s+1\s+192 KiB in 3 extents, for \d+ ms\s/m);

      const flushedAfter = Date.now();
      await client.flush();
      const clean = volume(await status(), 'written');
      assert.equal(clean.uncommittedExtents, 0);
      assert.equal(clean.uncommittedBytes, 0);
      assert.equal(clean.uncommittedMapNodes, 0);
      assert.equal(clean.uncommittedForMs, undefined);
      assert.ok(clean.lastCommitAt && Date.parse(clean.lastCommitAt) >= flushedAfter - 5, `committed by the flush: ${clean.lastCommitAt}`);
      await client.disconnect();
      client = undefined;

      // A snapshot deleted leaves blobs only the collector frees; the status shows what it freed.
      await server.cliOk('snapshot', 'create', 'written@s');
      await ok('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 128k', server.uri('written')]);
      await server.cliOk('snapshot', 'rm', 'written@s');
      await server.cliOk('gc');
      const collected = await status();
      assert.ok(collected.lastGc, 'the last gc is shown');
      assert.ok(collected.lastGc.freedBlobs > 0, 'the extents only the snapshot held are freed');
      assert.ok(Date.parse(collected.lastGc.endedAt) >= flushedAfter);
      assert.match(await server.cliOk('status'), /gc {5}last at \d\d:\d\d:\d\d \(\d+ s ago\): freed \d+ of \d+ blobs in \d+ ms/);
    } finally {
      await client?.disconnect().catch(() => {});
      assert.equal(await server.stop(), 0);
      cleanup();
    }
  });
});
