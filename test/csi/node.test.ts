import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { NbdClient } from '../../node-plugin/nbd/client';
import { ArborServer, startServer } from '../support/arbor-server';
import { csiClient, CsiClient, expectCode, status } from '../../csi/client';
import { ok, run } from '../support/run';
import { tempDir } from '../support/tmp';

const MiB = 1024 * 1024;
const nodeId = 'node-under-test';
const mount = (mode = 'SINGLE_NODE_MULTI_WRITER', fsType = '') => ({ access_mode: { mode }, mount: { fs_type: fsType, mount_flags: [] } });
const block = (mode = 'SINGLE_NODE_MULTI_WRITER') => ({ access_mode: { mode }, block: {} });

/** Nothing Arbor attached is left on the host: no loop device on our FUSE files, no FUSE mount, no nbdfuse. */
async function leftovers(dir: string): Promise<string[]> {
  const found: string[] = [];
  const loops = (await run('losetup', ['-a'])).stdout.split('\n').filter((l) => l.includes(dir));
  found.push(...loops);
  const mounts = (await run('findmnt', ['-rn', '-o', 'TARGET'])).stdout.split('\n').filter((l) => l.startsWith(dir));
  found.push(...mounts);
  const helpers = (await run('pgrep', ['-af', `nbdfuse.*${dir}`])).stdout.trim();
  if (helpers) found.push(helpers);
  return found;
}

/**
 * The CSI Node service for real on this machine: stage (attach through nbdfuse +
 * losetup, format when blank, mount), publish (bind mount, or the device bound onto
 * a file for Block), stats, expansion, unpublish and unstage, against `arbor serve`.
 */
