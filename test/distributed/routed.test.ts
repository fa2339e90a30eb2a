import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { NbdClient } from '../../node-plugin/nbd/client';
import { ArborServer, cliPath, startServer } from '../support/arbor-server';
import { issue, makeCa, NodeCertificate } from '../support/certs';
import { distributedForSuite } from '../support/distributed';
import { ok } from '../support/run';
import { freePorts } from '../support/etcd';
import { tempDir } from '../support/tmp';

const MiB = 1024 * 1024;
const leaseTtl = '2s';

/**
 * A writer that never stops on its own: stamped 4 KiB blocks, a flush every
 * `flushEvery` writes (0: only when stopped), a model of what it wrote (and when) and
 * what was flushed.
 */
function startWriter(client: NbdClient, blocks: number, flushEvery = 8) {
  const written = new Map<number, Buffer>();
  const writtenAt = new Map<number, number>();
  let flushed = new Map<number, Buffer>();
  let writes = 0;
  let stop = false;
  const done = (async () => {
    for (let i = 1; !stop; i++) {
      const block = (i * 13) % blocks;
      const data = Buffer.alloc(4096, i % 251);
      data.writeUInt32BE(i, 0);
      await client.write(block * 4096, data);
      written.set(block, data);
      writtenAt.set(block, i);
      writes++;
      if (flushEvery > 0 && i % flushEvery === 0) {
        await client.flush();
        flushed = new Map(written);
      }
    }
    await client.flush();
    flushed = new Map(written);
  })();
  return {
    get writes() {
      return writes;
    },
    get written() {
      return written;
    },
    /** The number of the write that last wrote each block (writes count from 1). */
    get writtenAt() {
      return writtenAt;
    },
    get flushed() {
      return flushed;
    },
    async waitFor(more: number, withinMs = 60_000) {
      const target = writes + more;
      const deadline = Date.now() + withinMs;
      while (writes < target) {
        if (Date.now() > deadline) throw new Error(`the writer made ${writes} writes, not ${target}, within ${withinMs} ms`);
        await Promise.race([done, new Promise((resolve) => setTimeout(resolve, 20))]);
      }
    },
    async stop() {
      stop = true;
      await done;
    },
    done,
  };
}

/**
 * Every node attaches every volume on etcd + S3: a node that does not own a volume
 * relays it to the owner over mutual TLS, and ownership moves to where the volume is
 * still used when its owner's last client goes (what a live migration does).
 */
