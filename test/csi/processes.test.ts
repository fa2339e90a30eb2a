import assert from 'node:assert/strict';
import { ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { csiClient, expectCode, readAll, status } from '../../csi/client';
import { NbdClient } from '../../node-plugin/nbd/client';
import { ArborServer, cliPath, startServer } from '../support/arbor-server';
import { run } from '../support/run';
import { tempDir } from '../support/tmp';

const MiB = 1024 * 1024;

/**
 * The two sides in their own processes on one host: `arbor node` holds the embedded
 * data directory (NBD, admin socket, CSI Node), `arbor controller` serves the CSI
 * Controller through the node's admin socket. And `arbor csi call` drives either.
 */
describe('arbor node and arbor controller as separate processes; arbor csi call', function () {
  this.timeout(120_000);
  let dir: { dir: string; cleanup: () => void };
  let node: ArborServer;
  let controller: ChildProcess;
  let controllerLog = '';
  const nodeSocket = () => path.join(dir.dir, 'node.sock');
  const controllerSocket = () => path.join(dir.dir, 'controller.sock');
  const call = (socket: string, method: string, request?: object) =>
    run(process.execPath, [cliPath, 'csi', 'call', method, ...(request ? [JSON.stringify(request)] : []), '--csi-endpoint', `unix://${socket}`]);

  before(async () => {
    dir = tempDir();
    node = await startServer(dir.dir, ['--node-id', 'node-a', '--csi-endpoint', `unix://${nodeSocket()}`], 'node');
    controller = spawn(
      process.execPath,
      [cliPath, '--data-dir', node.dataDir, 'controller', '--csi-endpoint', `unix://${controllerSocket()}`, '--node-id', 'node-a'],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    controller.stderr!.on('data', (d) => (controllerLog += d));
    for (let i = 0; i < 100 && !controllerLog.includes('arbor controller serving'); i++) await new Promise((r) => setTimeout(r, 50));
    assert.match(controllerLog, /arbor controller serving/);
  });
  after(async () => {
    const exited = new Promise((r) => controller.once('exit', r));
    controller.kill('SIGTERM');
    await exited;
    await node.stop();
    dir.cleanup();
  });

  it("the node offers no controller; the controller creates on the node's store; the node stages it", async () => {
    const caps = JSON.parse((await call(nodeSocket(), 'Identity.GetPluginCapabilities')).stdout).capabilities as Array<{ service?: { type: string } }>;
    assert.ok(!caps.some((c) => c.service?.type === 'CONTROLLER_SERVICE'), 'arbor node offers no controller service');
    assert.ok(!caps.some((c) => c.service?.type === 'SNAPSHOT_METADATA_SERVICE'), 'nor the snapshot metadata service');
    const created = await call(controllerSocket(), 'Controller.CreateVolume', {
      name: 'split',
      volume_capabilities: [{ access_mode: { mode: 'SINGLE_NODE_WRITER' }, mount: {} }],
      capacity_range: { required_bytes: String(64 * MiB) },
    });
    assert.equal(created.status, 0, created.stderr);
    const volume = JSON.parse(created.stdout).volume;
    assert.deepEqual(volume.accessible_topology, [{ segments: { 'topology.csi.arbor.dev/node': 'node-a' } }]);
    const published = JSON.parse(
      (
        await call(controllerSocket(), 'Controller.ControllerPublishVolume', {
          volume_id: volume.volume_id,
          node_id: 'node-a',
          volume_capability: { access_mode: { mode: 'SINGLE_NODE_WRITER' }, mount: {} },
        })
      ).stdout,
    );
    const csi = csiClient(nodeSocket());
    const staging = path.join(dir.dir, 'staging');
    fs.mkdirSync(staging);
    await csi.node.NodeStageVolume({
      volume_id: volume.volume_id,
      staging_target_path: staging,
      volume_capability: { access_mode: { mode: 'SINGLE_NODE_WRITER' }, mount: {} },
      publish_context: published.publish_context,
    });
    fs.writeFileSync(path.join(staging, 'from-node-a'), 'ok');
    await csi.node.NodeUnstageVolume({ volume_id: volume.volume_id, staging_target_path: staging });
    csi.close();
    const listed = JSON.parse((await call(controllerSocket(), 'Controller.ListVolumes', {})).stdout);
    assert.equal(listed.entries.length, 1);
  });

  it("arbor controller serves SnapshotMetadata through the node's admin socket", async () => {
    const controllerCaps = JSON.parse((await call(controllerSocket(), 'Identity.GetPluginCapabilities')).stdout).capabilities as Array<{
      service?: { type: string };
    }>;
    assert.ok(controllerCaps.some((c) => c.service?.type === 'SNAPSHOT_METADATA_SERVICE'));
    const csi = csiClient(controllerSocket());
    try {
      const block = { access_mode: { mode: 'SINGLE_NODE_WRITER' }, block: {} };
      const { volume } = (await csi.controller.CreateVolume({
        name: 'tracked',
        volume_capabilities: [block],
        capacity_range: { required_bytes: String(4 * MiB) },
        parameters: { extentSize: '64KiB' },
      })) as { volume: { volume_id: string } };
      const nbd = await NbdClient.connect({ socketPath: node.nbdSocket, exportName: 'tracked' });
      await nbd.write(MiB, Buffer.alloc(128 * 1024, 1));
      const before = ((await csi.controller.CreateSnapshot({ source_volume_id: volume.volume_id, name: 'tracked-1' })).snapshot as { snapshot_id: string })
        .snapshot_id;
      await nbd.write(3 * MiB, Buffer.alloc(4096, 2));
      await nbd.disconnect();
      const after = ((await csi.controller.CreateSnapshot({ source_volume_id: volume.volume_id, name: 'tracked-2' })).snapshot as { snapshot_id: string })
        .snapshot_id;
      const tuples = (messages: Array<{ block_metadata: Array<{ byte_offset: string; size_bytes: string }> }>) =>
        messages.flatMap((m) => m.block_metadata.map((t) => [Number(t.byte_offset), Number(t.size_bytes)]));
      const allocated = await readAll<{ block_metadata: Array<{ byte_offset: string; size_bytes: string }> }>(
        csi.metadata.GetMetadataAllocated({ snapshot_id: after, starting_offset: '0' }),
      );
      assert.deepEqual(tuples(allocated), [
        [MiB, 128 * 1024],
        [3 * MiB, 64 * 1024],
      ]);
      const delta = await readAll<{ block_metadata: Array<{ byte_offset: string; size_bytes: string }> }>(
        csi.metadata.GetMetadataDelta({ base_snapshot_id: before, target_snapshot_id: after, starting_offset: '0' }),
      );
      assert.deepEqual(tuples(delta), [[3 * MiB, 64 * 1024]]);
      await expectCode(
        readAll(csi.metadata.GetMetadataAllocated({ snapshot_id: 'snap-0123456789abcdef', starting_offset: '0' })),
        status.NOT_FOUND,
        'the store’s not-found crosses the admin socket',
      );
    } finally {
      csi.close();
    }
  });

  it('arbor csi call reports CSI errors and bad requests clearly', async () => {
    const missing = await call(controllerSocket(), 'Controller.ControllerGetVolume', { volume_id: 'vol-0000000000000000' });
    assert.equal(missing.status, 1);
    assert.match(missing.stderr, /Controller.ControllerGetVolume: NOT_FOUND: volume vol-0000000000000000 does not exist/);
    const unknown = await call(controllerSocket(), 'Controller.Explode');
    assert.equal(unknown.status, 2);
    assert.match(unknown.stderr, /Controller has no method Explode/);
    const notJson = await run(process.execPath, [cliPath, 'csi', 'call', 'Identity.Probe', '{nope', '--csi-endpoint', `unix://${nodeSocket()}`]);
    assert.equal(notJson.status, 2);
    assert.match(notJson.stderr, /REQUEST is not JSON/);
  });
});
