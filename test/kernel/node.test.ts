import assert from 'node:assert/strict';
import { expectCode, status } from '../../csi/client';
import { GuestArbor, configuredNbdDevices, startGuestArbor } from '../support/test-node/guest-arbor';
import { TestNode } from '../support/test-node/test-node';
import { netlinkHelperPath } from '../../node-plugin/attach/nbd-netlink';

const MiB = 1024 * 1024;
const dir = '/tmp/arbor';
const mount = (fsType: string, mode = 'SINGLE_NODE_WRITER') => ({ access_mode: { mode }, mount: { fs_type: fsType, mount_flags: [] } });
const block = (mode = 'SINGLE_NODE_WRITER') => ({ access_mode: { mode }, block: {} });

interface Volume {
  name: string;
  id: string;
  capability: object;
  context: Record<string, string>;
  publish: Record<string, string>;
  staging: string;
  target: string;
}

/**
 * The CSI Node service on a real kernel: `arbor serve` runs inside the test node
 * (a QEMU VM with Debian's kernel, see test/support/test-node/) and attaches volumes
 * through the kernel's NBD driver, configured over netlink; the tests call its CSI
 * socket the way kubelet does and use the devices and filesystems in the guest.
 */
describe('CSI node through the kernel NBD driver, in the test node', function () {
  this.timeout(600_000);
  let node: TestNode;
  let arbor: GuestArbor;

  before(async function () {
    node = await TestNode.boot();
    console.log(
      `      the test node (kernel ${node.kernelVersion}) booted in ${node.bootSeconds.toFixed(1)} s; its agent started at ${node.guestUptimeAtAgent.toFixed(1)} s of guest uptime`,
    );
    arbor = await startGuestArbor(node, dir);
  });

  after(async () => {
    try {
      if (arbor) assert.equal(await arbor.stop(), 0, 'arbor serve stops cleanly on SIGTERM');
      if (node) assert.deepEqual(await configuredNbdDevices(node), [], 'no nbd device is left configured');
    } finally {
      await node?.shutdown();
    }
  });

  async function createVolume(
    name: string,
    capability: object,
    sizeBytes = 64 * MiB,
    parameters: Record<string, string> = {},
    source?: object,
  ): Promise<Volume> {
    const request = {
      name,
      volume_capabilities: [capability],
      capacity_range: { required_bytes: String(sizeBytes) },
      parameters,
      volume_content_source: source,
    };
    const { volume } = (await arbor.csi.controller.CreateVolume(request)) as {
      volume: { volume_id: string; volume_context: Record<string, string> };
    };
    const published = await arbor.csi.controller.ControllerPublishVolume({ volume_id: volume.volume_id, node_id: arbor.nodeId, volume_capability: capability });
    return {
      name,
      id: volume.volume_id,
      capability,
      context: volume.volume_context,
      publish: published.publish_context as Record<string, string>,
      staging: `${dir}/kubelet/plugins/csi.arbor.dev/${volume.volume_id}/globalmount`,
      target: `${dir}/kubelet/pods/pod-${name}/volumes/${name}`,
    };
  }

  async function deleteVolume(v: Volume): Promise<void> {
    await arbor.csi.controller.ControllerUnpublishVolume({ volume_id: v.id, node_id: arbor.nodeId });
    await arbor.csi.controller.DeleteVolume({ volume_id: v.id });
  }

  async function stage(v: Volume): Promise<void> {
    await node.ok(['mkdir', '-p', v.staging]);
    await arbor.csi.node.NodeStageVolume({
      volume_id: v.id,
      staging_target_path: v.staging,
      volume_capability: v.capability,
      publish_context: v.publish,
      volume_context: v.context,
    });
  }

  async function publish(v: Volume, readonly = false): Promise<void> {
    await arbor.csi.node.NodePublishVolume({
      volume_id: v.id,
      staging_target_path: v.staging,
      target_path: v.target,
      volume_capability: v.capability,
      readonly,
    });
  }

  async function unpublishAndUnstage(v: Volume): Promise<void> {
    await arbor.csi.node.NodeUnpublishVolume({ volume_id: v.id, target_path: v.target });
    await arbor.csi.node.NodeUnstageVolume({ volume_id: v.id, staging_target_path: v.staging });
  }

  /** The device the kernel configured for a volume: the one whose backend identifier is the volume's id. */
  async function deviceOf(v: Volume): Promise<string> {
    const devices = (await configuredNbdDevices(node)).filter((d) => d.backend === v.id);
    assert.equal(devices.length, 1, `one nbd device carries ${v.id}: ${JSON.stringify(devices)}`);
    return devices[0].device;
  }

  async function stats(
    v: Volume,
    path = v.target,
  ): Promise<{ usage: Array<{ unit: string; total: string; used: string; available: string }>; volume_condition: { abnormal: boolean; message: string } }> {
    return (await arbor.csi.node.NodeGetVolumeStats({ volume_id: v.id, volume_path: path })) as never;
  }

  async function nbdConnections(): Promise<number> {
    const line = /^arbor_nbd_connections (\d+)$/m.exec(await arbor.metrics());
    assert.ok(line, 'the metrics show arbor_nbd_connections');
    return Number(line[1]);
  }

  it('a Block volume: a kernel nbd device with several connections, bound onto the target; its writes reach the volume; unstage leaves no device; staged again, the data is there', async () => {
    const v = await createVolume('raw', block());
    const connectionsBefore = await nbdConnections();
    await stage(v);
    await stage(v); // idempotent
    const device = await deviceOf(v);
    const cpus = Number((await node.ok(['nproc'])).trim());
    assert.equal((await nbdConnections()) - connectionsBefore, Math.min(4, cpus), 'one connection per CPU (the server offers CAN_MULTI_CONN)');
    assert.ok(cpus > 1, 'the test node has several CPUs, so the device has several connections');
    assert.equal((await node.ok(['blockdev', '--getsize64', device])).trim(), String(64 * MiB));
    assert.equal((await node.ok(['cat', `/sys/block/${device.slice(5)}/queue/logical_block_size`])).trim(), '4096');

    await publish(v);
    await publish(v); // idempotent
    assert.equal((await node.ok(['stat', '-L', '-c', '%F', v.target])).trim(), 'block special file');
    // 3 MiB of random bytes at 5 MiB, written through the published target with O_DIRECT, then fsync.
    await node.sh(
      `head -c ${3 * MiB} /dev/urandom > ${dir}/raw.pattern && dd if=${dir}/raw.pattern of=${v.target} bs=1M seek=5 oflag=direct conv=fsync,notrunc status=none`,
    );
    // The store has it: the volume exported by the CLI (through the server) holds the same bytes.
    await arbor.cli('volume', 'export', 'raw', `${dir}/raw.export`);
    await node.sh(`cmp -n ${3 * MiB} -i 0:${5 * MiB} ${dir}/raw.pattern ${dir}/raw.export`);

    const blockStats = await stats(v);
    assert.deepEqual(blockStats.usage, [{ unit: 'BYTES', total: String(64 * MiB), used: '0', available: '0' }]);
    assert.deepEqual(blockStats.volume_condition, { abnormal: false, message: 'volume is healthy' });

    await unpublishAndUnstage(v);
    await unpublishAndUnstage(v); // idempotent
    assert.deepEqual(await configuredNbdDevices(node), [], 'unstage leaves no nbd device configured');
    assert.equal((await node.exec(['test', '-e', v.target])).status, 1, 'unpublish removes the target file');

    await stage(v);
    await node.sh(`cmp -n ${3 * MiB} -i 0:${5 * MiB} ${dir}/raw.pattern ${await deviceOf(v)}`);
    await arbor.csi.node.NodeUnstageVolume({ volume_id: v.id, staging_target_path: v.staging });
    assert.deepEqual(await configuredNbdDevices(node), []);
  });

  for (const fsType of ['ext4', 'xfs']) {
    it(`${fsType}: a blank volume is formatted and mounted; files written in the pod survive unstage and stage again; statistics count bytes and inodes`, async () => {
      const v = await createVolume(`files-${fsType}`, mount(fsType), 320 * MiB);
      await stage(v);
      await publish(v);
      const device = await deviceOf(v);
      assert.match(await node.ok(['findmnt', '-n', '-o', 'SOURCE,FSTYPE', v.staging]), new RegExp(`^${device} +${fsType}$`, 'm'));
      await node.sh(
        `cd ${v.target} && mkdir -p tree/a tree/b && head -c ${20 * MiB} /dev/urandom > tree/a/big && echo hello > tree/b/small && for i in $(seq 1 200); do echo $i > tree/b/f$i; done && sync`,
      );
      const sums = await node.sh(`cd ${v.target} && find tree -type f | sort | xargs sha256sum`);
      const fsStats = await stats(v);
      const bytes = fsStats.usage.find((u) => u.unit === 'BYTES')!;
      const inodes = fsStats.usage.find((u) => u.unit === 'INODES')!;
      assert.ok(Number(bytes.total) > 250 * MiB && Number(bytes.used) >= 20 * MiB, `bytes: ${JSON.stringify(bytes)}`);
      assert.ok(Number(inodes.used) >= 200, `inodes: ${JSON.stringify(inodes)}`);
      assert.equal(fsStats.volume_condition.abnormal, false);

      await unpublishAndUnstage(v);
      assert.deepEqual(await configuredNbdDevices(node), []);
      await stage(v);
      await publish(v);
      assert.equal(await node.sh(`cd ${v.target} && find tree -type f | sort | xargs sha256sum`), sums, 'every file is intact');
      await unpublishAndUnstage(v);
    });
  }

  it('a read-only publish refuses writes; a volume for readers only is a read-only device; a blank one is never formatted', async () => {
    const v = await createVolume('ro', mount('ext4'));
    await stage(v);
    await publish(v);
    await node.sh(`echo 'kept for readers' > ${v.target}/note && sync`);
    await arbor.csi.node.NodeUnpublishVolume({ volume_id: v.id, target_path: v.target });
    await publish(v, true);
    const write = await node.exec(['sh', '-c', `echo x > ${v.target}/nope`]);
    assert.notEqual(write.status, 0);
    assert.match(write.stderr, /Read-only file system/);
    await unpublishAndUnstage(v);

    const readers = mount('ext4', 'MULTI_NODE_READER_ONLY');
    const snapshot = (await arbor.csi.controller.CreateSnapshot({ name: 'ro-snap', source_volume_id: v.id })) as { snapshot: { snapshot_id: string } };
    const copy = await createVolume('ro-copy', readers, 64 * MiB, {}, { snapshot: { snapshot_id: snapshot.snapshot.snapshot_id } });
    await stage(copy);
    await publish(copy, true);
    const device = await deviceOf(copy);
    assert.equal((await node.ok(['cat', `/sys/block/${device.slice(5)}/ro`])).trim(), '1', 'the kernel marks the device read-only');
    assert.equal(await node.ok(['cat', `${copy.target}/note`]), 'kept for readers\n');
    await unpublishAndUnstage(copy);

    const blank = await createVolume('ro-blank', readers);
    await expectCode(stage(blank), status.FAILED_PRECONDITION, 'a blank volume attached read-only');
    await arbor.csi.node.NodeUnstageVolume({ volume_id: blank.id, staging_target_path: blank.staging });
    assert.deepEqual(await configuredNbdDevices(node), []);
  });

  it('fstrim on a mounted filesystem gives the space back to the store', async () => {
    const v = await createVolume('trim', mount('ext4'), 128 * MiB);
    await stage(v);
    await publish(v);
    const allocated = async () => (JSON.parse(await arbor.cli('volume', 'info', 'trim', '--json')) as { allocatedBytes: number }).allocatedBytes;
    await node.sh(`head -c ${48 * MiB} /dev/urandom > ${v.target}/data && sync`);
    const written = await allocated();
    assert.ok(written >= 48 * MiB, `the store holds the file: ${written} bytes allocated`);
    await node.sh(`rm ${v.target}/data && sync && fstrim -v ${v.target}`);
    const trimmed = await allocated();
    assert.ok(written - trimmed >= 40 * MiB, `fstrim freed ${written - trimmed} bytes of ${written}`);
    await unpublishAndUnstage(v);
  });

  it('an fsync in the guest is durable in the store: the server SIGKILLed after it returned, the restarted one re-attaches the device under the mounted filesystem, which never notices', async () => {
    const v = await createVolume('durable', mount('ext4'));
    await stage(v);
    await publish(v);
    // What an application wants to survive a crash it fsyncs: the file, then its directory.
    await node.sh(`head -c ${MiB} /dev/urandom > ${dir}/durable.pattern && dd if=${dir}/durable.pattern of=${v.target}/precious bs=64k conv=fsync status=none`);
    await node.ok(['python3', '-c', `import os; fd = os.open(${JSON.stringify(v.target)}, os.O_RDONLY); os.fsync(fd)`]);
    const device = await deviceOf(v);
    await arbor.kill();
    // While no server runs, the filesystem's I/O waits (the dead-connection timeout) instead of failing.
    const waiting = await node.spawn(['sh', '-c', `echo after > ${v.target}/written-while-down && sync -f ${v.target} && echo synced`]);
    arbor = await startGuestArbor(node, dir);
    await waiting.waitForOutput('synced', 120_000);
    assert.equal(await deviceOf(v), device, 'the same device, given new connections');
    assert.deepEqual((await stats(v)).volume_condition, { abnormal: false, message: 'volume is healthy' });
    await node.sh(`cmp ${dir}/durable.pattern ${v.target}/precious && grep -q after ${v.target}/written-while-down`);
    assert.match(await node.ok(['findmnt', '-n', '-o', 'OPTIONS', v.staging]), /^rw,/, 'the filesystem stayed read-write');
    await unpublishAndUnstage(v);
    assert.deepEqual(await configuredNbdDevices(node), []);
  });

  it("a device disconnected behind the plugin's back shows an abnormal condition; staging again attaches the volume afresh", async () => {
    const v = await createVolume('cut', block());
    await stage(v);
    await node.sh(
      `head -c ${MiB} /dev/urandom > ${dir}/cut.pattern && dd if=${dir}/cut.pattern of=${await deviceOf(v)} bs=64k oflag=direct conv=fsync status=none`,
    );
    const index = Number((await deviceOf(v)).slice('/dev/nbd'.length));
    await node.ok([netlinkHelperPath, 'disconnect', '--index', String(index)]);
    const dead = await stats(v, v.staging);
    assert.equal(dead.volume_condition.abnormal, true);
    assert.match(dead.volume_condition.message, /kernel NBD device \/dev\/nbd\d+ has no connection to this node's server/);
    await stage(v);
    assert.equal((await stats(v, v.staging)).volume_condition.abnormal, false);
    await node.sh(`cmp -n ${MiB} ${dir}/cut.pattern ${await deviceOf(v)}`);
    await arbor.csi.node.NodeUnstageVolume({ volume_id: v.id, staging_target_path: v.staging });
    assert.deepEqual(await configuredNbdDevices(node), []);
  });

  for (const fsType of ['ext4', 'xfs']) {
    it(`NodeExpandVolume grows a mounted ${fsType} volume in place: the device and the filesystem show the new size at once, the files are intact`, async () => {
      const v = await createVolume(`grow-${fsType}`, mount(fsType), 320 * MiB);
      await stage(v);
      await publish(v);
      await node.sh(`head -c ${8 * MiB} /dev/urandom > ${v.target}/kept && sync`);
      const sum = await node.ok(['sha256sum', `${v.target}/kept`]);
      const sizeOf = async () => Number((await node.ok(['df', '--output=size', '-B1', v.target])).split('\n')[1]);
      const before = await sizeOf();
      const expanded = await arbor.csi.controller.ControllerExpandVolume({
        volume_id: v.id,
        capacity_range: { required_bytes: String(768 * MiB) },
        volume_capability: v.capability,
      });
      assert.equal(expanded.node_expansion_required, true);
      const grown = await arbor.csi.node.NodeExpandVolume({ volume_id: v.id, volume_path: v.target, capacity_range: { required_bytes: String(768 * MiB) } });
      assert.equal(grown.capacity_bytes, String(768 * MiB));
      assert.equal((await node.ok(['blockdev', '--getsize64', await deviceOf(v)])).trim(), String(768 * MiB));
      const after = await sizeOf();
      assert.ok(after > 2 * before, `the filesystem grew from ${before} to ${after} bytes while mounted`);
      assert.equal(await node.ok(['sha256sum', `${v.target}/kept`]), sum);
      // More than the old filesystem held: the new space is usable.
      await node.sh(`head -c ${360 * MiB} /dev/urandom > ${v.target}/fills-the-new-space && sync && rm ${v.target}/fills-the-new-space`);
      await unpublishAndUnstage(v);
      await deleteVolume(v); // its 370 MiB live on the guest's memory
    });
  }

  it('NodeExpandVolume grows a Block volume in place: the device shows the new size at once, its data intact', async () => {
    const v = await createVolume('grow-raw', block());
    await stage(v);
    await publish(v);
    await node.sh(`head -c ${MiB} /dev/urandom > ${dir}/grow.pattern && dd if=${dir}/grow.pattern of=${v.target} bs=64k oflag=direct conv=fsync status=none`);
    await arbor.csi.controller.ControllerExpandVolume({
      volume_id: v.id,
      capacity_range: { required_bytes: String(256 * MiB) },
      volume_capability: v.capability,
    });
    await arbor.csi.node.NodeExpandVolume({ volume_id: v.id, volume_path: v.target, capacity_range: { required_bytes: String(256 * MiB) } });
    assert.equal((await node.ok(['blockdev', '--getsize64', v.target])).trim(), String(256 * MiB));
    await node.sh(
      `cmp -n ${MiB} ${dir}/grow.pattern ${v.target} && dd if=${dir}/grow.pattern of=${v.target} bs=64k seek=3000 oflag=direct conv=fsync status=none`,
    );
    assert.equal((await stats(v)).usage[0].total, String(256 * MiB));
    await unpublishAndUnstage(v);
  });

  it('arbor-nbd-netlink: the devices as the kernel lists them; outside the host network namespace (where Linux 6.1 keeps the nbd family) it says what to do', async () => {
    const listed = JSON.parse(await node.ok([netlinkHelperPath, 'status'])) as { ok: boolean; devices: Array<{ index: number; connected: boolean }> };
    assert.equal(listed.ok, true);
    assert.ok(listed.devices.length >= 16, `nbd0 to nbd15 at least: ${JSON.stringify(listed.devices)}`);
    const configured = (await configuredNbdDevices(node)).map((d) => d.device);
    assert.deepEqual(
      listed.devices.filter((d) => d.connected).map((d) => `/dev/nbd${d.index}`),
      configured,
      'connected means configured',
    );
    const isolated = await node.exec(['unshare', '--net', netlinkHelperPath, 'status']);
    assert.equal(isolated.status, 1);
    const refusal = JSON.parse(isolated.stdout) as { ok: boolean; code: string; message: string };
    assert.equal(refusal.code, 'ENODEV');
    assert.match(refusal.message, /modprobe nbd.*hostNetwork: true/);
  });
});
