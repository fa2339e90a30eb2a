import assert from 'node:assert/strict';
import { ChildProcess, spawn } from 'node:child_process';
import path from 'node:path';
import { AdminClient } from '../../cli/admin/client';
import { adminSocketPath } from '../../cli/session';
import { csiClient, CsiClient, expectCode, status } from '../../csi/client';
import { NbdClient } from '../../node-plugin/nbd/client';
import { ArborServer, cliPath, serverForSuite, startServer } from '../support/arbor-server';
import { tempDir } from '../support/tmp';

const MiB = 1024 * 1024;
const block = (mode: string) => ({ access_mode: { mode }, block: {} });
const mount = (mode: string, fsType = '') => ({ access_mode: { mode }, mount: { fs_type: fsType, mount_flags: [] } });
const rwx = block('MULTI_NODE_MULTI_WRITER');

interface VolumeMessage {
  volume_id: string;
  accessible_topology: Array<{ segments: Record<string, string> }>;
}
interface VolumeStatus {
  published_node_ids: string[];
}

/** The CSI calls these tests make, over one controller socket. */
function calls(csi: () => CsiClient) {
  const create = async (name: string, capabilities: object[] = [rwx], extra: object = {}) =>
    (
      (await csi().controller.CreateVolume({ name, volume_capabilities: capabilities, capacity_range: { required_bytes: String(16 * MiB) }, ...extra })) as {
        volume: VolumeMessage;
      }
    ).volume;
  const publish = (volumeId: string, nodeId: string, capability: object = rwx, readonly = false) =>
    csi().controller.ControllerPublishVolume({ volume_id: volumeId, node_id: nodeId, volume_capability: capability, readonly }) as Promise<{
      publish_context: Record<string, string>;
    }>;
  const unpublish = (volumeId: string, nodeId?: string) => csi().controller.ControllerUnpublishVolume({ volume_id: volumeId, node_id: nodeId ?? '' });
  /** The nodes ListVolumes and ControllerGetVolume report; they must agree. */
  const publishedTo = async (volumeId: string): Promise<string[]> => {
    const listed = (await csi().controller.ListVolumes({})).entries as Array<{ volume: VolumeMessage; status: VolumeStatus }>;
    const fromList = listed.find((e) => e.volume.volume_id === volumeId)!.status.published_node_ids;
    const got = (await csi().controller.ControllerGetVolume({ volume_id: volumeId })).status as VolumeStatus;
    assert.deepEqual([...got.published_node_ids].sort(), [...fromList].sort(), 'ListVolumes and ControllerGetVolume agree');
    return [...fromList].sort();
  };
  return { create, publish, unpublish, publishedTo };
}

/**
 * ReadWriteMany for Block volumes (KubeVirt live migration: the source and the target
 * VM's nodes both have the disk read-write while memory is copied), against
 * `arbor serve` over its real CSI socket. Mount volumes stay single-writer: ext4 and
 * xfs are not cluster filesystems.
 */
