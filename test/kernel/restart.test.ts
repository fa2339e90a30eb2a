import assert from 'node:assert/strict';
import path from 'node:path';
import { netlinkHelperPath } from '../../node-plugin/attach/nbd-netlink';
import { configuredNbdDevices, GuestArbor, startGuestArbor } from '../support/test-node/guest-arbor';
import { GuestProcess, TestNode } from '../support/test-node/test-node';

const MiB = 1024 * 1024;
const dir = '/tmp/arbor-restarts';
const nodeId = 'restarting-node';
/** The writer with verification (test/kernel/stamp_writer.py), run from the source tree, which the guest sees as the host does. */
const stampWriter = path.resolve(__dirname, '..', '..', '..', 'test', 'kernel', 'stamp_writer.py');
const restarts = 10;

interface Staged {
  name: string;
  id: string;
  capability: object;
  staging: string;
  target: string;
}

/**
 * Attachments that survive the node plugin: `arbor node` runs in the test node, its
 * volumes are staged through the kernel's nbd driver, and it is stopped (SIGTERM, as
 * a DaemonSet update does) and killed (SIGKILL, as a crash or an OOM kill does) while
 * writers use the volumes. The kernel holds their I/O until the next process gives
 * the devices fresh connections.
 */
describe('node plugin restarts under a running workload, in the test node', function () {
  this.timeout(1_800_000);
  let node: TestNode;
  let arbor: GuestArbor;

  before(async function () {
    node = await TestNode.boot({ memoryMiB: 3072 });
    arbor = await startNode();
  });

  after(async () => {
    try {
      if (arbor) assert.equal(await arbor.stop(), 0, 'arbor node stops cleanly on SIGTERM');
      if (node) assert.deepEqual(await configuredNbdDevices(node), [], 'no nbd device is left configured');
    } finally {
      await node?.shutdown();
    }
  });

  function startNode(extraArgs: string[] = []): Promise<GuestArbor> {
    return startGuestArbor(node, dir, { command: 'node', nodeId, extraArgs });
  }

  /** A volume made with the CLI (arbor node serves no Controller), staged, and for Mount published, as kubelet would. */
  async function stageNew(name: string, capability: object, sizeBytes: number): Promise<Staged> {
    await arbor.cli('volume', 'create', name, '--size', String(sizeBytes));
    const id = (JSON.parse(await arbor.cli('volume', 'info', name, '--json')) as { id: string }).id;
    const v = { name, id, capability, staging: `${dir}/kubelet/${id}/globalmount`, target: `${dir}/kubelet/pods/${name}/volume` };
    await node.ok(['mkdir', '-p', v.staging]);
    await arbor.csi.node.NodeStageVolume({ volume_id: id, staging_target_path: v.staging, volume_capability: capability, volume_context: { name } });
    await arbor.csi.node.NodePublishVolume({ volume_id: id, staging_target_path: v.staging, target_path: v.target, volume_capability: capability });
    return v;
  }

  async function unstage(v: Staged): Promise<void> {
    await arbor.csi.node.NodeUnpublishVolume({ volume_id: v.id, target_path: v.target });
    await arbor.csi.node.NodeUnstageVolume({ volume_id: v.id, staging_target_path: v.staging });
  }

  async function deviceOf(v: Staged): Promise<string> {
    const devices = (await configuredNbdDevices(node)).filter((d) => d.backend === v.id);
    assert.equal(devices.length, 1, `one nbd device carries ${v.id}: ${JSON.stringify(devices)}`);
    return devices[0].device;
  }

  async function healthy(v: Staged): Promise<boolean> {
    const stats = (await arbor.csi.node.NodeGetVolumeStats({ volume_id: v.id, volume_path: v.target })) as { volume_condition: { abnormal: boolean } };
    return !stats.volume_condition.abnormal;
  }

  /** The stamped writer on a device or file, until `stop` appears; its state (the last write of every block) goes to `state`. */
  function writer(target: string, blocks: number, name: string): Promise<{ process: GuestProcess; state: string; stop: string }> {
    const state = `${dir}/${name}.state`;
    const stop = `${dir}/${name}.stop`;
    return node.spawn(['python3', stampWriter, 'write', target, String(blocks), state, stop, '4']).then((process) => ({ process, state, stop }));
  }

  async function finish(w: { process: GuestProcess; state: string; stop: string }): Promise<{ writes: number; longestWriteSeconds: number; stalls: number[] }> {
    await node.ok(['touch', w.stop]);
    const ended = await w.process.wait(120_000);
    const output = await w.process.output();
    assert.ok(ended, `the writer did not stop:\n${output}`);
    assert.equal(ended.status, 0, `the writer failed (an I/O error or a short write):\n${output}`);
    return JSON.parse((await node.readFile(w.state)).toString()) as { writes: number; longestWriteSeconds: number; stalls: number[] };
  }

  async function waitForProgress(seconds: number): Promise<void> {
    await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
  }

  it(`writers on a mounted ext4 volume and on a Block volume see no I/O error while arbor node is stopped and restarted ${restarts} times, then killed and restarted ${restarts} times; every completed write is there and the filesystem checks clean`, async () => {
    const fs = await stageNew('restart-fs', { access_mode: { mode: 'SINGLE_NODE_WRITER' }, mount: { fs_type: 'ext4', mount_flags: [] } }, 256 * MiB);
    const raw = await stageNew('restart-raw', { access_mode: { mode: 'SINGLE_NODE_WRITER' }, block: {} }, 64 * MiB);
    const fsDevice = await deviceOf(fs);
    const rawDevice = await deviceOf(raw);
    const blocks = 4096; // 16 MiB of 4 KiB stamps on each
    await node.sh(`dd if=/dev/zero of=${fs.target}/stamps bs=1M count=16 oflag=direct conv=fsync status=none`);
    const writers = [await writer(`${fs.target}/stamps`, blocks, 'fs'), await writer(raw.target, blocks, 'raw')];
    const starts: number[] = [];
    for (const [how, count] of [
      ['SIGTERM', restarts],
      ['SIGKILL', restarts],
    ] as const) {
      for (let i = 0; i < count; i++) {
        await waitForProgress(2);
        if (how === 'SIGTERM') assert.equal(await arbor.stop(), 0, 'a stopping node plugin exits cleanly');
        else await arbor.kill();
        const started = Date.now();
        arbor = await startNode();
        starts.push((Date.now() - started) / 1000);
        assert.ok(await healthy(fs), `after ${how} ${i + 1}: the filesystem volume has its connections again`);
        assert.ok(await healthy(raw), `after ${how} ${i + 1}: the block volume has its connections again`);
        assert.equal(await deviceOf(fs), fsDevice, 'the same device, given new connections');
        assert.equal(await deviceOf(raw), rawDevice);
      }
    }
    await waitForProgress(2);
    const results = [await finish(writers[0]), await finish(writers[1])];
    console.log(
      `      ${results.map((r, i) => `${['ext4', 'block'][i]}: ${r.writes} writes, the longest ${r.longestWriteSeconds.toFixed(1)} s`).join('; ')}; ` +
        `arbor node started in ${Math.min(...starts).toFixed(1)} to ${Math.max(...starts).toFixed(1)} s`,
    );
    await node.ok(['python3', stampWriter, 'verify', `${fs.target}/stamps`, String(blocks), writers[0].state]);
    await node.ok(['python3', stampWriter, 'verify', raw.target, String(blocks), writers[1].state]);

    assert.match(await node.ok(['findmnt', '-n', '-o', 'OPTIONS', fs.staging]), /^rw,/, 'the filesystem stayed read-write');
    assert.doesNotMatch(await node.ok(['dmesg']), /EXT4-fs error|I\/O error, dev nbd/, 'the kernel logged no filesystem or I/O error');
    // Unmounted but still attached, the filesystem checks clean.
    await arbor.csi.node.NodeUnpublishVolume({ volume_id: fs.id, target_path: fs.target });
    await node.ok(['umount', fs.staging]);
    await node.ok(['e2fsck', '-fn', fsDevice]);
    await arbor.csi.node.NodeUnstageVolume({ volume_id: fs.id, staging_target_path: fs.staging });
    await unstage(raw);
    assert.deepEqual(await configuredNbdDevices(node), []);
    const reattached = /^arbor_nbd_devices_reattached_total (\d+)$/m.exec(await arbor.metrics());
    assert.equal(reattached?.[1], '2', 'the last process re-attached both devices at its start');
  });

  it('a restart that takes longer than the dead-connection timeout: I/O fails with EIO, the data is intact, and staging again works', async () => {
    assert.equal(await arbor.stop(), 0);
    arbor = await startNode(['--dead-connection-timeout', '5s']);
    const raw = await stageNew('too-long', { access_mode: { mode: 'SINGLE_NODE_WRITER' }, block: {} }, 64 * MiB);
    const blocks = 1024;
    const w = await writer(raw.target, blocks, 'too-long');
    await waitForProgress(3);
    await finish(w);
    await arbor.kill();
    const started = Date.now();
    const read = await node.exec(['dd', `if=${raw.target}`, 'of=/dev/null', 'bs=4k', 'count=1', 'iflag=direct'], { timeoutMs: 120_000 });
    const failedAfter = (Date.now() - started) / 1000;
    assert.notEqual(read.status, 0, 'I/O fails once the device waited out its dead-connection timeout');
    assert.match(read.stderr, /Input\/output error/);
    assert.ok(failedAfter >= 4 && failedAfter < 60, `it failed after ${failedAfter.toFixed(1)} s, with a 5 s timeout`);
    arbor = await startNode();
    // The pod restarts: its volume is unpublished, unstaged and staged again; every write is there.
    await unstage(raw);
    await arbor.csi.node.NodeStageVolume({
      volume_id: raw.id,
      staging_target_path: raw.staging,
      volume_capability: raw.capability,
      volume_context: { name: raw.name },
    });
    await arbor.csi.node.NodePublishVolume({ volume_id: raw.id, staging_target_path: raw.staging, target_path: raw.target, volume_capability: raw.capability });
    await node.ok(['python3', stampWriter, 'verify', raw.target, String(blocks), w.state]);
    await unstage(raw);
  });

  it("a device is never given another volume's connections: records naming each other's devices are corrected from the devices' identifiers, and the kernel refuses a mismatch", async () => {
    const a = await stageNew('ident-a', { access_mode: { mode: 'SINGLE_NODE_WRITER' }, block: {} }, 64 * MiB);
    const b = await stageNew('ident-b', { access_mode: { mode: 'SINGLE_NODE_WRITER' }, block: {} }, 64 * MiB);
    await node.sh(
      `printf 'volume a%.0s' $(seq 512) | dd of=${a.target} bs=4k oflag=direct conv=fsync status=none; printf 'volume b%.0s' $(seq 512) | dd of=${b.target} bs=4k oflag=direct conv=fsync status=none`,
    );
    const [deviceA, deviceB] = [await deviceOf(a), await deviceOf(b)];
    assert.equal(await arbor.stop(), 0);
    // Swap the device each volume's records name (the attacher's record and the node's state): each now names the other's.
    const record = (v: Staged) => `${arbor.stateDir}/volumes/${v.id}/kernel-attachment.json`;
    const state = (v: Staged) => `${arbor.stateDir}/volumes/${v.id}/state.json`;
    const swap = `import json, sys
def attachment(doc): return doc.get('attachment', doc)
for one, other in ((sys.argv[1], sys.argv[2]), (sys.argv[3], sys.argv[4])):
    x, y = json.load(open(one)), json.load(open(other))
    ax, ay = attachment(x), attachment(y)
    ax['device'], ay['device'] = ay['device'], ax['device']
    ax['details']['index'], ay['details']['index'] = ay['details']['index'], ax['details']['index']
    json.dump(x, open(one, 'w')); json.dump(y, open(other, 'w'))`;
    await node.ok(['python3', '-c', swap, record(a), record(b), state(a), state(b)]);
    arbor = await startNode();
    assert.equal(await deviceOf(a), deviceA, 'volume a keeps its own device');
    assert.equal(await deviceOf(b), deviceB);
    assert.ok((await healthy(a)) && (await healthy(b)));
    assert.match(await node.ok(['head', '-c', '16', a.target]), /^volume avolume a/, 'a reads its own data');
    assert.match(await node.ok(['head', '-c', '16', b.target]), /^volume bvolume b/);
    assert.equal(JSON.parse((await node.readFile(record(a))).toString()).device, deviceA, 'the record was corrected');
    // And the kernel itself refuses to give b's device a connection under a's identifier.
    const refused = await node.exec([netlinkHelperPath, 'reconfigure', '--index', deviceB.slice('/dev/nbd'.length), '--identifier', a.id, '--timeout', '0']);
    assert.equal(refused.status, 1);
    assert.match(JSON.parse(refused.stdout).message, /Invalid argument/);
    await unstage(a);
    await unstage(b);
  });
});
