import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { ArborServer, cliPath, startServer } from '../support/arbor-server';
import { issue, makeCa, NodeCertificate } from '../support/certs';
import { distributedForSuite } from '../support/distributed';
import { daemonTempDir, freePorts, requireCommands } from '../support/etcd';
import { runMigrationBetweenServers } from '../support/migration/between-servers';
import { writesTimeoutMs } from '../support/migration/limits';
import { MigrationRun } from '../support/migration/migrate';
import { describeRun } from '../support/migration/report';
import { ok } from '../support/run';

const blocks = 32;
const leaseTtl = '2s';

/**
 * Live migration between two nodes of a distributed store (real etcd and Ceph RGW):
 * the source VM's node owns the volume; the target VM's node relays to it while
 * QEMU moves the guest; when the source QEMU ends, ownership moves to the target's
 * node, which then serves the volume itself. The guest writes stamped blocks with
 * O_DIRECT and fsync throughout.
 */
describe('live migration between two nodes on etcd + S3: ownership follows the VM', function () {
  this.timeout(600_000);
  const servers = distributedForSuite();
  let dir: { dir: string; cleanup: () => void };
  let certificate: NodeCertificate;
  const nodes: Record<string, ArborServer> = {};
  const ports: Record<string, number> = {};
  let volumes = 0;

  const storeArgs = () => servers.args(servers.location('migration', dir.dir));
  const startNode = async (name: string, port: number): Promise<ArborServer> => {
    ports[name] = port;
    const nodeDir = path.join(dir.dir, name);
    fs.mkdirSync(nodeDir, { recursive: true });
    nodes[name] = await startServer(
      nodeDir,
      [
        ...storeArgs(),
        '--lease-ttl', leaseTtl,
        '--cache-dir', path.join(nodeDir, 'cache'),
        '--node-id', name,
        '--csi-endpoint', `unix://${path.join(nodeDir, 'csi.sock')}`,
        '--nbd-listen', `127.0.0.1:${port}`,
        '--nbd-advertise', `127.0.0.1:${port}`,
        '--tls-cert', certificate.certFile,
        '--tls-key', certificate.keyFile,
        '--tls-ca', certificate.caFile,
      ],
      'node',
    ); // prettier-ignore
    return nodes[name];
  };
  const routes = (node: string, volume: string) =>
    nodes[node]
      .log()
      .split('\n')
      .filter((line) => line.includes('"message":"volume routed"') && line.includes(`"volume":"${volume}"`))
      .map((line) => (JSON.parse(line) as { served: string }).served);

  before(async () => {
    requireCommands(['qemu-system-x86_64', 'modprobe', 'openssl'], 'qemu-system-x86 linux-image-amd64 busybox-static kmod openssl');
    dir = daemonTempDir('arbor-dist-migration-');
    const ca = await makeCa(path.join(dir.dir, 'certs'), 'cluster');
    certificate = await issue(path.join(dir.dir, 'certs'), ca, 'node');
    const [a, b] = await freePorts(2);
    await startNode('node-a', a);
    await startNode('node-b', b);
  });
  after(async () => {
    try {
      for (const node of Object.values(nodes)) assert.equal(await node.stop(), 0, 'each node stops cleanly on SIGTERM');
    } finally {
      dir?.cleanup();
    }
  });

  async function freshVolume(): Promise<string> {
    const name = `vm-disk-${++volumes}`;
    await ok(process.execPath, [cliPath, '--data-dir', path.join(dir.dir, 'cli'), ...storeArgs(), 'volume', 'create', name, '--size', '64MiB'], {
      env: servers.env(),
    });
    return name;
  }

  it('the guest moves from node A to node B; when the source QEMU ends, B owns the volume and the guest writes on with nothing lost', async () => {
    const name = await freshVolume();
    let writesWhenSourceEnded = 0;
    const run: MigrationRun = await runMigrationBetweenServers({
      exportName: name,
      sourceSocket: nodes['node-a'].nbdSocket,
      targetSocket: nodes['node-b'].nbdSocket,
      verifySocket: nodes['node-b'].nbdSocket,
      blocks,
      afterMigration: async ({ source, running }) => {
        // The migration is done; the source QEMU ends, as KubeVirt's does: A lets go, and B takes the volume at its next request.
        await source.quit();
        writesWhenSourceEnded = running.console.writes.length;
        await running.waitForWrites(writesWhenSourceEnded + 30, writesTimeoutMs);
      },
    });
    console.log(`      ${describeRun('migration', run)}`);
    assert.equal(run.status, 'completed');
    assert.deepEqual(run.problems, []);
    assert.ok(run.firstTargetSeq > run.lastSourceSeq, `the target's first write ${run.firstTargetSeq} follows the source's last ${run.lastSourceSeq}`);
    assert.ok(run.writesOnTarget >= writesWhenSourceEnded + 30 - run.writesOnSource, 'the guest wrote on after the handover');
    assert.equal(run.volume!.exact + run.volume!.newer, blocks, `every block was written and checked: ${JSON.stringify(run.volume)}`);
    assert.deepEqual(routes('node-a', name), ['here'], 'A served the source itself');
    // (The check's own client, after both VMs, opens it on B once more.)
    assert.deepEqual(
      routes('node-b', name).slice(0, 2),
      ['relayed to its owner', 'here'],
      'B relayed to A during the migration, then served the volume itself',
    );
    assert.match(nodes['node-a'].log(), /handing a volume over/);
  });

  it("node A's plugin SIGKILLed during the migration: the source's disk waits for it, the migration completes, nothing the guest completed is lost", async () => {
    const name = await freshVolume();
    const portA = ports['node-a'];
    let restartedInMs = 0;
    const run = await runMigrationBetweenServers({
      exportName: name,
      sourceSocket: nodes['node-a'].nbdSocket,
      targetSocket: nodes['node-b'].nbdSocket,
      verifySocket: nodes['node-b'].nbdSocket,
      blocks,
      // As a kernel nbd device waits for a restarted plugin (its dead-connection timeout).
      reconnectDelaySeconds: 120,
      migrate: {
        // Slow enough that the plugin dies while the guest's memory is still being copied.
        maxBandwidthBytesPerSecond: 8 * 1024 * 1024,
        whileMigrating: async () => {
          await new Promise((resolve) => setTimeout(resolve, 500));
          await nodes['node-a'].kill();
          const started = Date.now();
          await startNode('node-a', portA);
          restartedInMs = Date.now() - started;
        },
      },
      afterMigration: async ({ source, running }) => {
        await source.quit();
        await running.waitForWrites(running.console.writes.length + 30, writesTimeoutMs);
      },
    });
    console.log(`      ${describeRun('migration with node A killed', run)}; node A back in ${restartedInMs} ms`);
    assert.equal(run.status, 'completed');
    assert.deepEqual(run.problems, []);
    assert.ok(run.firstTargetSeq > run.lastSourceSeq);
    assert.equal(run.volume!.exact + run.volume!.newer, blocks, `every block was written and checked: ${JSON.stringify(run.volume)}`);
  });

  it('a cancelled migration leaves the source writing on node A, which still owns the volume; nothing is lost', async () => {
    const name = await freshVolume();
    const run = await runMigrationBetweenServers({
      exportName: name,
      sourceSocket: nodes['node-a'].nbdSocket,
      targetSocket: nodes['node-b'].nbdSocket,
      verifySocket: nodes['node-a'].nbdSocket,
      blocks,
      migrate: { maxBandwidthBytesPerSecond: 4 * 1024 * 1024, cancelAfterMs: 1_000 },
    });
    console.log(`      ${describeRun('cancelled migration', run)}`);
    assert.equal(run.status, 'cancelled');
    assert.deepEqual(run.problems, []);
    assert.equal(run.writesOnTarget, 0);
    assert.equal(run.volume!.exact + run.volume!.newer, blocks, `every block was written and checked: ${JSON.stringify(run.volume)}`);
    assert.deepEqual(routes('node-a', name).slice(0, 1), ['here']);
    assert.ok(!routes('node-b', name).includes('here'), 'B never owned the volume');
  });
});