describe('CSI controller: Block volumes read-write on many nodes', function () {
  this.timeout(120_000);
  const nodeA = 'node-a';
  const [nodeB, nodeC] = ['node-b', 'node-c'];
  const suite = serverForSuite(async (dir) => ['--csi-endpoint', `unix://${path.join(dir, 'csi.sock')}`, '--node-id', nodeA]);
  let csi: CsiClient;
  let admin: AdminClient;
  const { create, publish, unpublish, publishedTo } = calls(() => csi);
  before(async () => {
    csi = csiClient(path.join(suite.dir, 'csi.sock'));
    admin = (await AdminClient.connect(adminSocketPath(suite.server.dataDir)))!;
    // What the node plugins on other nodes do when they start (relay nodes through the data node's admin API).
    for (const n of [nodeB, nodeC]) await admin.api.registerNode(n, { topology: { 'topology.csi.arbor.dev/node': n } });
  });
  after(() => {
    csi?.close();
    admin?.close();
  });

  it('a Block volume for writers on many nodes is published read-write to a second node while the first still has it', async () => {
    const volume = await create('migrating');
    const onA = await publish(volume.volume_id, nodeA);
    const onB = await publish(volume.volume_id, nodeB);
    assert.deepEqual(onA.publish_context, { export: 'migrating', readOnly: 'false' });
    assert.deepEqual(onB.publish_context, { export: 'migrating', readOnly: 'false' }, 'read-write on the second node too');
    assert.deepEqual((await publish(volume.volume_id, nodeA)).publish_context, onA.publish_context, 'publishing to the same node again is a no-op');
    assert.deepEqual(await publishedTo(volume.volume_id), [nodeA, nodeB]);
    const recorded = (await admin.api.publications(volume.volume_id)).nodes;
    for (const n of [nodeA, nodeB]) assert.deepEqual([recorded[n].readOnly, recorded[n].multiNode, recorded[n].multiNodeWriter], [false, true, true], n);

    // A third node may join read-only (the spec's readonly flag): it is one of the writers' group, not a reader of a frozen volume.
    const readOnlyOnC = await publish(volume.volume_id, nodeC, rwx, true);
    assert.equal(readOnlyOnC.publish_context.readOnly, 'true');
    await expectCode(publish(volume.volume_id, nodeC), status.ALREADY_EXISTS, 'the same node, now read-write');
    assert.deepEqual(await publishedTo(volume.volume_id), [nodeA, nodeB, nodeC]);

    // Both nodes attach the one export the publish context names and see each other's writes.
    const [source, target] = await Promise.all(
      [onA, onB].map((p) => NbdClient.connect({ socketPath: suite.server.nbdSocket, exportName: p.publish_context.export })),
    );
    await source.write(0, Buffer.alloc(MiB, 0x5a));
    await source.flush();
    assert.ok(
      (await target.read(0, MiB)).every((b) => b === 0x5a),
      'the target node reads what the source node wrote',
    );
    await target.write(MiB, Buffer.alloc(MiB, 0xa5));
    await target.flush();
    assert.ok(
      (await source.read(MiB, MiB)).every((b) => b === 0xa5),
      'and the other way round',
    );
    await Promise.all([source.disconnect(), target.disconnect()]);

    const validated = await csi.controller.ValidateVolumeCapabilities({ volume_id: volume.volume_id, volume_capabilities: [rwx] });
    assert.ok(validated.confirmed, String(validated.message));
    await unpublish(volume.volume_id);
    assert.deepEqual(await publishedTo(volume.volume_id), []);
  });

  it('a Mount volume is refused for writers on many nodes, by CreateVolume, ValidateVolumeCapabilities and ControllerPublishVolume, saying why', async () => {
    const why =
      /access mode MULTI_NODE_MULTI_WRITER is for Block volumes only: ext4 and xfs are not cluster filesystems, and two nodes mounting one would corrupt it; ask for a Block volume/;
    for (const capabilities of [[mount('MULTI_NODE_MULTI_WRITER')], [mount('MULTI_NODE_MULTI_WRITER', 'xfs')], [rwx, mount('MULTI_NODE_MULTI_WRITER')]]) {
      const message = await expectCode(create('shared-fs', capabilities), status.INVALID_ARGUMENT, 'CreateVolume');
      assert.match(message, why);
      assert.match(message, /^volume shared-fs: volume_capabilities\[\d\]/, 'the error names the volume and the field');
    }
    assert.equal(await admin.api.findVolume({ name: 'shared-fs' }), undefined, 'nothing was created');

    // A volume made for both uses: as a Block volume it may have many writers, as a filesystem one.
    const volume = await create('either', [rwx, mount('SINGLE_NODE_WRITER', 'ext4')]);
    const refused = await csi.controller.ValidateVolumeCapabilities({ volume_id: volume.volume_id, volume_capabilities: [mount('MULTI_NODE_MULTI_WRITER')] });
    assert.equal(refused.confirmed, null);
    assert.match(refused.message as string, why);
    assert.match(refused.message as string, /^volume either: /);
    const mixed = await csi.controller.ValidateVolumeCapabilities({
      volume_id: volume.volume_id,
      volume_capabilities: [rwx, mount('MULTI_NODE_MULTI_WRITER')],
    });
    assert.equal(mixed.confirmed, null, 'one capability Arbor cannot serve and none is confirmed');
    const confirmed = await csi.controller.ValidateVolumeCapabilities({
      volume_id: volume.volume_id,
      volume_capabilities: [rwx, mount('SINGLE_NODE_WRITER'), mount('MULTI_NODE_READER_ONLY')],
    });
    assert.ok(confirmed.confirmed, String(confirmed.message));

    const published = await expectCode(publish(volume.volume_id, nodeA, mount('MULTI_NODE_MULTI_WRITER')), status.INVALID_ARGUMENT, 'ControllerPublishVolume');
    assert.match(published, why);
    assert.match(published, new RegExp(`^volume ${volume.volume_id}: volume_capability: `));
    assert.deepEqual(await publishedTo(volume.volume_id), [], 'nothing was published');

    // MULTI_NODE_SINGLE_WRITER (no Kubernetes access mode maps to it) stays refused for both access types.
    for (const capability of [block('MULTI_NODE_SINGLE_WRITER'), mount('MULTI_NODE_SINGLE_WRITER')]) {
      assert.match(
        await expectCode(publish(volume.volume_id, nodeA, capability), status.INVALID_ARGUMENT, 'MULTI_NODE_SINGLE_WRITER'),
        /MULTI_NODE_SINGLE_WRITER is not supported/,
      );
    }
  });

  it('publications for one node and for writers on many nodes exclude each other across nodes', async () => {
    const volume = await create('exclusive', [rwx, block('SINGLE_NODE_WRITER')]);
    const id = volume.volume_id;
    await publish(id, nodeA, block('SINGLE_NODE_WRITER'));
    for (const capability of [block('SINGLE_NODE_WRITER'), rwx, block('MULTI_NODE_READER_ONLY')]) {
      const message = await expectCode(
        publish(id, nodeB, capability),
        status.FAILED_PRECONDITION,
        `${capability.access_mode.mode} on B while A has it for one node`,
      );
      assert.match(message, new RegExp(`volume exclusive is published to node ${nodeA} for one node only`), 'the message names the node that has it');
    }
    await expectCode(publish(id, nodeA, rwx), status.ALREADY_EXISTS, 'the same node, now for many writers');
    await unpublish(id, nodeA);

    await publish(id, nodeA, rwx);
    for (const capability of [block('SINGLE_NODE_WRITER'), block('SINGLE_NODE_READER_ONLY'), block('MULTI_NODE_READER_ONLY')]) {
      const message = await expectCode(publish(id, nodeB, capability), status.FAILED_PRECONDITION, `${capability.access_mode.mode} on B while A writes`);
      assert.match(message, new RegExp(`volume exclusive is published to node ${nodeA} for writers on many nodes`));
    }
    await expectCode(publish(id, nodeA, block('SINGLE_NODE_WRITER')), status.ALREADY_EXISTS, 'the same node, now for one node');
    assert.deepEqual(await publishedTo(id), [nodeA], 'the refusals left the publication as it was');
    await unpublish(id, nodeA);

    // Readers on many nodes were promised the volume does not change: no writer joins them.
    await publish(id, nodeA, block('MULTI_NODE_READER_ONLY'));
    await publish(id, nodeB, block('MULTI_NODE_READER_ONLY'));
    const message = await expectCode(publish(id, nodeC, rwx), status.FAILED_PRECONDITION, 'a writer among readers');
    assert.match(message, /for readers on many nodes, so it cannot be published to node node-c for writers on many nodes/);
    await unpublish(id);

    await expectCode(publish(id, 'no-such-node'), status.NOT_FOUND, 'a node that never registered');
    await csi.controller.DeleteVolume({ volume_id: id });
  });

  it('unpublishing in either order leaves the other publication intact', async () => {
    const volume = await create('either-order');
    const id = volume.volume_id;
    for (const [first, second] of [
      [nodeA, nodeB],
      [nodeB, nodeA],
    ]) {
      await publish(id, nodeA);
      await publish(id, nodeB);
      await unpublish(id, first);
      assert.deepEqual(await publishedTo(id), [second], `${first} unpublished first`);
      await unpublish(id, first);
      assert.deepEqual(await publishedTo(id), [second], 'unpublishing it again changes nothing');
      assert.deepEqual(Object.keys((await admin.api.publications(id)).nodes), [second]);
      await expectCode(csi.controller.DeleteVolume({ volume_id: id }), status.FAILED_PRECONDITION, 'deleted while one node still has it');
      // The one left can be published again (idempotent) and the other can come back.
      await publish(id, second);
      await publish(id, first);
      await unpublish(id, second);
      await unpublish(id, first);
      assert.deepEqual(await publishedTo(id), []);
      assert.deepEqual((await admin.api.publications(id)).nodes, {});
    }
    await csi.controller.DeleteVolume({ volume_id: id });
  });

  // One `arbor serve` answers each call in turn on its event loop; the interleaving where every
  // node reads before any writes (etcd's) is forced in test/unit/publications.test.ts.
  it('two nodes racing to publish a volume for one node: exactly one wins, every time', async () => {
    const rounds = 8;
    for (let round = 0; round < rounds; round++) {
      const volume = await create(`race-${round}`, [block('SINGLE_NODE_WRITER')]);
      const contenders = [nodeA, nodeB, nodeC];
      const results = await Promise.allSettled(contenders.map((n) => publish(volume.volume_id, n, block('SINGLE_NODE_WRITER'))));
      const winners = contenders.filter((_n, i) => results[i].status === 'fulfilled');
      assert.equal(winners.length, 1, `round ${round}: exactly one node wins (${winners.join(', ')})`);
      for (const r of results) {
        if (r.status === 'rejected') assert.equal((r.reason as { code: number }).code, status.FAILED_PRECONDITION, (r.reason as Error).message);
      }
      assert.deepEqual(await publishedTo(volume.volume_id), winners);
    }
  });

  it('nodes racing to publish a volume for writers on many nodes all win, none lost', async () => {
    const volume = await create('race-writers');
    const contenders = [nodeA, nodeB, nodeC];
    for (let round = 0; round < 4; round++) {
      await Promise.all(contenders.map((n) => publish(volume.volume_id, n)));
      assert.deepEqual(await publishedTo(volume.volume_id), contenders, `round ${round}: every publication recorded`);
      await Promise.all(contenders.map((n) => unpublish(volume.volume_id, n)));
      assert.deepEqual(await publishedTo(volume.volume_id), [], `round ${round}: every unpublication recorded`);
    }
  });
});