describe('distributed: every node attaches every volume, ownership follows its users', function () {
  this.timeout(300_000);
  const servers = distributedForSuite();
  let dir: { dir: string; cleanup: () => void };
  let certificate: NodeCertificate;
  const nodes: Record<string, ArborServer> = {};
  const ports: Record<string, number> = {};

  const storeArgs = () => servers.args(servers.location('routed', dir.dir));
  const startNode = async (name: string): Promise<ArborServer> => {
    const nodeDir = path.join(dir.dir, name);
    fs.mkdirSync(nodeDir, { recursive: true });
    ports[name] ??= (await freePorts(1))[0];
    nodes[name] = await startServer(
      nodeDir,
      [
        ...storeArgs(),
        '--lease-ttl',
        leaseTtl,
        '--cache-dir',
        path.join(nodeDir, 'cache'),
        '--node-id',
        name,
        '--csi-endpoint',
        `unix://${path.join(nodeDir, 'csi.sock')}`,
        '--nbd-listen',
        `127.0.0.1:${ports[name]}`,
        '--nbd-advertise',
        `127.0.0.1:${ports[name]}`,
        '--tls-cert',
        certificate.certFile,
        '--tls-key',
        certificate.keyFile,
        '--tls-ca',
        certificate.caFile,
      ],
      'node',
    );
    return nodes[name];
  };
  const client = (node: string, exportName: string) => NbdClient.connect({ socketPath: nodes[node].nbdSocket, exportName });
  const routedHere = (node: string, volume: string) =>
    nodes[node]
      .log()
      .split('\n')
      .filter((line) => line.includes('"message":"volume routed"') && line.includes(`"volume":"${volume}"`))
      .map((line) => (JSON.parse(line) as { served: string }).served);
  const createVolume = (name: string) =>
    ok(
      process.execPath,
      [cliPath, '--data-dir', path.join(dir.dir, 'cli'), ...storeArgs(), 'volume', 'create', name, '--size', '64MiB', '--extent-size', '4KiB'],
      {
        env: servers.env(),
      },
    );

  before(async () => {
    dir = tempDir('arbor-routed-');
    const ca = await makeCa(path.join(dir.dir, 'certs'), 'cluster');
    certificate = await issue(path.join(dir.dir, 'certs'), ca, 'node');
    await startNode('node-a');
    await startNode('node-b');
  });
  after(async () => {
    for (const node of Object.values(nodes)) await node.stop();
    dir?.cleanup();
  });

  it('a volume owned by node A is attached on node B through a relay: each sees what the other writes', async () => {
    await createVolume('shared');
    const onA = await client('node-a', 'shared');
    const onB = await client('node-b', 'shared');
    assert.deepEqual(routedHere('node-a', 'shared'), ['here']);
    assert.deepEqual(routedHere('node-b', 'shared'), ['relayed to its owner']);
    const fromA = crypto.randomBytes(64 * 1024);
    const fromB = crypto.randomBytes(64 * 1024);
    await onA.write(0, fromA);
    await onB.write(MiB, fromB);
    await onB.flush();
    assert.deepEqual(await onB.read(0, fromA.length), fromA);
    assert.deepEqual(await onA.read(MiB, fromB.length), fromB);
    await onB.disconnect();
    await onA.disconnect();
  });

  it('when the owner’s last client goes, the node still using the volume takes it over: its writer never sees an error, nothing is lost', async () => {
    await createVolume('migrating');
    const source = await client('node-a', 'migrating');
    await source.write(0, Buffer.alloc(4096, 0xaa));
    await source.flush();
    const target = await client('node-b', 'migrating');
    const writer = startWriter(target, 1024);
    await writer.waitFor(40);
    // The source lets go (QEMU's source stops after the migration): A hands the volume to B.
    await source.disconnect();
    await writer.waitFor(80);
    assert.match(nodes['node-a'].log(), /handing a volume over/);
    assert.deepEqual(routedHere('node-b', 'migrating'), ['relayed to its owner', 'here'], 'B served it through A, then itself');
    await writer.stop();
    for (const [block, data] of writer.written) assert.deepEqual(await target.read(block * 4096, 4096), data, `block ${block} on B`);
    // A can no longer change the volume by itself: a client there now goes through B.
    const again = await client('node-a', 'migrating');
    assert.deepEqual(routedHere('node-a', 'migrating'), ['here', 'relayed to its owner']);
    for (const [block, data] of writer.written) assert.deepEqual(await again.read(block * 4096, 4096), data, `block ${block} seen from A`);
    await again.disconnect();
    await target.disconnect();
  });

  it('a paused owner (SIGSTOP) loses the volume to the node relaying to it; woken, nothing it held lands and its client goes on through the new owner', async () => {
    await createVolume('paused');
    const ownerClient = await client('node-a', 'paused');
    await ownerClient.write(0, Buffer.alloc(4096, 0x0a));
    await ownerClient.flush();
    const relayed = await client('node-b', 'paused');
    const writer = startWriter(relayed, 256);
    await writer.waitFor(20);
    process.kill(nodes['node-a'].pid, 'SIGSTOP');
    try {
      // B's requests wait for A, then (A's lease gone, the relay timed out) B takes the volume.
      await writer.waitFor(40, 60_000);
      assert.equal(routedHere('node-b', 'paused').at(-1), 'here');
    } finally {
      process.kill(nodes['node-a'].pid, 'SIGCONT');
    }
    await writer.waitFor(20);
    // A wakes with stale state: its client's next write goes to the new owner, and nothing A held back lands.
    await ownerClient.write(4096 * 300, Buffer.alloc(4096, 0x0b));
    await ownerClient.flush();
    await writer.stop();
    for (const [block, data] of writer.written) assert.deepEqual(await relayed.read(block * 4096, 4096), data, `block ${block}`);
    assert.deepEqual(await relayed.read(4096 * 300, 4096), Buffer.alloc(4096, 0x0b), 'the woken node’s write went through the new owner');
    assert.match(nodes['node-a'].log(), /owner lease ended/);
    assert.equal(routedHere('node-a', 'paused').at(-1), 'relayed to its owner');
    await ownerClient.disconnect();
    await relayed.disconnect();
  });

  it('the owner dies (SIGKILL): the node relaying to it takes the volume over after the lease; nothing it acknowledged is lost, flushed or not', async () => {
    await createVolume('orphaned');
    const owner = await client('node-b', 'orphaned');
    const relayed = await client('node-a', 'orphaned');
    const flushing = startWriter(relayed, 512);
    await flushing.waitFor(40);
    await flushing.stop();
    // B dies under a writer that does not flush (a writer that does might have just
    // flushed): every write it got acknowledged is one B never made durable.
    const writer = startWriter(relayed, 512, 0);
    await writer.waitFor(40);
    await nodes['node-b'].kill();
    const acknowledgedBeforeDeath = writer.writes;
    owner.destroy();
    await writer.waitFor(40);
    assert.equal(routedHere('node-a', 'orphaned').at(-1), 'here', 'A serves it itself once B’s lease ended');
    await writer.stop();
    // A sent them again before anything else, so none is lost.
    for (const [block, data] of new Map([...flushing.written, ...writer.written]))
      assert.deepEqual(await relayed.read(block * 4096, 4096), data, `block ${block}`);
    const replays = nodes['node-a']
      .log()
      .split('\n')
      .filter((line) => line.includes('the changes acknowledged since the last flush were sent again'))
      .map((line) => JSON.parse(line) as { volume: string; changes: number })
      .filter((replay) => replay.volume === 'orphaned');
    assert.equal(replays.length, 1, 'one move, one replay');
    // Every write acknowledged before the kill was held (and at most the one in flight then besides).
    assert.ok(
      replays[0].changes >= acknowledgedBeforeDeath && replays[0].changes <= acknowledgedBeforeDeath + 1,
      `${replays[0].changes} changes sent again; ${acknowledgedBeforeDeath} were acknowledged before B died`,
    );
    await relayed.disconnect();
    await startNode('node-b');
  });
});