describe('CSI node: stage, publish, use, unpublish, unstage, for real', function () {
  this.timeout(300_000);
  let dir: { dir: string; cleanup: () => void };
  let server: ArborServer;
  let csi: CsiClient;
  const args = (d: string) => ['--csi-endpoint', `unix://${path.join(d, 'csi.sock')}`, '--node-id', nodeId, '--state-dir', path.join(d, 'node-state')];

  before(async () => {
    dir = tempDir('arbor-node-');
    server = await startServer(dir.dir, args(dir.dir));
    csi = csiClient(path.join(dir.dir, 'csi.sock'));
  });
  after(async () => {
    csi?.close();
    await server?.stop();
    const left = await leftovers(dir.dir);
    dir.cleanup();
    assert.deepEqual(left, [], 'nothing is left attached or mounted');
  });

  const paths = (name: string) => ({
    staging: path.join(dir.dir, 'kubelet', name, 'globalmount'),
    target: path.join(dir.dir, 'kubelet', 'pods', name, 'volume'),
  });
  async function createAndPublish(
    name: string,
    capability: object,
    parameters: Record<string, string> = {},
    size = 64 * MiB,
  ): Promise<{ id: string; context: Record<string, string>; publish: Record<string, string> }> {
    const { volume } = (await csi.controller.CreateVolume({
      name,
      volume_capabilities: [capability],
      capacity_range: { required_bytes: String(size) },
      parameters,
    })) as { volume: { volume_id: string; volume_context: Record<string, string> } };
    const published = await csi.controller.ControllerPublishVolume({ volume_id: volume.volume_id, node_id: nodeId, volume_capability: capability });
    return { id: volume.volume_id, context: volume.volume_context, publish: published.publish_context as Record<string, string> };
  }
  async function stage(name: string, v: { id: string; context: Record<string, string>; publish: Record<string, string> }, capability: object): Promise<void> {
    const { staging } = paths(name);
    fs.mkdirSync(staging, { recursive: true });
    await csi.node.NodeStageVolume({
      volume_id: v.id,
      staging_target_path: staging,
      volume_capability: capability,
      publish_context: v.publish,
      volume_context: v.context,
    });
  }
  async function publish(name: string, id: string, capability: object, readonly = false, target = paths(name).target): Promise<void> {
    fs.mkdirSync(path.dirname(target), { recursive: true });
    await csi.node.NodePublishVolume({ volume_id: id, staging_target_path: paths(name).staging, target_path: target, volume_capability: capability, readonly });
  }
  async function teardown(name: string, id: string, targets = [paths(name).target]): Promise<void> {
    for (const target of targets) await csi.node.NodeUnpublishVolume({ volume_id: id, target_path: target });
    await csi.node.NodeUnstageVolume({ volume_id: id, staging_target_path: paths(name).staging });
  }

  it('NodeGetInfo and NodeGetCapabilities', async () => {
    const info = await csi.node.NodeGetInfo();
    assert.equal(info.node_id, nodeId);
    assert.equal(info.max_volumes_per_node, '256');
    assert.deepEqual(info.accessible_topology, { segments: { 'topology.csi.arbor.dev/node': nodeId } });
    const caps = ((await csi.node.NodeGetCapabilities()).capabilities as Array<{ rpc: { type: string } }>).map((c) => c.rpc.type).sort();
    assert.deepEqual(caps, ['EXPAND_VOLUME', 'GET_VOLUME_STATS', 'SINGLE_NODE_MULTI_WRITER', 'STAGE_UNSTAGE_VOLUME', 'VOLUME_CONDITION']);
  });

  it('a Mount volume: formatted once when blank, files survive unstage and re-stage, never reformatted', async () => {
    const cap = mount();
    const v = await createAndPublish('files', cap);
    await stage('files', v, cap);
    await stage('files', v, cap);
    await publish('files', v.id, cap);
    await publish('files', v.id, cap);
    const { target, staging } = paths('files');
    fs.writeFileSync(path.join(target, 'hello.txt'), 'written through CSI');
    fs.writeFileSync(path.join(target, 'big.bin'), Buffer.alloc(8 * MiB, 7));
    const stats = await csi.node.NodeGetVolumeStats({ volume_id: v.id, volume_path: target });
    const bytes = (stats.usage as Array<{ unit: string; total: string; used: string }>).find((u) => u.unit === 'BYTES')!;
    assert.ok(Number(bytes.total) > 50 * MiB && Number(bytes.used) >= 8 * MiB, `stats: ${JSON.stringify(stats.usage)}`);
    assert.ok((stats.usage as Array<{ unit: string }>).some((u) => u.unit === 'INODES'));
    assert.deepEqual(stats.volume_condition, { abnormal: false, message: 'volume is healthy' });
    await teardown('files', v.id);
    await teardown('files', v.id);
    assert.ok(!fs.existsSync(target), 'unpublish removes the target it created');
    assert.deepEqual(await leftovers(dir.dir), []);
    await stage('files', v, cap);
    await publish('files', v.id, cap);
    assert.equal(fs.readFileSync(path.join(target, 'hello.txt'), 'utf8'), 'written through CSI');
    assert.ok((await ok('findmnt', ['-rn', '-o', 'FSTYPE', staging])).includes('ext4'));
    await teardown('files', v.id);
    await csi.controller.ControllerUnpublishVolume({ volume_id: v.id, node_id: nodeId });
  });

  it('xfs with mkfs options from the StorageClass, and a read-only publish', async () => {
    const cap = mount('SINGLE_NODE_MULTI_WRITER', 'xfs');
    const v = await createAndPublish('xfs', cap, { mkfsOptions: '-L arbortest' }, 320 * MiB);
    await stage('xfs', v, cap);
    assert.ok((await ok('findmnt', ['-rn', '-o', 'FSTYPE,LABEL', paths('xfs').staging])).includes('xfs arbortest'));
    const readOnlyTarget = path.join(dir.dir, 'kubelet', 'pods', 'xfs-ro', 'volume');
    await publish('xfs', v.id, cap, true, readOnlyTarget);
    assert.throws(() => fs.writeFileSync(path.join(readOnlyTarget, 'nope'), 'x'), /EROFS/);
    await teardown('xfs', v.id, [readOnlyTarget]);
  });

  it('a Block volume: the device is bound onto the target file; writes there reach the volume', async () => {
    const cap = block();
    const v = await createAndPublish('raw', cap);
    await stage('raw', v, cap);
    await publish('raw', v.id, cap);
    const { target } = paths('raw');
    assert.ok(fs.statSync(target).isBlockDevice());
    const fd = fs.openSync(target, 'r+');
    fs.writeSync(fd, Buffer.alloc(65536, 0x42), 0, 65536, 5 * MiB);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    const reader = await NbdClient.connect({ socketPath: server.nbdSocket, exportName: 'raw' });
    assert.ok((await reader.read(5 * MiB, 65536)).every((b) => b === 0x42));
    await reader.disconnect();
    const stats = await csi.node.NodeGetVolumeStats({ volume_id: v.id, volume_path: target });
    assert.equal((stats.usage as Array<{ total: string }>)[0].total, String(64 * MiB));
    await teardown('raw', v.id);
    assert.ok(!fs.existsSync(target));
  });

  it("refuses bad requests with the spec's codes", async () => {
    const fake = 'vol-0000000000000000';
    await expectCode(csi.node.NodeStageVolume({ staging_target_path: '/tmp/x', volume_capability: mount() }), status.INVALID_ARGUMENT, 'stage without id');
    await expectCode(csi.node.NodeStageVolume({ volume_id: fake, volume_capability: mount() }), status.INVALID_ARGUMENT, 'stage without staging path');
    await expectCode(csi.node.NodeStageVolume({ volume_id: fake, staging_target_path: '/tmp/x' }), status.INVALID_ARGUMENT, 'stage without capability');
    await expectCode(
      csi.node.NodeStageVolume({ volume_id: fake, staging_target_path: path.join(dir.dir, 'fake'), volume_capability: mount() }),
      status.NOT_FOUND,
      'stage of nothing',
    );
    await expectCode(
      csi.node.NodePublishVolume({ volume_id: fake, staging_target_path: '/tmp/s', volume_capability: mount() }),
      status.INVALID_ARGUMENT,
      'publish without target',
    );
    await expectCode(
      csi.node.NodePublishVolume({ volume_id: fake, staging_target_path: '/tmp/s', target_path: '/tmp/t' }),
      status.INVALID_ARGUMENT,
      'publish without capability',
    );
    await expectCode(
      csi.node.NodePublishVolume({ volume_id: fake, staging_target_path: '/tmp/s', target_path: path.join(dir.dir, 't'), volume_capability: mount() }),
      status.FAILED_PRECONDITION,
      'publish before stage',
    );
    await expectCode(csi.node.NodeUnpublishVolume({ volume_id: fake }), status.INVALID_ARGUMENT, 'unpublish without target');
    await expectCode(csi.node.NodeUnstageVolume({ volume_id: fake }), status.INVALID_ARGUMENT, 'unstage without path');
    await csi.node.NodeUnpublishVolume({ volume_id: fake, target_path: path.join(dir.dir, 'never') });
    await csi.node.NodeUnstageVolume({ volume_id: fake, staging_target_path: path.join(dir.dir, 'never') });
    await expectCode(csi.node.NodeGetVolumeStats({ volume_path: 'some/path' }), status.INVALID_ARGUMENT, 'stats without id');
    await expectCode(csi.node.NodeGetVolumeStats({ volume_id: fake, volume_path: 'some/path' }), status.NOT_FOUND, 'stats of nothing');
    await expectCode(csi.node.NodeExpandVolume({ volume_id: fake, volume_path: 'some/path' }), status.NOT_FOUND, 'expand of nothing');
    await expectCode(csi.node.NodeExpandVolume({ volume_path: '/x' }), status.INVALID_ARGUMENT, 'expand without id');
  });

  it('never reformats: a volume holding ext4 is not staged as xfs; a volume for one writer publishes once', async () => {
    const ext4 = mount('SINGLE_NODE_SINGLE_WRITER', 'ext4');
    const v = await createAndPublish('keep', ext4);
    await stage('keep', v, ext4);
    await publish('keep', v.id, ext4);
    await expectCode(
      publish('keep', v.id, ext4, false, path.join(dir.dir, 'kubelet', 'pods', 'second', 'volume')),
      status.FAILED_PRECONDITION,
      'a second target for a single writer',
    );
    await teardown('keep', v.id);
    const xfs = mount('SINGLE_NODE_SINGLE_WRITER', 'xfs');
    await expectCode(stage('keep', v, xfs), status.FAILED_PRECONDITION, 'ext4 asked to be xfs');
    await csi.node.NodeUnstageVolume({ volume_id: v.id, staging_target_path: paths('keep').staging });
  });

  it('operations on one volume are serialized: a concurrent one gets ABORTED', async () => {
    const cap = mount();
    const v = await createAndPublish('busy', cap);
    const { staging } = paths('busy');
    fs.mkdirSync(staging, { recursive: true });
    const request = { volume_id: v.id, staging_target_path: staging, volume_capability: cap, publish_context: v.publish, volume_context: v.context };
    const results = await Promise.allSettled([csi.node.NodeStageVolume(request), csi.node.NodeStageVolume(request)]);
    const codes = results.map((r) => (r.status === 'fulfilled' ? 'OK' : status[(r.reason as { code: number }).code]));
    assert.deepEqual(codes.sort(), ['ABORTED', 'OK']);
    await csi.node.NodeStageVolume(request);
    await csi.node.NodeUnstageVolume({ volume_id: v.id, staging_target_path: staging });
  });

  it('expansion: the controller grows the volume; the filesystem grows when the node can see it', async () => {
    const cap = mount('SINGLE_NODE_MULTI_WRITER', 'ext4');
    const v = await createAndPublish('grow', cap);
    await stage('grow', v, cap);
    await publish('grow', v.id, cap);
    const { target } = paths('grow');
    const before = fs.statfsSync(target).blocks * fs.statfsSync(target).bsize;
    const expanded = await csi.controller.ControllerExpandVolume({
      volume_id: v.id,
      capacity_range: { required_bytes: String(256 * MiB) },
      volume_capability: cap,
    });
    assert.equal(expanded.node_expansion_required, true);
    const inUse = await expectCode(
      csi.node.NodeExpandVolume({ volume_id: v.id, volume_path: target, capacity_range: { required_bytes: String(256 * MiB) } }),
      status.FAILED_PRECONDITION,
      'growing the device in use',
    );
    assert.match(inUse, /next time the volume is staged/);
    await teardown('grow', v.id);
    await stage('grow', v, cap);
    await publish('grow', v.id, cap);
    await csi.node.NodeExpandVolume({ volume_id: v.id, volume_path: target, capacity_range: { required_bytes: String(256 * MiB) } });
    const after = fs.statfsSync(target).blocks * fs.statfsSync(target).bsize;
    assert.ok(after > 3 * before, `the filesystem grew from ${before} to ${after} bytes`);
    await teardown('grow', v.id);
  });

  it('a dead NBD connection shows as an abnormal condition, and staging again repairs it', async () => {
    const cap = block();
    const v = await createAndPublish('fragile', cap);
    await stage('fragile', v, cap);
    const pids = (await run('pgrep', ['-f', `nbdfuse.*${v.id}`])).stdout.trim().split('\n').filter(Boolean);
    assert.equal(pids.length, 1, 'one nbdfuse serves the volume');
    process.kill(Number(pids[0]), 'SIGKILL');
    await new Promise((r) => setTimeout(r, 300));
    fs.mkdirSync(paths('fragile').staging, { recursive: true });
    const stats = await csi.node.NodeGetVolumeStats({ volume_id: v.id, volume_path: paths('fragile').staging });
    assert.equal((stats.volume_condition as { abnormal: boolean }).abnormal, true);
    // The userspace path cannot survive its server's restart: the condition says so, and what to do.
    assert.match((stats.volume_condition as { message: string }).message, /nbdfuse cannot reconnect.*restage the volume.*modprobe nbd/);
    await stage('fragile', v, cap);
    const healed = await csi.node.NodeGetVolumeStats({ volume_id: v.id, volume_path: paths('fragile').staging });
    assert.equal((healed.volume_condition as { abnormal: boolean }).abnormal, false);
    await csi.node.NodeUnstageVolume({ volume_id: v.id, staging_target_path: paths('fragile').staging });
  });

  it('a plugin killed halfway: after a restart, unpublish and unstage finish the job and leave nothing behind', async () => {
    const cap = mount();
    const v = await createAndPublish('crash', cap);
    await stage('crash', v, cap);
    await publish('crash', v.id, cap);
    // What an application wants to survive a crash, it fsyncs (file and directory).
    const fd = fs.openSync(path.join(paths('crash').target, 'before-crash'), 'w');
    fs.writeSync(fd, 'x');
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    const dirFd = fs.openSync(paths('crash').target, 'r');
    fs.fsyncSync(dirFd);
    fs.closeSync(dirFd);
    await server.kill();
    csi.close();
    server = await startServer(dir.dir, args(dir.dir));
    csi = csiClient(path.join(dir.dir, 'csi.sock'));
    await csi.node.NodeUnpublishVolume({ volume_id: v.id, target_path: paths('crash').target });
    await csi.node.NodeUnstageVolume({ volume_id: v.id, staging_target_path: paths('crash').staging });
    assert.deepEqual(await leftovers(dir.dir), []);
    await stage('crash', v, cap);
    await publish('crash', v.id, cap);
    assert.equal(fs.readFileSync(path.join(paths('crash').target, 'before-crash'), 'utf8'), 'x');
    await teardown('crash', v.id);
  });
});
