import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { AdminClient } from '../../cli/admin/client';
import { adminSocketPath } from '../../cli/session';
import { csiClient, CsiClient, expectCode, status } from '../../csi/client';
import { NbdClient } from '../../node-plugin/nbd/client';
import { formatRef } from '../../store/names';
import { serverForSuite } from '../support/arbor-server';
import { bannedNames, specNames } from '../support/names';

const MiB = 1024 * 1024;
const mount = () => ({ access_mode: { mode: 'SINGLE_NODE_WRITER' }, mount: { fs_type: '', mount_flags: [] } });
const node = 'names-node';

/** A name of at most 128 bytes made from `prefix` and as much of `name` as fits, whole characters only. */
function fitted(prefix: string, name: string): string {
  let out = prefix;
  for (const c of name) {
    if (Buffer.byteLength(out + c) > 128) break;
    out += c;
  }
  return out;
}

describe('names as the CSI spec allows them, through CSI, NBD and the CLI', function () {
  this.timeout(120_000);
  const suite = serverForSuite(async (dir) => ['--csi-endpoint', `unix://${path.join(dir, 'csi.sock')}`, '--node-id', node]);
  let csi: CsiClient;
  let admin: AdminClient;
  before(async () => {
    csi = csiClient(path.join(suite.dir, 'csi.sock'));
    admin = (await AdminClient.connect(adminSocketPath(suite.server.dataDir)))!;
    await admin.api.registerNode(node, { topology: {} });
  });
  after(() => {
    csi?.close();
    admin?.close();
  });

  const create = async (name: string, extra: object = {}) =>
    (
      (await csi.controller.CreateVolume({ name, volume_capabilities: [mount()], capacity_range: { required_bytes: String(MiB) }, ...extra })) as {
        volume: { volume_id: string; volume_context: Record<string, string> };
      }
    ).volume;

  it('every spec-valid name is created, found, snapshotted, cloned, listed, published, served and deleted, kept exactly', async () => {
    for (const [i, name] of specNames.entries()) {
      const what = JSON.stringify(name);
      const volume = await create(name);
      assert.equal(volume.volume_context.name, name, what);
      assert.equal((await create(name)).volume_id, volume.volume_id, `${what}: idempotent by name`);
      assert.equal((await admin.api.findVolume({ name }))?.id, volume.volume_id, `${what}: found by name`);

      // Write through NBD by the quoted export name, then snapshot and clone.
      const pattern = Buffer.alloc(4096, i + 1);
      const writer = await NbdClient.connect({ socketPath: suite.server.nbdSocket, exportName: formatRef(name) });
      await writer.write(0, pattern);
      await writer.flush();
      await writer.disconnect();

      const snapshot = (
        (await csi.controller.CreateSnapshot({ source_volume_id: volume.volume_id, name })) as { snapshot: { snapshot_id: string; source_volume_id: string } }
      ).snapshot;
      const again = (await csi.controller.CreateSnapshot({ source_volume_id: volume.volume_id, name })) as { snapshot: { snapshot_id: string } };
      assert.equal(again.snapshot.snapshot_id, snapshot.snapshot_id, `${what}: snapshot idempotent by name`);
      assert.equal((await admin.api.findSnapshot({ id: snapshot.snapshot_id }))?.name, name, `${what}: snapshot name kept`);

      const cloneName = fitted(`clone ${i} `, name);
      const clone = await create(cloneName, { volume_content_source: { snapshot: { snapshot_id: snapshot.snapshot_id } } });
      const reader = await NbdClient.connect({ socketPath: suite.server.nbdSocket, exportName: formatRef(cloneName) });
      assert.deepEqual(await reader.read(0, 4096), pattern, `${what}: the clone holds the snapshot's bytes`);
      await reader.disconnect();
      const snapReader = await NbdClient.connect({ socketPath: suite.server.nbdSocket, exportName: formatRef(name, name) });
      assert.deepEqual(await snapReader.read(0, 4096), pattern, `${what}: the snapshot is served as NAME@SNAP`);
      await snapReader.disconnect();

      const volumes = ((await csi.controller.ListVolumes({})).entries as Array<{ volume: { volume_id: string; volume_context: Record<string, string> } }>).map(
        (e) => e.volume,
      );
      assert.equal(volumes.find((v) => v.volume_id === volume.volume_id)?.volume_context.name, name, `${what}: listed`);
      const snapshots = (await csi.controller.ListSnapshots({ source_volume_id: volume.volume_id })).entries as Array<{ snapshot: { snapshot_id: string } }>;
      assert.deepEqual(
        snapshots.map((e) => e.snapshot.snapshot_id),
        [snapshot.snapshot_id],
        `${what}: snapshot listed`,
      );

      const published = (await csi.controller.ControllerPublishVolume({ volume_id: volume.volume_id, node_id: node, volume_capability: mount() })) as {
        publish_context: Record<string, string>;
      };
      assert.equal(published.publish_context.export, formatRef(name), `${what}: published by its quoted export name`);
      await csi.controller.ControllerUnpublishVolume({ volume_id: volume.volume_id, node_id: node });

      await csi.controller.DeleteVolume({ volume_id: clone.volume_id });
      await csi.controller.DeleteSnapshot({ snapshot_id: snapshot.snapshot_id });
      await csi.controller.DeleteVolume({ volume_id: volume.volume_id });
      assert.equal(await admin.api.findVolume({ name }), undefined, `${what}: deleted`);
      assert.equal(await admin.api.findSnapshot({ name }), undefined, `${what}: snapshot deleted`);
    }
  });

  it('names of 129 bytes and with each banned control character are INVALID_ARGUMENT, naming the field and the rule', async () => {
    const { volume_id } = await create('names-source');
    for (const name of ['é'.repeat(64) + 'a', ...bannedNames]) {
      const what = JSON.stringify(name);
      const details = await expectCode(create(name), status.INVALID_ARGUMENT, `CreateVolume ${what}`);
      assert.match(details, /^name .* is not a valid volume name: .*; a name is 1 to 128 bytes of UTF-8/);
      await expectCode(csi.controller.CreateSnapshot({ source_volume_id: volume_id, name }), status.INVALID_ARGUMENT, `CreateSnapshot ${what}`);
      await expectCode(
        csi.group.CreateVolumeGroupSnapshot({ name, source_volume_ids: [volume_id] }),
        status.INVALID_ARGUMENT,
        `CreateVolumeGroupSnapshot ${what}`,
      );
    }
    assert.deepEqual(
      (await admin.api.listVolumes()).map((v) => v.name),
      ['names-source'],
    );
    await csi.controller.DeleteVolume({ volume_id });
  });

  it("the CLI reaches every name by the quoting rule: '@' as %40, '%' as %25", async () => {
    const { server } = suite;
    const image = path.join(suite.dir, 'image.raw');
    const exported = path.join(suite.dir, 'exported.raw');
    for (const [i, name] of specNames.entries()) {
      const what = JSON.stringify(name);
      const quoted = formatRef(name);
      fs.writeFileSync(image, Buffer.alloc(64 * 1024, i + 7));
      await server.cliOk('volume', 'create', quoted, '--size', '1MiB');
      assert.equal(JSON.parse(await server.cliOk('volume', 'info', quoted, '--json')).name, name, what);
      assert.ok((await server.cliOk('volume', 'list')).includes(quoted), `${what}: listed quoted`);
      await server.cliOk('volume', 'import', quoted, image);
      await server.cliOk('snapshot', 'create', formatRef(name, 'v1'));
      const listed = JSON.parse(await server.cliOk('snapshot', 'list', quoted, '--json')) as Array<{ name: string; volume: string }>;
      assert.deepEqual(
        listed.map((s) => [s.volume, s.name]),
        [[name, 'v1']],
        what,
      );
      await server.cliOk('volume', 'export', formatRef(name, 'v1'), exported);
      assert.deepEqual(fs.readFileSync(exported).subarray(0, 64 * 1024), fs.readFileSync(image), `${what}: exported byte-exact`);
      const cloneName = fitted(`c${i}@`, name);
      await server.cliOk('volume', 'clone', formatRef(name, 'v1'), formatRef(cloneName));
      assert.equal((await admin.api.findVolume({ name: cloneName }))?.lineage[0].volumeName, name, what);
      await server.cliOk('volume', 'rm', formatRef(cloneName));
      await server.cliOk('snapshot', 'rm', formatRef(name, 'v1'));
      await server.cliOk('volume', 'rm', quoted);
      assert.equal(await admin.api.findVolume({ name }), undefined, what);
    }
    const bad = await server.cli('volume', 'create', '100%', '--size', '1MiB');
    assert.equal(bad.status, 2, bad.stderr);
    assert.match(bad.stderr, /NAME "100%" is not a volume name: write an '@' inside a name as %40 and a '%' as %25/);
    const twoAts = await server.cli('volume', 'export', 'a@b@c', exported);
    assert.match(twoAts.stderr, /more than one '@'/);
  });

  it('CLI snapshot names are per volume, as in rbd and zfs: a@daily and b@daily both exist; CSI names stay unique in the store', async () => {
    const { server } = suite;
    const out = path.join(suite.dir, 'daily.raw');
    for (const [volume, byte] of [
      ['a', 1],
      ['b', 2],
    ] as const) {
      await server.cliOk('volume', 'create', volume, '--size', '1MiB');
      fs.writeFileSync(out, Buffer.alloc(4096, byte));
      await server.cliOk('volume', 'import', volume, out);
      await server.cliOk('snapshot', 'create', `${volume}@daily`);
      await server.cliOk('snapshot', 'create', `${volume}@daily`); // idempotent
    }
    const listed = JSON.parse(await server.cliOk('snapshot', 'list', '--json')) as Array<{ name: string; volume: string }>;
    assert.deepEqual(
      listed
        .filter((s) => s.name === 'daily')
        .map((s) => s.volume)
        .sort(),
      ['a', 'b'],
    );
    for (const [volume, byte] of [
      ['a', 1],
      ['b', 2],
    ] as const) {
      await server.cliOk('volume', 'export', `${volume}@daily`, out);
      assert.deepEqual(fs.readFileSync(out).subarray(0, 4096), Buffer.alloc(4096, byte), `${volume}@daily holds ${volume}'s bytes`);
      const nbd = await NbdClient.connect({ socketPath: server.nbdSocket, exportName: `${volume}@daily` });
      assert.deepEqual(await nbd.read(0, 4096), Buffer.alloc(4096, byte));
      await nbd.disconnect();
    }
    // Through CSI a name is unique in the store: 'daily' is taken among a's snapshots by the CLI.
    const a = await admin.api.getVolume({ name: 'a' });
    const details = await expectCode(
      csi.controller.CreateSnapshot({ source_volume_id: a.id, name: 'daily' }),
      status.ALREADY_EXISTS,
      'CSI name taken by the CLI',
    );
    assert.match(details, /made outside CSI/);
    const c = await create('c');
    await csi.controller.CreateSnapshot({ source_volume_id: c.volume_id, name: 'weekly' });
    await expectCode(csi.controller.CreateSnapshot({ source_volume_id: a.id, name: 'weekly' }), status.ALREADY_EXISTS, "CSI name of another volume's snapshot");
    // The CLI may still use it on another volume.
    await server.cliOk('snapshot', 'create', 'a@weekly');
    await server.cliOk('snapshot', 'rm', 'a@daily');
    await server.cliOk('volume', 'export', 'b@daily', out);
    const gone = await server.cli('volume', 'export', 'a@daily', out);
    assert.equal(gone.status, 1);
    assert.match(gone.stderr, /snapshot a@daily does not exist/);
  });
});