/**
 * Every node attaches every volume (non-data nodes relay to the data node), so the
 * chart runs `arbor controller` without --node-id: volumes have no topology and any
 * registered node may have one published.
 */
describe('arbor controller without --node-id: no topology, any registered node', function () {
  this.timeout(120_000);
  let dir: { dir: string; cleanup: () => void };
  let dataNode: ArborServer;
  let controller: ChildProcess | undefined;
  let controllerLog = '';
  let csi: CsiClient;
  let admin: AdminClient;
  const { create, publish, unpublish, publishedTo } = calls(() => csi);

  before(async () => {
    dir = tempDir();
    dataNode = await startServer(dir.dir, ['--node-id', 'data-node', '--csi-endpoint', `unix://${path.join(dir.dir, 'node.sock')}`], 'node');
    const socket = path.join(dir.dir, 'controller.sock');
    controller = spawn(process.execPath, [cliPath, '--data-dir', dataNode.dataDir, 'controller', '--csi-endpoint', `unix://${socket}`], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    controller.stderr!.on('data', (d) => (controllerLog += d));
    for (let i = 0; i < 200 && !controllerLog.includes('arbor controller serving'); i++) await new Promise((r) => setTimeout(r, 50));
    assert.match(controllerLog, /arbor controller serving/);
    csi = csiClient(socket);
    admin = (await AdminClient.connect(adminSocketPath(dataNode.dataDir)))!;
    // A relay node registers through the data node, as `arbor node --relay-to` does.
    await admin.api.registerNode('relay-node', { topology: { 'topology.csi.arbor.dev/node': 'relay-node' } });
  });
  after(async () => {
    csi?.close();
    admin?.close();
    if (controller && controller.exitCode === null && controller.signalCode === null) {
      const exited = new Promise((r) => controller!.once('exit', r));
      controller.kill('SIGTERM');
      await exited;
    }
    await dataNode?.stop();
    dir?.cleanup();
  });

  it('reports no accessible topology, makes volumes wherever asked, and counts capacity for every node', async () => {
    const volume = await create('anywhere', [rwx], {
      accessibility_requirements: { requisite: [{ segments: { 'topology.csi.arbor.dev/node': 'relay-node' } }], preferred: [] },
    });
    assert.deepEqual(volume.accessible_topology, [], 'no topology: Kubernetes may schedule the pod on any node');
    const got = (await csi.controller.ControllerGetVolume({ volume_id: volume.volume_id })).volume as VolumeMessage;
    assert.deepEqual(got.accessible_topology, []);
    const capacity = await csi.controller.GetCapacity({ accessible_topology: { segments: { 'topology.csi.arbor.dev/node': 'relay-node' } } });
    assert.ok(Number(capacity.available_capacity) > 0, 'capacity is not zero on a node that is not the data node');
  });

  it('publishes a Block volume read-write to the data node and a relay node at once, through the admin socket', async () => {
    const volume = await create('both-nodes');
    for (const n of ['relay-node', 'data-node']) assert.equal((await publish(volume.volume_id, n)).publish_context.readOnly, 'false', n);
    assert.deepEqual(await publishedTo(volume.volume_id), ['data-node', 'relay-node']);
    await expectCode(publish(volume.volume_id, 'unregistered'), status.NOT_FOUND, 'a node that never registered');
    await expectCode(publish(volume.volume_id, 'relay-node', block('SINGLE_NODE_WRITER')), status.ALREADY_EXISTS, 'same node, another mode');
    await expectCode(publish(volume.volume_id, 'relay-node', mount('MULTI_NODE_MULTI_WRITER')), status.INVALID_ARGUMENT, 'Mount for many writers');
    await unpublish(volume.volume_id, 'data-node');
    assert.deepEqual(await publishedTo(volume.volume_id), ['relay-node']);
    await unpublish(volume.volume_id, 'relay-node');
    assert.deepEqual(await publishedTo(volume.volume_id), []);
  });
});
