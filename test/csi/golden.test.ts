import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { serverForSuite } from '../support/arbor-server';
import { csiClient, CsiClient } from '../../csi/client';
import { Random } from '../support/random';

const MiB = 1024 * 1024;
const clones = 50;
const nodeId = 'golden-node';

/** A raw disk image that looks bootable: an MBR with one partition and the boot signature, then data. */
function bootableImage(bytes: number): Buffer {
  const image = new Random(2026).bytes(bytes);
  image.fill(0, 0, 512);
  image.write('ARBOR-GOLDEN', 3, 'ascii');
  const entry = 446;
  image[entry] = 0x80; // active
  image[entry + 4] = 0x83; // Linux
  image.writeUInt32LE(2048, entry + 8); // first sector
  image.writeUInt32LE(bytes / 512 - 2048, entry + 12); // sectors
  image[510] = 0x55;
  image[511] = 0xaa;
  image.fill(0, 8 * MiB, 16 * MiB); // a hole in the middle, as real images have
  return image;
}

describe('golden image: one import, a snapshot, 50 clones through CSI, each staged and read', function () {
  this.timeout(300_000);
  const suite = serverForSuite(async (dir) => ['--csi-endpoint', `unix://${path.join(dir, 'csi.sock')}`, '--node-id', nodeId]);
  let csi: CsiClient;
  before(() => {
    csi = csiClient(path.join(suite.dir, 'csi.sock'));
  });
  after(() => csi?.close());

  it(`${clones} clones of a golden image boot-read exactly the golden bytes`, async () => {
    const image = bootableImage(48 * MiB);
    fs.writeFileSync(path.join(suite.dir, 'golden.raw'), image);
    await suite.server.cliOk('volume', 'create', 'golden', '--size', '48MiB');
    await suite.server.cliOk('volume', 'import', 'golden', path.join(suite.dir, 'golden.raw'));
    const golden = (await csi.controller.ListVolumes({})).entries as Array<{ volume: { volume_id: string } }>;
    const goldenId = golden[0].volume.volume_id;
    const snapshot = (await csi.controller.CreateSnapshot({ source_volume_id: goldenId, name: 'golden-base' })).snapshot as { snapshot_id: string };
    const capability = { access_mode: { mode: 'SINGLE_NODE_WRITER' }, block: {} };

    const started = Date.now();
    const ids: string[] = [];
    for (let i = 0; i < clones; i++) {
      const { volume } = (await csi.controller.CreateVolume({
        name: `vm-disk-${i}`,
        volume_capabilities: [capability],
        volume_content_source: { snapshot: { snapshot_id: snapshot.snapshot_id } },
      })) as { volume: { volume_id: string; capacity_bytes: string } };
      assert.equal(volume.capacity_bytes, String(48 * MiB));
      ids.push(volume.volume_id);
    }
    const cloneMs = Date.now() - started;
    const usage = JSON.parse(await suite.server.cliOk('volume', 'info', 'vm-disk-49', '--json'));
    assert.equal(usage.exclusiveBytes, 0, 'a fresh clone owns nothing: it shares every block');

    for (const [i, id] of ids.entries()) {
      const publish = (await csi.controller.ControllerPublishVolume({ volume_id: id, node_id: nodeId, volume_capability: capability })).publish_context;
      const staging = path.join(suite.dir, 'staging', id);
      fs.mkdirSync(staging, { recursive: true });
      await csi.node.NodeStageVolume({ volume_id: id, staging_target_path: staging, volume_capability: capability, publish_context: publish });
      const target = path.join(suite.dir, 'pods', id, 'disk');
      fs.mkdirSync(path.dirname(target), { recursive: true });
      await csi.node.NodePublishVolume({ volume_id: id, staging_target_path: staging, target_path: target, volume_capability: capability, readonly: false });
      const fd = fs.openSync(target, 'r');
      const boot = Buffer.alloc(64 * 1024);
      fs.readSync(fd, boot, 0, boot.length, 0);
      const tail = Buffer.alloc(MiB);
      fs.readSync(fd, tail, 0, tail.length, 47 * MiB);
      fs.closeSync(fd);
      assert.ok(boot.equals(image.subarray(0, boot.length)) && boot[510] === 0x55 && boot[511] === 0xaa, `clone ${i} boots from the golden MBR`);
      assert.ok(tail.equals(image.subarray(47 * MiB)), `clone ${i} reads the golden image's last MiB`);
      await csi.node.NodeUnpublishVolume({ volume_id: id, target_path: target });
      await csi.node.NodeUnstageVolume({ volume_id: id, staging_target_path: staging });
      await csi.controller.ControllerUnpublishVolume({ volume_id: id, node_id: nodeId });
    }
    console.log(`      ${clones} clones created through CSI in ${cloneMs} ms (${((clones * 1000) / cloneMs).toFixed(0)} per second)`);
  });
});
