import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { AdminClient } from '../../cli/admin/client';
import { csiClient, CsiClient, expectCode, status } from '../../csi/client';
import { NbdClient, NbdError, NbdOptionError } from '../../node-plugin/nbd/client';
import { NBD_EPERM, REP } from '../../node-plugin/nbd/protocol';
import { TlsIdentity } from '../../node-plugin/nbd/tls-identity';
import { ArborError } from '../../store/errors';
import { ArborServer, startServer } from '../support/arbor-server';
import { issue, makeCa, NodeCertificate } from '../support/certs';
import { ok, run } from '../support/run';
import { freePorts } from '../support/etcd';
import { tempDir } from '../support/tmp';

const MiB = 1024 * 1024;
const block = (mode = 'SINGLE_NODE_WRITER') => ({ access_mode: { mode }, block: {} });

const tlsArgs = (cert: NodeCertificate) => ['--tls-cert', cert.certFile, '--tls-key', cert.keyFile, '--tls-ca', cert.caFile];
const clientTls = (cert: NodeCertificate) => new TlsIdentity(cert).clientOptions();

/**
 * A node without the data (`arbor node --relay-to`) serves every volume of the data
 * node by relaying NBD over mutual TLS: two real processes on loopback, certificates
 * from a private CA made with openssl.
 */
