import assert from 'node:assert/strict';
import path from 'node:path';
import { AdminClient } from '../../cli/admin/client';
import { adminSocketPath } from '../../cli/session';
import { packageVersion } from '../../lib/version';
import { NbdClient } from '../../node-plugin/nbd/client';
import { serverForSuite } from '../support/arbor-server';
import { csiClient, CsiClient, expectCode, status } from '../../csi/client';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const mount = (mode = 'SINGLE_NODE_WRITER', fsType = '') => ({ access_mode: { mode }, mount: { fs_type: fsType, mount_flags: [] } });
const block = (mode = 'SINGLE_NODE_WRITER') => ({ access_mode: { mode }, block: {} });
const node = 'conformance-node';

/**
 * A conformance suite of our own: the CSI spec, RPC by RPC, against `arbor serve`
 * over its real unix socket: validation, idempotency, the error codes of the spec's
 * tables, pagination, snapshot and clone lifecycles, group snapshots, expansion.
 */
describe('CSI conformance: Identity, Controller and GroupController over the socket', function () {
  this.timeout(120_000);
  const suite = serverForSuite(async (dir) => ['--csi-endpoint', `unix://${path.join(dir, 'csi.sock')}`, '--node-id', node]);
  let csi: CsiClient;
  let admin: AdminClient;
  before(async () => {
    csi = csiClient(path.join(suite.dir, 'csi.sock'));
    admin = (await AdminClient.connect(adminSocketPath(suite.server.dataDir)))!;
    await admin.api.registerNode('other-node', { topology: {} });
  });
  after(() => {
    csi?.close();
    admin?.close();
  });

  const create = (name: string, extra: object = {}) =>
    csi.controller.CreateVolume({ name, volume_capabilities: [mount()], capacity_range: { required_bytes: String(64 * MiB) }, ...extra }) as Promise<{
      volume: {
        volume_id: string;
        capacity_bytes: string;
        volume_context: Record<string, string>;
        accessible_topology: Array<{ segments: Record<string, string> }>;
        content_source: unknown;
      };
    }>;
  const nbd = (exportName: string) => NbdClient.connect({ socketPath: suite.server.nbdSocket, exportName });

  describe('Identity', () => {
    it('GetPluginInfo names the driver and its version', async () => {
      const info = await csi.identity.GetPluginInfo();
      assert.equal(info.name, 'csi.arbor.dev');
      assert.equal(info.vendor_version, packageVersion());
    });

    it('GetPluginCapabilities: controller, topology, group controller, snapshot metadata, online expansion', async () => {
      const caps = (await csi.identity.GetPluginCapabilities()).capabilities as Array<{ service?: { type: string }; volume_expansion?: { type: string } }>;
      const services = caps.filter((c) => c.service).map((c) => c.service!.type);
      assert.deepEqual(services.sort(), ['CONTROLLER_SERVICE', 'GROUP_CONTROLLER_SERVICE', 'SNAPSHOT_METADATA_SERVICE', 'VOLUME_ACCESSIBILITY_CONSTRAINTS']);
      assert.ok(caps.some((c) => c.volume_expansion?.type === 'ONLINE'));
    });

    it('Probe is ready while the store is open', async () => {
      assert.deepEqual((await csi.identity.Probe()).ready, { value: true });
    });
  });

  describe('CreateVolume and DeleteVolume', () => {
    it('refuses requests that miss required fields or ask for what Arbor cannot do', async () => {
      const base = { name: 'bad', volume_capabilities: [mount()] };
      await expectCode(csi.controller.CreateVolume({ ...base, name: '' }), status.INVALID_ARGUMENT, 'no name');
      await expectCode(csi.controller.CreateVolume({ ...base, volume_capabilities: [] }), status.INVALID_ARGUMENT, 'no capabilities');
      await expectCode(csi.controller.CreateVolume({ ...base, volume_capabilities: [{ mount: {} }] }), status.INVALID_ARGUMENT, 'no access mode');
      await expectCode(
        csi.controller.CreateVolume({ ...base, volume_capabilities: [{ access_mode: { mode: 'SINGLE_NODE_WRITER' } }] }),
        status.INVALID_ARGUMENT,
        'no access type',
      );
      await expectCode(
        csi.controller.CreateVolume({ ...base, volume_capabilities: [mount('MULTI_NODE_MULTI_WRITER')] }),
        status.INVALID_ARGUMENT,
        'multi-node writers',
      );
      await expectCode(
        csi.controller.CreateVolume({ ...base, volume_capabilities: [mount('SINGLE_NODE_WRITER', 'ntfs')] }),
        status.INVALID_ARGUMENT,
        'an unknown fs_type',
      );
      const key = await expectCode(
        csi.controller.CreateVolume({ ...base, parameters: { compression: 'on' } }),
        status.INVALID_ARGUMENT,
        'an unknown parameter',
      );
      assert.match(key, /"compression"/, 'the error names the key');
      await expectCode(csi.controller.CreateVolume({ ...base, parameters: { extentSize: '3KiB' } }), status.INVALID_ARGUMENT, 'a bad extentSize');
      await expectCode(csi.controller.CreateVolume({ ...base, parameters: { fsType: 'btrfs' } }), status.INVALID_ARGUMENT, 'a bad fsType');
      await expectCode(
        csi.controller.CreateVolume({ ...base, capacity_range: { required_bytes: String(2 * MiB), limit_bytes: String(MiB) } }),
        status.INVALID_ARGUMENT,
        'required above limit',
      );
      await expectCode(
        csi.controller.CreateVolume({ ...base, capacity_range: { required_bytes: '1000', limit_bytes: '2000' } }),
        status.OUT_OF_RANGE,
        'no whole extent fits the limit',
      );
      await expectCode(
        csi.controller.CreateVolume({ ...base, capacity_range: { required_bytes: String(2 ** 51) } }),
        status.OUT_OF_RANGE,
        'beyond the largest volume',
      );
      await expectCode(csi.controller.CreateVolume({ ...base, name: 'x'.repeat(129) }), status.INVALID_ARGUMENT, 'a name over 128 bytes');
      assert.equal(await admin.api.findVolume({ name: 'bad' }), undefined, 'nothing was created');
    });

    it('rounds the size up to whole extents, within the limit, and reports topology and context', async () => {
      const { volume } = await create('sized', {
        capacity_range: { required_bytes: '1000000', limit_bytes: String(2 * MiB) },
        parameters: { extentSize: '64KiB', fsType: 'xfs', mkfsOptions: '-m reflink=0', 'csi.storage.k8s.io/pvc/name': 'data' },
      });
      assert.equal(volume.capacity_bytes, String(16 * 65536));
      assert.deepEqual(volume.accessible_topology, [{ segments: { 'topology.csi.arbor.dev/node': node } }]);
      assert.equal(volume.volume_context.fsType, 'xfs');
      assert.equal(volume.volume_context.mkfsOptions, '-m reflink=0');
      const { volume: defaulted } = await create('default-size', { capacity_range: null });
      assert.equal(defaulted.capacity_bytes, String(GiB), 'no capacity range: 1 GiB');
    });

    it('is idempotent by name, and ALREADY_EXISTS when the same name comes with other arguments', async () => {
      const first = await create('twice');
      const again = await create('twice');
      assert.equal(again.volume.volume_id, first.volume.volume_id);
      await expectCode(create('twice', { capacity_range: { required_bytes: String(128 * MiB) } }), status.ALREADY_EXISTS, 'a bigger size');
      await expectCode(create('twice', { parameters: { extentSize: '4KiB' } }), status.ALREADY_EXISTS, 'another extent size');
      const twins = await Promise.all([create('racing'), create('racing'), create('racing')]);
      assert.equal(new Set(twins.map((t) => t.volume.volume_id)).size, 1, 'concurrent twins get one volume');
    });

    it('refuses a topology it cannot reach', async () => {
      await expectCode(
        create('elsewhere', { accessibility_requirements: { requisite: [{ segments: { 'topology.csi.arbor.dev/node': 'far-away' } }], preferred: [] } }),
        status.RESOURCE_EXHAUSTED,
        'another node',
      );
    });

    it('DeleteVolume: idempotent, never NOT_FOUND, refused while published', async () => {
      const { volume } = await create('deleted');
      await expectCode(csi.controller.DeleteVolume({ volume_id: '' }), status.INVALID_ARGUMENT, 'no id');
      await csi.controller.ControllerPublishVolume({ volume_id: volume.volume_id, node_id: node, volume_capability: mount() });
      await expectCode(csi.controller.DeleteVolume({ volume_id: volume.volume_id }), status.FAILED_PRECONDITION, 'published');
      await csi.controller.ControllerUnpublishVolume({ volume_id: volume.volume_id, node_id: node });
      await csi.controller.DeleteVolume({ volume_id: volume.volume_id });
      await csi.controller.DeleteVolume({ volume_id: volume.volume_id });
      await csi.controller.DeleteVolume({ volume_id: 'vol-0000000000000000' });
      assert.equal(await admin.api.findVolume({ id: volume.volume_id }), undefined);
    });
  });

  describe('snapshots, restores and clones', () => {
    it('CreateSnapshot: ready at once, sized, idempotent; a restore and a clone hold its bytes', async () => {
      const { volume } = await create('origin');
      const writer = await nbd('origin');
      await writer.write(MiB, Buffer.alloc(MiB, 0x61));
      const snap = (await csi.controller.CreateSnapshot({ source_volume_id: volume.volume_id, name: 'origin-snap' })).snapshot as Record<string, unknown>;
      await writer.write(MiB, Buffer.alloc(MiB, 0x62));
      assert.equal(snap.ready_to_use, true);
      assert.equal(snap.size_bytes, String(64 * MiB));
      assert.equal(snap.source_volume_id, volume.volume_id);
      assert.ok(Number((snap.creation_time as { seconds: string }).seconds) > 1.7e9);
      const again = (await csi.controller.CreateSnapshot({ source_volume_id: volume.volume_id, name: 'origin-snap' })).snapshot as Record<string, unknown>;
      assert.equal(again.snapshot_id, snap.snapshot_id);

      const restored = await create('restored', {
        volume_content_source: { snapshot: { snapshot_id: snap.snapshot_id } },
        capacity_range: { required_bytes: String(128 * MiB) },
      });
      assert.equal(restored.volume.capacity_bytes, String(128 * MiB), 'restored and grown to the size asked for');
      assert.deepEqual(restored.volume.content_source, { snapshot: { snapshot_id: snap.snapshot_id }, type: 'snapshot' });
      const restoreAgain = { volume_content_source: { snapshot: { snapshot_id: snap.snapshot_id } }, capacity_range: { required_bytes: String(128 * MiB) } };
      assert.equal((await create('restored', restoreAgain)).volume.volume_id, restored.volume.volume_id, 'a retry answers with the same volume');
      const otherSnap = (await csi.controller.CreateSnapshot({ source_volume_id: volume.volume_id, name: 'origin-snap-2' })).snapshot as Record<
        string,
        unknown
      >;
      for (const [name, what] of [
        ['restored', 'a restore of another snapshot'],
        ['origin', 'a volume that is no clone'],
      ]) {
        await expectCode(
          create(name, { volume_content_source: { snapshot: { snapshot_id: otherSnap.snapshot_id } }, capacity_range: { required_bytes: String(128 * MiB) } }),
          status.ALREADY_EXISTS,
          `the name of ${what}`,
        );
      }
      const reader = await nbd('restored');
      assert.ok(
        (await reader.read(MiB, MiB)).every((b) => b === 0x61),
        'the restore holds the snapshot, not later writes',
      );
      assert.ok(
        (await reader.read(100 * MiB, MiB)).every((b) => b === 0),
        'and zeros past the snapshot size',
      );
      await reader.disconnect();

      const clone = await create('cloned', { volume_content_source: { volume: { volume_id: volume.volume_id } } });
      const cloneReader = await nbd('cloned');
      assert.ok(
        (await cloneReader.read(MiB, MiB)).every((b) => b === 0x62),
        'a clone of the volume holds what it holds now',
      );
      await cloneReader.disconnect();
      await writer.disconnect();
      assert.ok(clone.volume.volume_id);
      await expectCode(
        create('too-small', {
          volume_content_source: { snapshot: { snapshot_id: snap.snapshot_id } },
          capacity_range: { required_bytes: String(MiB), limit_bytes: String(32 * MiB) },
        }),
        status.OUT_OF_RANGE,
        'limit below the snapshot',
      );
      await expectCode(
        create('from-nothing', { volume_content_source: { snapshot: { snapshot_id: 'snap-0000000000000000' } } }),
        status.NOT_FOUND,
        'missing snapshot',
      );
      await expectCode(
        create('from-nowhere', { volume_content_source: { volume: { volume_id: 'vol-0000000000000000' } } }),
        status.NOT_FOUND,
        'missing volume',
      );
    });

    it('a retried clone whose source snapshot or volume was deleted since answers with the clone it made; anything else is still NOT_FOUND', async () => {
      const { volume: origin } = await create('gone-origin');
      const writer = await nbd('gone-origin');
      await writer.write(0, Buffer.alloc(MiB, 0x71));
      await writer.disconnect();
      const snap = (await csi.controller.CreateSnapshot({ source_volume_id: origin.volume_id, name: 'gone-snap' })).snapshot as { snapshot_id: string };
      const fromSnap = { volume_content_source: { snapshot: { snapshot_id: snap.snapshot_id } } };
      const restored = await create('gone-restored', fromSnap);
      const fromVolume = { volume_content_source: { volume: { volume_id: origin.volume_id } } };
      const cloned = await create('gone-cloned', fromVolume);
      await csi.controller.DeleteSnapshot({ snapshot_id: snap.snapshot_id });
      await csi.controller.DeleteVolume({ volume_id: origin.volume_id });

      assert.equal((await create('gone-restored', fromSnap)).volume.volume_id, restored.volume.volume_id, 'the restore, its snapshot gone');
      assert.deepEqual((await create('gone-restored', fromSnap)).volume.content_source, restored.volume.content_source);
      assert.equal((await create('gone-cloned', fromVolume)).volume.volume_id, cloned.volume.volume_id, 'the clone, its volume gone');
      await expectCode(create('gone-other', fromSnap), status.NOT_FOUND, 'a new name from the deleted snapshot');
      await expectCode(create('gone-other', fromVolume), status.NOT_FOUND, 'a new name from the deleted volume');
      await expectCode(create('gone-cloned', fromSnap), status.NOT_FOUND, 'the clone of the volume asked as a restore of the snapshot');
      await expectCode(create('gone-restored', fromVolume), status.NOT_FOUND, 'the restore asked as a clone of the volume');
      await expectCode(create('twice-gone', fromSnap), status.NOT_FOUND, 'a volume that was never made');
      await expectCode(
        create('gone-restored', { ...fromSnap, capacity_range: { required_bytes: String(128 * MiB) } }),
        status.ALREADY_EXISTS,
        'the restore asked again bigger',
      );
      await expectCode(create('gone-restored', { ...fromSnap, parameters: { extentSize: '4KiB' } }), status.ALREADY_EXISTS, 'another extent size');
      assert.equal(await admin.api.findVolume({ name: 'gone-other' }), undefined, 'nothing was created');
      const reader = await nbd('gone-restored');
      assert.ok(
        (await reader.read(0, MiB)).every((b) => b === 0x71),
        'the restore still holds the snapshot',
      );
      await reader.disconnect();
    });

    it('CreateSnapshot refuses missing fields, unknown sources and a name taken by another volume', async () => {
      const { volume } = await create('snap-errors');
      await expectCode(csi.controller.CreateSnapshot({ source_volume_id: volume.volume_id, name: '' }), status.INVALID_ARGUMENT, 'no name');
      await expectCode(csi.controller.CreateSnapshot({ source_volume_id: '', name: 'x' }), status.INVALID_ARGUMENT, 'no source');
      await expectCode(csi.controller.CreateSnapshot({ source_volume_id: 'vol-0000000000000000', name: 'x' }), status.NOT_FOUND, 'unknown source');
      await expectCode(
        csi.controller.CreateSnapshot({ source_volume_id: volume.volume_id, name: 'origin-snap' }),
        status.ALREADY_EXISTS,
        "name of another volume's snapshot",
      );
      await expectCode(
        csi.controller.CreateSnapshot({ source_volume_id: volume.volume_id, name: 'y', parameters: { tier: 'gold' } }),
        status.INVALID_ARGUMENT,
        'unknown parameter',
      );
    });

    it('ListSnapshots by id, by source, in pages; GetSnapshot; DeleteSnapshot is idempotent', async () => {
      const { volume } = await create('many-snaps');
      const ids: string[] = [];
      for (let i = 0; i < 5; i++)
        ids.push(
          ((await csi.controller.CreateSnapshot({ source_volume_id: volume.volume_id, name: `many-${i}` })).snapshot as { snapshot_id: string }).snapshot_id,
        );
      const byId = (await csi.controller.ListSnapshots({ snapshot_id: ids[2] })).entries as unknown[];
      assert.equal(byId.length, 1);
      assert.deepEqual((await csi.controller.ListSnapshots({ snapshot_id: 'snap-0000000000000000' })).entries, [], 'an unknown id lists nothing');
      const seen: string[] = [];
      let token = '';
      do {
        const pageOf = await csi.controller.ListSnapshots({ source_volume_id: volume.volume_id, max_entries: 2, starting_token: token });
        const entries = pageOf.entries as Array<{ snapshot: { snapshot_id: string } }>;
        assert.ok(entries.length <= 2);
        seen.push(...entries.map((e) => e.snapshot.snapshot_id));
        token = pageOf.next_token as string;
      } while (token);
      assert.deepEqual(seen.sort(), [...ids].sort());
      await expectCode(csi.controller.ListSnapshots({ starting_token: 'snap-ffffffffffffffff' }), status.ABORTED, 'a stale token');
      await expectCode(csi.controller.ListSnapshots({ max_entries: -1 }), status.INVALID_ARGUMENT, 'negative max_entries');
      assert.equal(((await csi.controller.GetSnapshot({ snapshot_id: ids[0] })).snapshot as { snapshot_id: string }).snapshot_id, ids[0]);
      await expectCode(csi.controller.GetSnapshot({ snapshot_id: 'snap-0000000000000000' }), status.NOT_FOUND, 'GetSnapshot of nothing');
      await csi.controller.DeleteSnapshot({ snapshot_id: ids[0] });
      await csi.controller.DeleteSnapshot({ snapshot_id: ids[0] });
      await expectCode(csi.controller.DeleteSnapshot({ snapshot_id: '' }), status.INVALID_ARGUMENT, 'no id');
    });
  });

  describe('publish, validate, list, capacity, get, expand', () => {
    it('ControllerPublishVolume: the export to attach, idempotent, one node at a time unless read-only for many', async () => {
      const { volume } = await create('published');
      const id = volume.volume_id;
      await expectCode(
        csi.controller.ControllerPublishVolume({ volume_id: '', node_id: node, volume_capability: mount() }),
        status.INVALID_ARGUMENT,
        'no volume',
      );
      await expectCode(csi.controller.ControllerPublishVolume({ volume_id: id, node_id: '', volume_capability: mount() }), status.INVALID_ARGUMENT, 'no node');
      await expectCode(csi.controller.ControllerPublishVolume({ volume_id: id, node_id: node }), status.INVALID_ARGUMENT, 'no capability');
      await expectCode(
        csi.controller.ControllerPublishVolume({ volume_id: 'vol-0000000000000000', node_id: node, volume_capability: mount() }),
        status.NOT_FOUND,
        'unknown volume',
      );
      await expectCode(
        csi.controller.ControllerPublishVolume({ volume_id: id, node_id: 'no-such-node', volume_capability: mount() }),
        status.NOT_FOUND,
        'unknown node',
      );
      const published = await csi.controller.ControllerPublishVolume({ volume_id: id, node_id: node, volume_capability: mount() });
      assert.deepEqual(published.publish_context, { export: 'published', readOnly: 'false' });
      await csi.controller.ControllerPublishVolume({ volume_id: id, node_id: node, volume_capability: mount() });
      await expectCode(
        csi.controller.ControllerPublishVolume({ volume_id: id, node_id: node, volume_capability: mount(), readonly: true }),
        status.ALREADY_EXISTS,
        'same node, now read-only',
      );
      await expectCode(
        csi.controller.ControllerPublishVolume({ volume_id: id, node_id: 'other-node', volume_capability: mount() }),
        status.FAILED_PRECONDITION,
        'a second node',
      );
      const listed = (await csi.controller.ListVolumes({})).entries as Array<{ volume: { volume_id: string }; status: { published_node_ids: string[] } }>;
      assert.deepEqual(listed.find((e) => e.volume.volume_id === id)!.status.published_node_ids, [node]);
      await csi.controller.ControllerUnpublishVolume({ volume_id: id, node_id: node });
      await csi.controller.ControllerUnpublishVolume({ volume_id: id, node_id: node });
      await expectCode(csi.controller.ControllerUnpublishVolume({ volume_id: '' }), status.INVALID_ARGUMENT, 'unpublish without a volume');
      for (const n of [node, 'other-node']) {
        const ro = await csi.controller.ControllerPublishVolume({ volume_id: id, node_id: n, volume_capability: mount('MULTI_NODE_READER_ONLY') });
        assert.equal((ro.publish_context as Record<string, string>).readOnly, 'true');
      }
      await csi.controller.ControllerUnpublishVolume({ volume_id: id });
      assert.deepEqual((await admin.api.publications(id)).nodes, {});
    });

    it('ValidateVolumeCapabilities confirms what Arbor serves and says why not otherwise', async () => {
      const { volume } = await create('validated', { parameters: { fsType: 'ext4' } });
      await expectCode(csi.controller.ValidateVolumeCapabilities({ volume_id: '', volume_capabilities: [mount()] }), status.INVALID_ARGUMENT, 'no id');
      await expectCode(
        csi.controller.ValidateVolumeCapabilities({ volume_id: volume.volume_id, volume_capabilities: [] }),
        status.INVALID_ARGUMENT,
        'no capabilities',
      );
      await expectCode(
        csi.controller.ValidateVolumeCapabilities({ volume_id: 'vol-0000000000000000', volume_capabilities: [mount()] }),
        status.NOT_FOUND,
        'unknown volume',
      );
      const ok = await csi.controller.ValidateVolumeCapabilities({
        volume_id: volume.volume_id,
        volume_capabilities: [mount(), block('SINGLE_NODE_READER_ONLY')],
      });
      assert.ok(ok.confirmed);
      const no = await csi.controller.ValidateVolumeCapabilities({ volume_id: volume.volume_id, volume_capabilities: [mount('MULTI_NODE_MULTI_WRITER')] });
      assert.equal(no.confirmed, null);
      assert.match(no.message as string, /MULTI_NODE_MULTI_WRITER/);
      const xfs = await csi.controller.ValidateVolumeCapabilities({ volume_id: volume.volume_id, volume_capabilities: [mount('SINGLE_NODE_WRITER', 'xfs')] });
      assert.equal(xfs.confirmed, null, 'an ext4 volume is not confirmed for xfs');
    });

    it('ListSnapshots gives every field as GetSnapshot does; a client that asks for int64s as numbers gets the same snapshots with numbers', async () => {
      const { volume } = await create('listed-fields');
      await csi.controller.CreateSnapshot({ source_volume_id: volume.volume_id, name: 'listed-fields-1' });
      const group = (await csi.group.CreateVolumeGroupSnapshot({ name: 'listed-fields-group', source_volume_ids: [volume.volume_id] })).group_snapshot as {
        group_snapshot_id: string;
      };
      type Listed = {
        snapshot: { snapshot_id: string; size_bytes: string | number; creation_time: { seconds: string | number; nanos: number }; group_snapshot_id: string };
      };
      const listed = (await csi.controller.ListSnapshots({ source_volume_id: volume.volume_id })).entries as Listed[];
      assert.equal(listed.length, 2);
      for (const { snapshot } of listed) {
        assert.deepEqual(snapshot, (await csi.controller.GetSnapshot({ snapshot_id: snapshot.snapshot_id })).snapshot, snapshot.snapshot_id);
        assert.equal(snapshot.size_bytes, String(64 * MiB));
      }
      assert.deepEqual(
        listed.map((e) => e.snapshot.group_snapshot_id).sort(),
        ['', group.group_snapshot_id],
        "one in the group, one in none (ListSnapshots gives '')",
      );
      const numbers = csiClient(path.join(suite.dir, 'csi.sock'), { int64: 'number' });
      try {
        const asNumbers = (await numbers.controller.ListSnapshots({ source_volume_id: volume.volume_id })).entries as Listed[];
        assert.deepEqual(
          asNumbers,
          listed.map(({ snapshot }) => ({
            snapshot: { ...snapshot, size_bytes: 64 * MiB, creation_time: { ...snapshot.creation_time, seconds: Number(snapshot.creation_time.seconds) } },
          })),
        );
      } finally {
        numbers.close();
      }
      await csi.group.DeleteVolumeGroupSnapshot({ group_snapshot_id: group.group_snapshot_id });
    });

    it("ListSnapshots pages while snapshots come and go: each that stayed listed once, in id order, only the source volume's; a deleted token is ABORTED", async () => {
      const { volume: a } = await create('paged-a');
      const { volume: b } = await create('paged-b');
      const snap = async (volumeId: string, name: string) =>
        ((await csi.controller.CreateSnapshot({ source_volume_id: volumeId, name })).snapshot as { snapshot_id: string }).snapshot_id;
      const ofA = await Promise.all(Array.from({ length: 12 }, (_, i) => snap(a.volume_id, `paged-a-${i}`)));
      const ofB = await Promise.all(Array.from({ length: 4 }, (_, i) => snap(b.volume_id, `paged-b-${i}`)));
      const deleted = new Set<string>();
      const added: string[] = [];
      const seen: string[] = [];
      let token = '';
      let turn = 0;
      do {
        const pageOf = await csi.controller.ListSnapshots({ source_volume_id: a.volume_id, max_entries: 3, starting_token: token });
        const entries = pageOf.entries as Array<{ snapshot: { snapshot_id: string; source_volume_id: string } }>;
        for (const e of entries) assert.equal(e.snapshot.source_volume_id, a.volume_id, "only the source volume's snapshots");
        seen.push(...entries.map((e) => e.snapshot.snapshot_id));
        token = pageOf.next_token as string;
        // Between pages: one of a's snapshots not yet listed goes, one comes, and b gets one.
        const ahead = ofA.filter((id) => !seen.includes(id) && !deleted.has(id));
        if (ahead.length > 1) {
          await csi.controller.DeleteSnapshot({ snapshot_id: ahead[ahead.length - 1] });
          deleted.add(ahead[ahead.length - 1]);
        }
        added.push(await snap(a.volume_id, `paged-a-new-${turn}`));
        await snap(b.volume_id, `paged-b-new-${turn++}`);
      } while (token);
      assert.equal(new Set(seen).size, seen.length, 'nothing listed twice');
      assert.deepEqual(seen, [...seen].sort(), 'in id order');
      for (const id of ofA) if (!deleted.has(id)) assert.ok(seen.includes(id), `${id} existed throughout and was listed`);
      for (const id of seen) assert.ok(ofA.includes(id) || added.includes(id), `${id} is a's`);
      for (const id of ofB) assert.ok(!seen.includes(id));
      // A token whose snapshot was deleted is stale.
      const first = await csi.controller.ListSnapshots({ source_volume_id: a.volume_id, max_entries: 1 });
      await csi.controller.DeleteSnapshot({ snapshot_id: first.next_token as string });
      await expectCode(
        csi.controller.ListSnapshots({ source_volume_id: a.volume_id, max_entries: 1, starting_token: first.next_token }),
        status.ABORTED,
        'a deleted token',
      );
      // A token of another volume's snapshot is not a token of this listing.
      await expectCode(csi.controller.ListSnapshots({ source_volume_id: a.volume_id, starting_token: ofB[0] }), status.ABORTED, "b's snapshot as a's token");
    });

    it('ListVolumes pages through every volume; a stale token is ABORTED', async () => {
      const all: string[] = [];
      let token = '';
      do {
        const pageOf = await csi.controller.ListVolumes({ max_entries: 3, starting_token: token });
        all.push(...(pageOf.entries as Array<{ volume: { volume_id: string } }>).map((e) => e.volume.volume_id));
        token = pageOf.next_token as string;
      } while (token);
      const expected = (await admin.api.listVolumes()).map((v) => v.id).sort();
      assert.deepEqual(all, expected);
      await expectCode(csi.controller.ListVolumes({ starting_token: 'vol-ffffffffffffffff' }), status.ABORTED, 'stale token');
      await expectCode(csi.controller.ListVolumes({ max_entries: -5 }), status.INVALID_ARGUMENT, 'negative max_entries');
    });

    it("GetCapacity reports the data directory's real free space and the size limits", async () => {
      const capacity = await csi.controller.GetCapacity({ volume_capabilities: [mount()] });
      const free = Number(capacity.available_capacity);
      assert.ok(free > 0 && free < 10 * 2 ** 50);
      assert.deepEqual(capacity.maximum_volume_size, { value: String(2 ** 50) });
      assert.deepEqual(capacity.minimum_volume_size, { value: '4096' });
      const elsewhere = await csi.controller.GetCapacity({ accessible_topology: { segments: { 'topology.csi.arbor.dev/node': 'far-away' } } });
      assert.equal(elsewhere.available_capacity, '0');
      await expectCode(csi.controller.GetCapacity({ parameters: { speed: 'fast' } }), status.INVALID_ARGUMENT, 'unknown parameter');
    });

    it('ControllerGetVolume and ControllerExpandVolume', async () => {
      const { volume } = await create('expanded');
      const got = await csi.controller.ControllerGetVolume({ volume_id: volume.volume_id });
      assert.deepEqual((got.status as { volume_condition: { abnormal: boolean } }).volume_condition.abnormal, false);
      await expectCode(csi.controller.ControllerGetVolume({ volume_id: 'vol-0000000000000000' }), status.NOT_FOUND, 'unknown volume');
      await expectCode(csi.controller.ControllerExpandVolume({ volume_id: volume.volume_id }), status.INVALID_ARGUMENT, 'no capacity range');
      await expectCode(
        csi.controller.ControllerExpandVolume({ volume_id: 'vol-0000000000000000', capacity_range: { required_bytes: String(GiB) } }),
        status.NOT_FOUND,
        'unknown volume',
      );
      const grown = await csi.controller.ControllerExpandVolume({
        volume_id: volume.volume_id,
        capacity_range: { required_bytes: String(100 * MiB + 1) },
        volume_capability: mount(),
      });
      assert.equal(grown.capacity_bytes, String(100 * MiB + 65536), 'rounded up to whole extents');
      assert.equal(grown.node_expansion_required, true);
      const same = await csi.controller.ControllerExpandVolume({
        volume_id: volume.volume_id,
        capacity_range: { required_bytes: String(MiB) },
        volume_capability: block(),
      });
      assert.equal(same.capacity_bytes, String(100 * MiB + 65536), 'asking for less changes nothing');
      assert.equal(same.node_expansion_required, false);
      await expectCode(
        csi.controller.ControllerExpandVolume({ volume_id: volume.volume_id, capacity_range: { required_bytes: String(GiB), limit_bytes: String(512 * MiB) } }),
        status.OUT_OF_RANGE,
        'beyond the limit',
      );
    });

    it('ControllerGetCapabilities lists what the controller does', async () => {
      const types = ((await csi.controller.ControllerGetCapabilities()).capabilities as Array<{ rpc: { type: string } }>).map((c) => c.rpc.type);
      for (const t of [
        'CREATE_DELETE_VOLUME',
        'PUBLISH_UNPUBLISH_VOLUME',
        'LIST_VOLUMES',
        'GET_CAPACITY',
        'CREATE_DELETE_SNAPSHOT',
        'LIST_SNAPSHOTS',
        'CLONE_VOLUME',
        'PUBLISH_READONLY',
        'EXPAND_VOLUME',
        'LIST_VOLUMES_PUBLISHED_NODES',
        'VOLUME_CONDITION',
        'GET_VOLUME',
        'SINGLE_NODE_MULTI_WRITER',
      ]) {
        assert.ok(types.includes(t), t);
      }
    });
  });

  describe('group snapshots', () => {
    it('snapshot several volumes at one instant; get and delete them as a group', async () => {
      const volumes = await Promise.all(['g1', 'g2', 'g3'].map((n) => create(n)));
      const writers = await Promise.all(['g1', 'g2', 'g3'].map(nbd));
      await Promise.all(writers.map((w, i) => w.write(0, Buffer.alloc(MiB, 0x10 + i))));
      assert.deepEqual((await csi.group.GroupControllerGetCapabilities()).capabilities, [
        { rpc: { type: 'CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT' }, type: 'rpc' },
      ]);
      await expectCode(csi.group.CreateVolumeGroupSnapshot({ name: '', source_volume_ids: [volumes[0].volume.volume_id] }), status.INVALID_ARGUMENT, 'no name');
      await expectCode(csi.group.CreateVolumeGroupSnapshot({ name: 'g', source_volume_ids: [] }), status.INVALID_ARGUMENT, 'no volumes');
      await expectCode(csi.group.CreateVolumeGroupSnapshot({ name: 'g', source_volume_ids: ['vol-0000000000000000'] }), status.NOT_FOUND, 'an unknown volume');
      const ids = volumes.map((v) => v.volume.volume_id);
      const group = (await csi.group.CreateVolumeGroupSnapshot({ name: 'together', source_volume_ids: ids })).group_snapshot as {
        group_snapshot_id: string;
        snapshots: Array<{ snapshot_id: string; source_volume_id: string; group_snapshot_id: string; ready_to_use: boolean }>;
        ready_to_use: boolean;
      };
      await Promise.all(writers.map((w) => w.write(0, Buffer.alloc(MiB, 0xff))));
      assert.equal(group.ready_to_use, true);
      assert.deepEqual(group.snapshots.map((s) => s.source_volume_id).sort(), [...ids].sort());
      assert.ok(group.snapshots.every((s) => s.group_snapshot_id === group.group_snapshot_id));
      const again = (await csi.group.CreateVolumeGroupSnapshot({ name: 'together', source_volume_ids: ids })).group_snapshot as { group_snapshot_id: string };
      assert.equal(again.group_snapshot_id, group.group_snapshot_id, 'idempotent by name');
      for (const s of group.snapshots) {
        const index = ids.indexOf(s.source_volume_id);
        const restored = await create(`from-group-${index}`, { volume_content_source: { snapshot: { snapshot_id: s.snapshot_id } } });
        const reader = await nbd(`from-group-${index}`);
        assert.ok(
          (await reader.read(0, MiB)).every((b) => b === 0x10 + index),
          `member ${index} holds what its volume held at the group's instant`,
        );
        await reader.disconnect();
        assert.ok(restored.volume.volume_id);
      }
      await expectCode(csi.controller.DeleteSnapshot({ snapshot_id: group.snapshots[0].snapshot_id }), status.FAILED_PRECONDITION, 'a member alone');
      const got = (await csi.group.GetVolumeGroupSnapshot({ group_snapshot_id: group.group_snapshot_id })).group_snapshot as { snapshots: unknown[] };
      assert.equal(got.snapshots.length, 3);
      await expectCode(csi.group.GetVolumeGroupSnapshot({ group_snapshot_id: 'group-0000000000000000' }), status.NOT_FOUND, 'unknown group');
      await expectCode(
        csi.group.DeleteVolumeGroupSnapshot({ group_snapshot_id: group.group_snapshot_id, snapshot_ids: [group.snapshots[0].snapshot_id] }),
        status.FAILED_PRECONDITION,
        'members that do not match',
      );
      await csi.group.DeleteVolumeGroupSnapshot({ group_snapshot_id: group.group_snapshot_id, snapshot_ids: group.snapshots.map((s) => s.snapshot_id) });
      await csi.group.DeleteVolumeGroupSnapshot({ group_snapshot_id: group.group_snapshot_id });
      assert.deepEqual((await csi.controller.ListSnapshots({ snapshot_id: group.snapshots[1].snapshot_id })).entries, []);
      for (const w of writers) await w.disconnect();
    });
  });
});
