import assert from 'node:assert/strict';
import { ChildProcess, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { csiClient } from '../../csi/client';
import { ArborServer, cliPath, startServer } from '../support/arbor-server';
import { connectWithin, distributedForSuite, stamped, stampOf } from '../support/distributed';
import { run } from '../support/run';
import { openStore } from '../../store/open';
import { orphanBlobs } from '../support/store-inspect';
import { tempDir } from '../support/tmp';

const MiB = 1024 * 1024;
const block = 4096;
const leaseTtl = '2s';

/**
 * Two `arbor node` processes and one `arbor controller`, each its own process, on
 * one real etcd and one real Ceph RGW. Any node serves any volume; a volume has one
 * owner at a time; an owner that died or stalled loses it after the lease TTL.
 */
describe('many nodes on etcd and S3: ownership, takeover, fencing, snapshots through the owner', function () {
  this.timeout(180_000);
  // Outside the inner suite, so etcd and RGW stop after the Arbor processes.
  const servers = distributedForSuite();
  describe('two arbor node processes and one arbor controller', () => {
    let dir: { dir: string; cleanup: () => void };
    let nodeA: ArborServer;
    let nodeB: ArborServer;
    let controller: ChildProcess;
    let controllerLog = '';
    const csiSocket = (name: string) => path.join(dir.dir, `${name}.csi.sock`);
    const storeArgs = () => servers.args(servers.location('multi', dir.dir));

    const startNode = async (name: string): Promise<ArborServer> => {
      const nodeDir = path.join(dir.dir, name);
      fs.mkdirSync(nodeDir, { recursive: true });
      return startServer(
        nodeDir,
        [...storeArgs(), '--lease-ttl', leaseTtl, '--cache-dir', path.join(nodeDir, 'cache'), '--node-id', name, '--csi-endpoint', `unix://${csiSocket(name)}`],
        'node',
      );
    };

    const createVolume = async (name: string): Promise<string> => {
      const csi = csiClient(csiSocket('controller'));
      try {
        const response = await csi.controller.CreateVolume({
          name,
          capacity_range: { required_bytes: String(64 * MiB) },
          volume_capabilities: [{ access_mode: { mode: 'SINGLE_NODE_WRITER' }, block: {} }],
        });
        return (response as { volume: { volume_id: string } }).volume.volume_id;
      } finally {
        csi.close();
      }
    };

    before(async () => {
      dir = tempDir();
      nodeA = await startNode('node-a');
      nodeB = await startNode('node-b');
      controller = spawn(
        process.execPath,
        [cliPath, '--data-dir', path.join(dir.dir, 'controller'), 'controller', ...storeArgs(), '--csi-endpoint', `unix://${csiSocket('controller')}`],
        {
          stdio: ['ignore', 'ignore', 'pipe'],
          env: servers.env(),
        },
      );
      controller.stderr!.on('data', (d) => (controllerLog += d));
      for (let i = 0; i < 200 && !controllerLog.includes('arbor controller serving'); i++) await new Promise((r) => setTimeout(r, 50));
      assert.match(controllerLog, /arbor controller serving/, controllerLog);
    });

    after(async () => {
      if (controller && controller.exitCode === null) {
        const exited = new Promise((r) => controller.once('exit', r));
        controller.kill('SIGTERM');
        await exited;
      }
      await nodeA?.stop();
      await nodeB?.stop();
      dir?.cleanup();
    });

    it('a volume written and flushed on node A is read whole on node B once A lets go', async () => {
      await createVolume('moves');
      const data = crypto.randomBytes(8 * MiB);
      const onA = (await connectWithin(nodeA, 'moves')).client;
      await onA.write(0, data.subarray(0, 4 * MiB));
      await onA.write(32 * MiB, data.subarray(4 * MiB));
      await onA.flush();
      // While A holds it, B cannot serve it.
      await assert.rejects(connectWithin(nodeB, 'moves'), /attached on node node-a/);
      await onA.disconnect();
      const onB = (await connectWithin(nodeB, 'moves', 5000)).client;
      assert.ok((await onB.read(0, 4 * MiB)).equals(data.subarray(0, 4 * MiB)));
      assert.ok((await onB.read(32 * MiB, 4 * MiB)).equals(data.subarray(4 * MiB)));
      assert.ok((await onB.read(8 * MiB, MiB)).equals(Buffer.alloc(MiB)));
      await onB.disconnect();
    });

    it('CSI: a filesystem staged and written on node A, unstaged, is staged on node B with every file there', async () => {
      const volumeId = await createVolume('files');
      const capability = { access_mode: { mode: 'SINGLE_NODE_WRITER' }, mount: { fs_type: 'ext4' } };
      const controllerCsi = csiClient(csiSocket('controller'));
      const stageOn = async (node: string) => {
        const published = (await controllerCsi.controller.ControllerPublishVolume({ volume_id: volumeId, node_id: node, volume_capability: capability })) as {
          publish_context: Record<string, string>;
        };
        const staging = path.join(dir.dir, `${node}-staging`);
        fs.mkdirSync(staging, { recursive: true });
        const nodeCsi = csiClient(csiSocket(node));
        await nodeCsi.node.NodeStageVolume({
          volume_id: volumeId,
          staging_target_path: staging,
          volume_capability: capability,
          publish_context: published.publish_context,
        });
        return {
          staging,
          unstage: async () => {
            await nodeCsi.node.NodeUnstageVolume({ volume_id: volumeId, staging_target_path: staging });
            nodeCsi.close();
            await controllerCsi.controller.ControllerUnpublishVolume({ volume_id: volumeId, node_id: node });
          },
        };
      };
      try {
        const onA = await stageOn('node-a');
        const payload = crypto.randomBytes(3 * MiB);
        fs.writeFileSync(path.join(onA.staging, 'written-on-a.bin'), payload);
        await onA.unstage();
        const onB = await stageOn('node-b');
        assert.ok(fs.readFileSync(path.join(onB.staging, 'written-on-a.bin')).equals(payload));
        await onB.unstage();
      } finally {
        controllerCsi.close();
      }
    });

    it('the arbor CLI joins the same store: it lists, snapshots an attached volume through its owner, and exports a snapshot', async () => {
      const cli = (...args: string[]) =>
        run(process.execPath, [cliPath, '--data-dir', path.join(dir.dir, 'cli'), ...storeArgs(), ...args], { env: servers.env() });
      await createVolume('by-cli');
      const onA = (await connectWithin(nodeA, 'by-cli')).client;
      const data = crypto.randomBytes(MiB);
      await onA.write(2 * MiB, data);
      // Acknowledged, not flushed: a snapshot through the owner must still hold it.
      const snap = await cli('snapshot', 'create', 'by-cli@cli-snap');
      assert.equal(snap.status, 0, snap.stderr);
      const listed = await cli('volume', 'list', '--json');
      assert.equal(listed.status, 0, listed.stderr);
      assert.ok((JSON.parse(listed.stdout) as Array<{ name: string }>).some((v) => v.name === 'by-cli'));
      const busy = await cli('volume', 'export', 'by-cli', path.join(dir.dir, 'x.raw'));
      assert.equal(busy.status, 1);
      assert.match(busy.stderr, /by-cli.*attached on node node-a/);
      const out = path.join(dir.dir, 'snap.raw');
      const exported = await cli('volume', 'export', 'by-cli@cli-snap', out);
      assert.equal(exported.status, 0, exported.stderr);
      assert.ok(
        fs
          .readFileSync(out)
          .subarray(2 * MiB, 3 * MiB)
          .equals(data),
      );
      await onA.disconnect();
    });

    it('a snapshot asked of the controller while node A writes holds a prefix of the writes, at least those acknowledged before it was asked', async () => {
      const volumeId = await createVolume('busy');
      const onA = (await connectWithin(nodeA, 'busy')).client;
      let acknowledged = 0;
      let stop = false;
      const writer = (async () => {
        for (let i = 0; !stop && i < 4000; i++) {
          await onA.write(i * block, stamped(i + 1));
          acknowledged = i + 1;
        }
      })();
      while (acknowledged < 200) await new Promise((r) => setTimeout(r, 5));
      const before = acknowledged;
      const csi = csiClient(csiSocket('controller'));
      const snapshot = (await csi.controller.CreateSnapshot({ name: 'busy-snap', source_volume_id: volumeId })) as { snapshot: { ready_to_use: boolean } };
      csi.close();
      stop = true;
      await writer;
      assert.equal(snapshot.snapshot.ready_to_use, true);
      const image = (await connectWithin(nodeB, 'busy@busy-snap')).client;
      const content = await image.read(0, 4000 * block);
      await image.disconnect();
      let prefix = 0;
      while (prefix < 4000 && stampOf(content.subarray(prefix * block, (prefix + 1) * block)) === prefix + 1) prefix++;
      for (let i = prefix; i < 4000; i++)
        assert.equal(stampOf(content.subarray(i * block, (i + 1) * block)), 0, `block ${i} after the prefix of ${prefix} is not empty`);
      assert.ok(prefix >= before, `the snapshot holds ${prefix} writes; ${before} were acknowledged before it was asked`);
      await onA.disconnect();
    });

    it('a group snapshot of volumes attached on two nodes cuts both at one instant', async () => {
      const idX = await createVolume('group-x');
      const idY = await createVolume('group-y');
      const onA = (await connectWithin(nodeA, 'group-x')).client;
      const onB = (await connectWithin(nodeB, 'group-y')).client;
      // One writer alternating between the volumes: write k goes to x when k is odd, to y when even.
      let acknowledged = 0;
      let stop = false;
      const writer = (async () => {
        for (let k = 1; !stop && k <= 4000; k++) {
          await (k % 2 ? onA : onB).write(Math.floor((k - 1) / 2) * block, stamped(k));
          acknowledged = k;
        }
      })();
      while (acknowledged < 100) await new Promise((r) => setTimeout(r, 5));
      const before = acknowledged;
      const csi = csiClient(csiSocket('controller'));
      await csi.group.CreateVolumeGroupSnapshot({ name: 'pair', source_volume_ids: [idX, idY] });
      csi.close();
      stop = true;
      await writer;
      const [first] = [idX, idY].sort();
      const snapshotOf = (id: string) => `pair.${id === first ? 0 : 1}`;
      const stamps = new Set<number>();
      for (const [volume, id, parity] of [
        ['group-x', idX, 1],
        ['group-y', idY, 0],
      ] as const) {
        const image = (await connectWithin(nodeB, `${volume}@${snapshotOf(id)}`)).client;
        const content = await image.read(0, 2000 * block);
        await image.disconnect();
        for (let i = 0; i < 2000; i++) {
          const stamp = stampOf(content.subarray(i * block, (i + 1) * block));
          if (stamp === 0) continue;
          assert.ok(stamp !== 'mixed' && stamp % 2 === parity && Math.floor((stamp - 1) / 2) === i, `${volume} block ${i} holds ${stamp}`);
          stamps.add(stamp);
        }
      }
      // One instant: the writes in the group are exactly the first m of the sequence, across both volumes.
      const m = stamps.size;
      for (let k = 1; k <= m; k++) assert.ok(stamps.has(k), `write ${k} is missing while ${m} writes are in the group snapshot`);
      assert.ok(m >= before, `the group holds ${m} writes; ${before} were acknowledged before it was asked`);
      await onA.disconnect();
      await onB.disconnect();
    });

    it('node A killed while it writes: node B takes over after the lease TTL with every flushed write and nothing that was never acknowledged', async () => {
      await createVolume('crash');
      const onA = (await connectWithin(nodeA, 'crash')).client;
      let acknowledged = 0;
      let durable = 0;
      const writer = (async () => {
        for (let i = 0; i < 20000; i++) {
          await onA.write(i * block, stamped(i + 1));
          acknowledged = i + 1;
          if (acknowledged % 16 === 0) {
            const covered = acknowledged;
            await onA.flush();
            durable = covered;
          }
        }
      })().catch(() => {});
      while (durable < 64) await new Promise((r) => setTimeout(r, 5));
      await nodeA.kill();
      await writer;
      const { client: onB, waitedMs } = await connectWithin(nodeB, 'crash', 20_000);
      const content = await onB.read(0, (acknowledged + 2) * block);
      await onB.disconnect();
      for (let i = 0; i < durable; i++) assert.equal(stampOf(content.subarray(i * block, (i + 1) * block)), i + 1, `flushed block ${i} is lost`);
      for (let i = durable; i < acknowledged + 2; i++) {
        const stamp = stampOf(content.subarray(i * block, (i + 1) * block));
        // Written but not flushed: there or not; past what was acknowledged (and the one in flight): never.
        assert.ok(stamp === 0 || (stamp === i + 1 && i <= acknowledged), `block ${i} holds ${stamp}`);
      }
      assert.ok(waitedMs < 15_000, `node B waited ${waitedMs} ms`);
      console.log(`      ${durable} flushed, ${acknowledged} acknowledged; node B served the volume ${waitedMs} ms after the kill`);
      nodeA = await startNode('node-a');
    });

    it('a paused owner (SIGSTOP) loses the volume; resumed after node B took over, it cannot put a single byte into it', async () => {
      await createVolume('fenced');
      const onA = (await connectWithin(nodeA, 'fenced')).client;
      await onA.write(0, stamped(1));
      await onA.flush();
      await onA.write(0, stamped(2)); // acknowledged, not flushed
      process.kill(nodeA.pid, 'SIGSTOP');
      try {
        const { client: onB } = await connectWithin(nodeB, 'fenced', 20_000);
        assert.equal(stampOf(await onB.read(0, block)), 1, 'B sees the flushed write, not the unflushed one');
        await onB.write(block, stamped(3));
        await onB.flush();
        process.kill(nodeA.pid, 'SIGCONT');
        // The old owner wakes with a client still connected: whatever it tries fails, and nothing lands.
        const late = async () => {
          await onA.write(2 * block, stamped(4));
          await onA.write(0, stamped(5));
          await onA.flush();
        };
        await assert.rejects(late(), /.*/).catch((err) => {
          console.log(nodeA.log().split('\n').slice(-25).join('\n'));
          throw err;
        });
        await new Promise((r) => setTimeout(r, 1000));
        assert.equal(stampOf(await onB.read(0, block)), 1);
        assert.equal(stampOf(await onB.read(block, block)), 3);
        assert.equal(stampOf(await onB.read(2 * block, block)), 0);
        await onB.disconnect();
        await onA.disconnect().catch(() => {});
      } finally {
        try {
          process.kill(nodeA.pid, 'SIGCONT');
        } catch {
          // already running or gone
        }
      }
      // And once B let go, the old owner can take it again, with B's data.
      const again = (await connectWithin(nodeA, 'fenced', 10_000)).client;
      assert.equal(stampOf(await again.read(block, block)), 3);
      await again.disconnect();
    });

    // Last, on purpose: node A here is the process that was paused and lost its lease above,
    // so the ids it hands out must come from batches recorded on its new lease.
    it('the collector runs while both nodes write, snapshot and drop snapshots: no flushed byte is lost, and in the end nothing is left unreachable', async () => {
      const cli = (...args: string[]) =>
        run(process.execPath, [cliPath, '--data-dir', path.join(dir.dir, 'gc-cli'), ...storeArgs(), ...args], { env: servers.env() });
      const ids = { a: await createVolume('gc-a'), b: await createVolume('gc-b') };
      const clients = { a: (await connectWithin(nodeA, 'gc-a')).client, b: (await connectWithin(nodeB, 'gc-b')).client };
      const flushed = { a: new Map<number, Buffer>(), b: new Map<number, Buffer>() };
      const extent = 64 * 1024;
      let stop = false;
      const writer = async (side: 'a' | 'b') => {
        const csi = csiClient(csiSocket('controller'));
        const pending = new Map<number, Buffer>();
        for (let i = 0; !stop; i++) {
          const offset = crypto.randomInt(0, 256) * extent;
          const data = crypto.randomBytes(extent);
          await clients[side].write(offset, data);
          pending.set(offset, data);
          if (i % 8 === 7) {
            await clients[side].flush();
            for (const [o, d] of pending) flushed[side].set(o, d);
            pending.clear();
          }
          // Snapshots taken and dropped: what only they held is the collector's to free.
          if (i % 40 === 20) await csi.controller.CreateSnapshot({ name: `gc-${side}-${i}`, source_volume_id: ids[side] });
          if (i % 40 === 39) {
            const listed = (await csi.controller.ListSnapshots({ source_volume_id: ids[side] })) as { entries: Array<{ snapshot: { snapshot_id: string } }> };
            for (const entry of listed.entries) await csi.controller.DeleteSnapshot({ snapshot_id: entry.snapshot.snapshot_id });
          }
        }
        await clients[side].flush();
        for (const [o, d] of pending) flushed[side].set(o, d);
        csi.close();
      };
      const writers = [writer('a'), writer('b')];
      const passes: string[] = [];
      for (let pass = 0; pass < 3; pass++) {
        await new Promise((r) => setTimeout(r, 1500));
        const gc = await cli('gc');
        assert.equal(gc.status, 0, gc.stderr);
        passes.push(gc.stdout.trim());
      }
      stop = true;
      await Promise.all(writers);
      for (const side of ['a', 'b'] as const) {
        for (const [offset, data] of flushed[side])
          assert.ok((await clients[side].read(offset, extent)).equals(data), `gc-${side} at ${offset} lost a flushed write`);
        await clients[side].disconnect();
      }
      // With every node gone (their id batches with them), a last pass leaves nothing unreachable.
      await nodeA.stop();
      await nodeB.stop();
      const inspector = await openStore(servers.location('multi', dir.dir), { nodeId: 'inspector', ephemeralCache: true });
      try {
        const last = await inspector.collectGarbage();
        assert.ok(last.freedBlobs > 0, 'what the dropped snapshots held is freed once no live node shields it');
        assert.deepEqual(await orphanBlobs(inspector), []);
        for (const side of ['a', 'b'] as const) {
          const volume = await inspector.openVolume({ name: `gc-${side}` });
          for (const [offset, data] of flushed[side])
            assert.ok((await volume.read(offset, extent)).equals(data), `gc-${side} at ${offset}, read by another process`);
        }
      } finally {
        await inspector.close();
      }
      console.log(`      ${passes.join('; ')}`);
    });
  });
});
