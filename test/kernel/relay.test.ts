import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { issue, makeCa } from '../support/certs';
import { configuredNbdDevices, GuestArbor, startGuestArbor } from '../support/test-node/guest-arbor';
import { GuestProcess, TestNode } from '../support/test-node/test-node';
import { tempDir } from '../support/tmp';

const MiB = 1024 * 1024;
const dir = '/tmp/arbor-relay';
const stampWriter = path.resolve(__dirname, '..', '..', '..', 'test', 'kernel', 'stamp_writer.py');
const block = { access_mode: { mode: 'SINGLE_NODE_WRITER' }, block: {} };

/**
 * A node without the data attaches a volume through the kernel's nbd driver: the
 * device is connected to its own node plugin's unix socket, which relays every
 * request to the data node over mutual TLS. Both node plugins run in the test node;
 * each is restarted under a writer with verification, and the device never notices.
 */
describe('a volume relayed from the data node, attached through the kernel, in the test node', function () {
  this.timeout(900_000);
  let node: TestNode;
  let dataNode: GuestArbor;
  let relayNode: GuestArbor;
  const certDir = `${dir}/certs`;
  const tls = ['--tls-cert', `${certDir}/node.pem`, '--tls-key', `${certDir}/node-key.pem`, '--tls-ca', `${certDir}/cluster-ca.pem`];

  const startDataNode = () =>
    startGuestArbor(node, `${dir}/data`, { nodeId: 'data-node', extraArgs: ['--nbd-listen', '127.0.0.1:10809', '--admin-listen', '127.0.0.1:10810', ...tls] });
  const startRelayNode = () =>
    startGuestArbor(node, `${dir}/relay`, {
      command: 'node',
      nodeId: 'relay-node',
      metricsAddress: '127.0.0.1:9821',
      extraArgs: ['--relay-to', '127.0.0.1:10809', '--relay-admin', '127.0.0.1:10810', ...tls],
    });

  before(async function () {
    node = await TestNode.boot();
    // The certificates are made on the host and written into the guest's own /tmp.
    const host = tempDir('arbor-relay-certs-');
    try {
      const ca = await makeCa(host.dir, 'cluster');
      const certificate = await issue(host.dir, ca, 'node');
      await node.ok(['mkdir', '-p', certDir]);
      for (const file of [certificate.caFile, certificate.certFile, certificate.keyFile]) {
        await node.writeFile(`${certDir}/${path.basename(file)}`, fs.readFileSync(file), 0o600);
      }
    } finally {
      host.cleanup();
    }
    dataNode = await startDataNode();
    relayNode = await startRelayNode();
  });

  after(async () => {
    try {
      if (relayNode) assert.equal(await relayNode.stop(), 0, 'the relay node stops cleanly');
      if (dataNode) assert.equal(await dataNode.stop(), 0, 'the data node stops cleanly');
      if (node) assert.deepEqual(await configuredNbdDevices(node), [], 'no nbd device is left configured');
    } finally {
      await node?.shutdown();
    }
  });

  function writer(target: string, blocks: number, name: string): Promise<{ process: GuestProcess; state: string; stop: string }> {
    const state = `${dir}/${name}.state`;
    const stop = `${dir}/${name}.stop`;
    return node.spawn(['python3', stampWriter, 'write', target, String(blocks), state, stop, '4']).then((process) => ({ process, state, stop }));
  }

  it('the device writes through the relay; the relay node and the data node restarted under it, no I/O error, every completed write is on the data node', async () => {
    const { volume } = (await dataNode.csi.controller.CreateVolume({
      name: 'relayed',
      volume_capabilities: [block],
      capacity_range: { required_bytes: String(64 * MiB) },
    })) as { volume: { volume_id: string; volume_context: Record<string, string> } };
    const id = volume.volume_id;
    const published = (await dataNode.csi.controller.ControllerPublishVolume({ volume_id: id, node_id: 'relay-node', volume_capability: block })) as {
      publish_context: Record<string, string>;
    };
    const staging = `${dir}/kubelet/${id}/globalmount`;
    const target = `${dir}/kubelet/pods/relayed/volume`;
    await node.ok(['mkdir', '-p', staging]);
    await relayNode.csi.node.NodeStageVolume({
      volume_id: id,
      staging_target_path: staging,
      volume_capability: block,
      publish_context: published.publish_context,
      volume_context: volume.volume_context,
    });
    await relayNode.csi.node.NodePublishVolume({ volume_id: id, staging_target_path: staging, target_path: target, volume_capability: block });
    const devices = (await configuredNbdDevices(node)).filter((d) => d.backend === id);
    assert.equal(devices.length, 1, 'one kernel nbd device carries the volume');

    const blocks = 2048;
    const w = await writer(target, blocks, 'relayed');
    const pause = () => new Promise((resolve) => setTimeout(resolve, 2000));
    const healthy = async () =>
      !((await relayNode.csi.node.NodeGetVolumeStats({ volume_id: id, volume_path: target })) as { volume_condition: { abnormal: boolean } }).volume_condition
        .abnormal;
    for (const restart of ['relay SIGTERM', 'relay SIGTERM', 'relay SIGKILL', 'data node SIGTERM'] as const) {
      await pause();
      if (restart === 'data node SIGTERM') {
        assert.equal(await dataNode.stop(), 0);
        dataNode = await startDataNode();
      } else {
        if (restart === 'relay SIGTERM') assert.equal(await relayNode.stop(), 0);
        else await relayNode.kill();
        relayNode = await startRelayNode();
      }
      assert.ok(await healthy(), `after a ${restart}, the device has its connections again`);
      assert.deepEqual(
        (await configuredNbdDevices(node)).filter((d) => d.backend === id),
        devices,
        'the same device',
      );
    }
    await pause();
    await node.ok(['touch', w.stop]);
    const ended = await w.process.wait(180_000);
    assert.ok(ended, 'the writer stopped');
    assert.equal(ended.status, 0, `the writer saw no I/O error:\n${await w.process.output()}`);
    const result = JSON.parse((await node.readFile(w.state)).toString()) as { writes: number; longestWriteSeconds: number };
    console.log(`      ${result.writes} writes through the relay across 4 restarts; the longest took ${result.longestWriteSeconds.toFixed(1)} s`);
    await node.ok(['python3', stampWriter, 'verify', target, String(blocks), w.state]);
    // And on the data node itself, from its own store.
    await dataNode.cli('volume', 'export', 'relayed', `${dir}/relayed.raw`);
    await node.ok(['python3', stampWriter, 'verify', `${dir}/relayed.raw`, String(blocks), w.state]);
    await node.ok(['rm', '-f', `${dir}/relayed.raw`]);
    assert.doesNotMatch(await node.ok(['dmesg']), /I\/O error, dev nbd/, 'the kernel logged no I/O error');

    await relayNode.csi.node.NodeUnpublishVolume({ volume_id: id, target_path: target });
    await relayNode.csi.node.NodeUnstageVolume({ volume_id: id, staging_target_path: staging });
    await dataNode.csi.controller.ControllerUnpublishVolume({ volume_id: id, node_id: 'relay-node' });
  });
});