describe('relay: a node without the data serves every volume over mutual TLS', function () {
  this.timeout(300_000);
  let dir: { dir: string; cleanup: () => void };
  let node: NodeCertificate;
  let rogue: NodeCertificate;
  let dataNode: ArborServer;
  let relayNode: ArborServer;
  let nbdPort: number;
  let adminPort: number;
  let dataCsi: CsiClient;
  let relayCsi: CsiClient;

  const dataNodeArgs = () => [
    '--node-id',
    'data-node',
    '--csi-endpoint',
    `unix://${path.join(dir.dir, 'data', 'csi.sock')}`,
    '--nbd-listen',
    `127.0.0.1:${nbdPort}`,
    '--admin-listen',
    `127.0.0.1:${adminPort}`,
    ...tlsArgs(node),
  ];
  const startDataNode = () => startServer(path.join(dir.dir, 'data'), dataNodeArgs());

  before(async () => {
    dir = tempDir('arbor-relay-');
    const certs = path.join(dir.dir, 'certs');
    const ca = await makeCa(certs, 'cluster');
    node = await issue(certs, ca, 'node');
    rogue = await issue(certs, await makeCa(certs, 'rogue'), 'rogue');
    [nbdPort, adminPort] = await freePorts(2);
    fs.mkdirSync(path.join(dir.dir, 'relay'), { recursive: true });
    dataNode = await startDataNode();
    relayNode = await startServer(
      path.join(dir.dir, 'relay'),
      [
        '--node-id',
        'relay-1',
        '--csi-endpoint',
        `unix://${path.join(dir.dir, 'relay', 'csi.sock')}`,
        '--relay-to',
        `127.0.0.1:${nbdPort}`,
        '--relay-admin',
        `127.0.0.1:${adminPort}`,
        ...tlsArgs(node),
      ],
      'node',
    );
    dataCsi = csiClient(path.join(dir.dir, 'data', 'csi.sock'));
    relayCsi = csiClient(path.join(dir.dir, 'relay', 'csi.sock'));
    await dataNode.cliOk('volume', 'create', 'v', '--size', '64MiB', '--extent-size', '4KiB');
  });
  after(async () => {
    dataCsi?.close();
    relayCsi?.close();
    try {
      if (relayNode) assert.equal(await relayNode.stop(), 0, 'the relay node stops cleanly');
      if (dataNode) assert.equal(await dataNode.stop(), 0, 'the data node stops cleanly');
    } finally {
      dir.cleanup();
    }
  });

  const createVolume = async (name: string) =>
    (
      (await dataCsi.controller.CreateVolume({ name, volume_capabilities: [block()], capacity_range: { required_bytes: String(16 * MiB) } })) as {
        volume: { volume_id: string; volume_context: Record<string, string> };
      }
    ).volume;
  const viaRelay = (exportName = 'v') => NbdClient.connect({ socketPath: relayNode.nbdSocket, exportName });
  const viaDataNode = (exportName = 'v') => NbdClient.connect({ socketPath: dataNode.nbdSocket, exportName });

  it('the TCP listener takes only clients whose certificate the cluster CA signed', async () => {
    const ca = fs.readFileSync(node.caFile);
    await assert.rejects(NbdClient.connect({ host: '127.0.0.1', port: nbdPort, exportName: 'v', tls: { ca, checkServerIdentity: () => undefined } }));
    await assert.rejects(NbdClient.connect({ host: '127.0.0.1', port: nbdPort, exportName: 'v', tls: { ...clientTls(rogue), ca } }));
    await assert.rejects(NbdClient.connect({ host: '127.0.0.1', port: nbdPort, exportName: 'v', tls: clientTls(rogue) }), 'a server the CA did not sign');
    const good = await NbdClient.connect({ host: '127.0.0.1', port: nbdPort, exportName: 'v', tls: clientTls(node) });
    assert.equal(good.sizeBytes, 64 * MiB);
    await good.disconnect();
    // libnbd, a real peer, with the certificates as a directory.
    const certDir = path.join(dir.dir, 'nbdinfo-certs');
    fs.mkdirSync(certDir, { recursive: true });
    fs.copyFileSync(node.caFile, path.join(certDir, 'ca-cert.pem'));
    fs.copyFileSync(node.certFile, path.join(certDir, 'client-cert.pem'));
    fs.copyFileSync(node.keyFile, path.join(certDir, 'client-key.pem'));
    const out = await run('nbdinfo', ['--size', `nbds://127.0.0.1:${nbdPort}/v?tls-certificates=${certDir}&tls-verify-peer=false`]);
    assert.equal(out.status, 0, out.stderr);
    assert.equal(out.stdout.trim(), String(64 * MiB));
  });

  it('every request through the relay reaches the data node: reads, writes, FUA, flush, trim, zeroes, block status', async () => {
    const relay = await viaRelay();
    assert.equal(relay.sizeBytes, 64 * MiB);
    const data = randomBytes(256 * 1024);
    await Promise.all([relay.write(0, data), relay.write(MiB, data, 1 /* FUA */), relay.write(3 * MiB + 512, data.subarray(0, 1000))]);
    await relay.flush();
    const direct = await viaDataNode();
    assert.deepEqual(await direct.read(0, data.length), data);
    assert.deepEqual(await direct.read(MiB, data.length), data);
    assert.deepEqual(await direct.read(3 * MiB + 512, 1000), data.subarray(0, 1000));
    await relay.trim(0, 64 * 1024);
    await relay.zero(MiB, 64 * 1024);
    assert.deepEqual(await direct.read(0, 64 * 1024), Buffer.alloc(64 * 1024));
    assert.deepEqual(await relay.read(MiB, 64 * 1024), Buffer.alloc(64 * 1024));
    const status = await relay.blockStatus(0, 8 * MiB);
    assert.equal(
      status.reduce((sum, r) => sum + r.length, 0),
      8 * MiB,
      'block status covers the range',
    );
    assert.equal(status[0].kind, 'hole', 'the trimmed extent is a hole');
    assert.ok(status.some((r) => r.kind === 'data'));
    await relay.disconnect();
    await direct.disconnect();
    // qemu-img, a real peer, sees the same bytes on both nodes.
    const compare = await run('qemu-img', [
      'compare',
      '-f',
      'raw',
      '-F',
      'raw',
      `nbd+unix:///v?socket=${relayNode.nbdSocket}`,
      `nbd+unix:///v?socket=${dataNode.nbdSocket}`,
    ]);
    assert.equal(compare.status, 0, compare.stdout + compare.stderr);
  });

  it('snapshots are read-only through the relay; unknown exports are unknown; the list is the data node’s', async () => {
    await dataNode.cliOk('snapshot', 'create', 'v@s1');
    const snapshot = await viaRelay('v@s1');
    await assert.rejects(snapshot.write(0, Buffer.alloc(512)), (err) => err instanceof NbdError && err.errno === NBD_EPERM);
    await snapshot.disconnect();
    await assert.rejects(viaRelay('nope'), (err) => err instanceof NbdOptionError && err.replyType === REP.ERR_UNKNOWN);
    const listed = await NbdClient.list({ socketPath: relayNode.nbdSocket });
    assert.deepEqual(listed.map((e) => e.name).sort(), ['v', 'v@s1']);
  });

  it('the relay node registers with the data node: the controller publishes to it, Probe is ready', async () => {
    assert.deepEqual((await relayCsi.identity.Probe({})).ready, { value: true });
    const volume = await createVolume('csi-v');
    const published = await dataCsi.controller.ControllerPublishVolume({ volume_id: volume.volume_id, node_id: 'relay-1', volume_capability: block() });
    assert.equal((published.publish_context as Record<string, string>).export, 'csi-v');
    await dataCsi.controller.ControllerUnpublishVolume({ volume_id: volume.volume_id, node_id: 'relay-1' });
    await expectCode(
      dataCsi.controller.ControllerPublishVolume({ volume_id: volume.volume_id, node_id: 'relay-2', volume_capability: block() }),
      status.NOT_FOUND,
      'a node that never registered',
    );
  });

  it('the admin API answers other nodes only lookups, and only with a certificate the CA signed', async () => {
    const admin = await AdminClient.connectTls('127.0.0.1', adminPort, new TlsIdentity(node));
    assert.equal((await admin.api.findVolume({ name: 'v' }))?.sizeBytes, 64 * MiB);
    await assert.rejects(admin.api.deleteVolume({ name: 'v' }), (err) => err instanceof ArborError && err.code === 'failed-precondition');
    admin.close();
    assert.ok(await viaDataNode().then((c) => c.disconnect().then(() => true)), 'the volume is still there');
    const refused = await AdminClient.connectTls('127.0.0.1', adminPort, new TlsIdentity({ ...rogue, caFile: node.caFile }))
      .then((c) => c.api.findVolume({ name: 'v' }))
      .then(
        () => false,
        () => true,
      );
    assert.ok(refused, 'a certificate from another CA gets nothing');
  });

  it('the data node restarting (SIGTERM, then SIGKILL) is a reconnect: writes through the relay go on, nothing acknowledged is lost', async () => {
    const relay = await viaRelay();
    const model = new Map<number, Buffer>();
    let stop = false;
    let flushing = true;
    let writes = 0;
    const writer = (async () => {
      for (let i = 0; !stop; i++) {
        const block = (i * 7) % 2048;
        const data = Buffer.alloc(4096, (i % 250) + 1);
        data.writeUInt32BE(i, 0);
        await relay.write(block * 4096, data);
        model.set(block, data);
        writes++;
        if (i % 16 === 15 && flushing) await relay.flush();
      }
      await relay.flush();
    })();
    const waitWrites = async (n: number) => {
      const target = writes + n;
      while (writes < target) await new Promise((resolve) => setTimeout(resolve, 20));
    };
    await waitWrites(50);
    assert.equal(await dataNode.stop(), 0);
    await new Promise((resolve) => setTimeout(resolve, 500));
    const before = writes;
    dataNode = await startDataNode();
    await waitWrites(50);
    assert.ok(writes > before, 'writes went on after the restart');
    // A crash: the data node dies with writes it acknowledged and never flushed; the relay sends them again.
    // Writes acknowledged and not flushed when it dies: no flush for a while first.
    flushing = false;
    await waitWrites(20);
    await dataNode.kill();
    dataNode = await startDataNode();
    await waitWrites(50);
    assert.match(relayNode.log(), /the changes acknowledged since the last flush were sent again/);
    flushing = true;
    stop = true;
    await writer;
    for (const [block, data] of model) assert.deepEqual(await relay.read(block * 4096, 4096), data, `block ${block}`);
    await relay.disconnect();
    assert.match(relayNode.log(), /the volume's server went away; routing its requests again/);
  });

  it('certificates rotate with no restart: new connections use the files as they are now', async () => {
    const certs = path.join(dir.dir, 'certs');
    const ca = { caFile: node.caFile, caKeyFile: path.join(certs, 'cluster-ca-key.pem') };
    const fresh = await issue(certs, ca, 'node-rotated');
    const before = fs.readFileSync(node.certFile);
    // As a Secret volume changes: the new files replace the old ones at once.
    for (const [from, to] of [
      [fresh.certFile, node.certFile],
      [fresh.keyFile, node.keyFile],
    ]) {
      fs.copyFileSync(from, `${to}.new`);
      fs.renameSync(`${to}.new`, to);
    }
    const client = await NbdClient.connect({ host: '127.0.0.1', port: nbdPort, exportName: 'v', tls: clientTls(node) });
    await client.disconnect();
    assert.match(dataNode.log(), /TLS certificate files changed: new connections use them/);
    assert.notDeepEqual(fs.readFileSync(node.certFile), before);
    // And the relay, which read its files at start, connects with the new ones too.
    const relay = await viaRelay('v@s1');
    await relay.disconnect();
  });

  it('a Block volume staged on the relay node through CSI holds what the data node holds', async () => {
    const volume = await createVolume('staged');
    const id = volume.volume_id;
    const published = await dataCsi.controller.ControllerPublishVolume({ volume_id: id, node_id: 'relay-1', volume_capability: block() });
    const staging = path.join(dir.dir, 'kubelet', 'staging');
    const target = path.join(dir.dir, 'kubelet', 'pod', 'dev');
    fs.mkdirSync(staging, { recursive: true });
    fs.mkdirSync(path.dirname(target), { recursive: true });
    await relayCsi.node.NodeStageVolume({
      volume_id: id,
      staging_target_path: staging,
      volume_capability: block(),
      publish_context: published.publish_context,
      volume_context: volume.volume_context,
    });
    await relayCsi.node.NodePublishVolume({ volume_id: id, staging_target_path: staging, target_path: target, volume_capability: block(), readonly: false });
    const data = randomBytes(MiB);
    fs.writeFileSync(path.join(dir.dir, 'pattern'), data);
    await ok('dd', [`if=${path.join(dir.dir, 'pattern')}`, `of=${target}`, 'bs=1M', 'oflag=direct', 'conv=fsync,notrunc', 'status=none']);
    const direct = await viaDataNode('staged');
    assert.deepEqual(await direct.read(0, MiB), data);
    await direct.disconnect();
    await relayCsi.node.NodeUnpublishVolume({ volume_id: id, target_path: target });
    await relayCsi.node.NodeUnstageVolume({ volume_id: id, staging_target_path: staging });
    await dataCsi.controller.ControllerUnpublishVolume({ volume_id: id, node_id: 'relay-1' });
  });
});
