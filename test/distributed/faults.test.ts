import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { NbdClient, NbdError } from '../../node-plugin/nbd/client';
import { CMD_FLAG, NBD_ESHUTDOWN } from '../../node-plugin/nbd/protocol';
import { Lease, absent, put } from '../../store/catalog/catalog';
import { EtcdCatalog, parseStoreUrl } from '../../store/catalog/etcd';
import { closeCatalogWithinMs, etcdCallDeadlineMs, defaultOwnerLeaseTtlMs } from '../../store/limits';
import { openStore } from '../../store/open';
import { ArborServer, startServer } from '../support/arbor-server';
import { connectWithin, distributedForSuite, stamped, stampOf } from '../support/distributed';
import { EtcdMember, sleep } from '../support/etcd';
import { tempDir } from '../support/tmp';

const MiB = 1024 * 1024;
const block = 4096;
/** Blocks of each volume the tests write and check (the model covers them byte for byte). */
const blocks = 512;
/**
 * The owner lease of the nodes in the first two tests (`--lease-ttl`). A FLUSH
 * without quorum fails only once the etcd client gave up: one to three call
 * deadlines of 5 s (it retries a call that timed out). The second test's outage, two
 * such failures and the restart, must stay within this TTL.
 */
const leaseTtlMs = 30_000;
/** The node of the long-outage test: a short lease, so an outage of a few seconds outlives it. */
const shortLeaseTtlMs = 3_000;
/** A node commits and lets go on SIGTERM; with etcd healthy that takes well under this. */
const stopWithinMs = 20_000;

/**
 * What the first `blocks` blocks of a volume must hold. Writes go through one
 * connection, one at a time, so a FLUSH that succeeds covers every write
 * acknowledged before it: `durable` is the image as of the last successful flush.
 */
class Model {
  acknowledged = Buffer.alloc(blocks * block);
  durable = Buffer.alloc(blocks * block);
  private nextTag = 1;

  constructor(readonly name: string) {}

  async write(client: NbdClient, index: number, flags = 0): Promise<void> {
    const data = stamped(this.nextTag++);
    await client.write(index * block, data, flags);
    data.copy(this.acknowledged, index * block);
  }

  async flush(client: NbdClient): Promise<number> {
    const covered = Buffer.from(this.acknowledged);
    const started = Date.now();
    await client.flush();
    this.durable = covered;
    return Date.now() - started;
  }

  /** The node lost the volume: what was acknowledged and never flushed is gone (NBD allows it). */
  lose(): void {
    this.acknowledged = Buffer.from(this.durable);
  }

  /** Reads the modelled range and says where it differs from `expected`. */
  async check(client: NbdClient, expected: Buffer, what: string): Promise<void> {
    const content = await client.read(0, blocks * block);
    if (content.equals(expected)) return;
    const wrong: string[] = [];
    for (let i = 0; i < blocks && wrong.length < 8; i++) {
      const got = content.subarray(i * block, (i + 1) * block);
      const want = expected.subarray(i * block, (i + 1) * block);
      if (!got.equals(want)) wrong.push(`block ${i}: holds ${stampOf(got)}, expected ${stampOf(want)}`);
    }
    assert.fail(`${this.name}, ${what}: the volume differs from what was acknowledged by a flush:\n  ${wrong.join('\n  ')}`);
  }
}

/** The NBD error a FLUSH or FUA write gets from a node that could not commit (the store says 'unavailable'). */
function isShutdownError(err: unknown): boolean {
  return err instanceof NbdError && err.errno === NBD_ESHUTDOWN;
}

/**
 * One `arbor node` on a three-member etcd cluster (all three endpoints in --store)
 * and a real Ceph RGW, a volume written over NBD, and etcd members stopped under
 * it. A second node reads the volume once the first let go: what a flush
 * acknowledged is in etcd and S3, not only in the first node's memory.
 */
describe('etcd faults under a node: one member lost, quorum lost and back, an outage longer than the lease', function () {
  this.timeout(120_000);
  let dir: { dir: string; cleanup: () => void };
  const nodes: ArborServer[] = [];
  const timings: string[] = [];
  // Registered before the servers' own hooks, so that it runs first: the nodes stop
  // (and let go of their leases) while etcd and RGW still run.
  after(async () => {
    const unclean: string[] = [];
    for (const node of nodes) {
      const name = path.basename(path.dirname(node.dataDir));
      const signalledAt = Date.now();
      const status = await Promise.race([node.stop(), sleep(stopWithinMs).then(() => 'still running' as const)]);
      if (status === 'still running') await node.kill();
      timings.push(`${name}: ${status === 'still running' ? 'killed' : `exit status ${status}`} ${Date.now() - signalledAt} ms after SIGTERM`);
      if (status !== 0) {
        unclean.push(`${name}: ${status === 'still running' ? `still running ${stopWithinMs} ms after SIGTERM` : `exit status ${status}`}`);
        const log = node.log().split('\n');
        const stopping = log.findIndex((line) => line.includes('"message":"stopping"'));
        console.log(`--- ${name}, from SIGTERM:\n${log.slice(stopping < 0 ? -30 : stopping).join('\n')}`);
      }
    }
    dir?.cleanup();
    if (timings.length > 0) console.log(`      timings:\n        ${timings.join('\n        ')}`);
    assert.deepEqual(unclean, [], 'every node exits cleanly on SIGTERM, whatever etcd went through');
  });
  const servers = distributedForSuite({ etcdMembers: 3 });
  let nodeA: ArborServer;
  let nodeB: ArborServer;
  const storeArgs = () => servers.args(servers.location('faults', dir.dir));
  const note = (line: string) => {
    timings.push(line);
    console.log(`      ${line}`);
  };

  const startNode = async (name: string, ttlMs: number): Promise<ArborServer> => {
    const nodeDir = path.join(dir.dir, name);
    fs.mkdirSync(nodeDir, { recursive: true });
    const node = await startServer(
      nodeDir,
      [
        ...storeArgs(),
        '--lease-ttl',
        `${ttlMs / 1000}s`,
        '--cache-dir',
        path.join(nodeDir, 'cache'),
        '--node-id',
        name,
        '--csi-endpoint',
        `unix://${path.join(dir.dir, `${name}.csi.sock`)}`,
      ],
      'node',
    );
    nodes.push(node);
    return node;
  };

  /** Creates volumes from this process, as a one-off client of the same etcd and bucket. */
  const createVolumes = async (...names: string[]): Promise<void> => {
    const store = await openStore({ ...servers.location('faults', dir.dir), leaseTtlMs: 5000 }, { nodeId: 'test-admin', ephemeralCache: true });
    try {
      for (const name of names) await store.createVolume(name, { sizeBytes: 64 * MiB });
    } finally {
      await store.close();
    }
  };

  const catalogOf = () => EtcdCatalog.open(parseStoreUrl(servers.location('faults', dir.dir).storeUrl!));

  /** A volume's record as etcd holds it. */
  const recordOf = async (catalog: EtcdCatalog, name: string): Promise<{ id: string; modRevision: number }> => {
    const entry = (await catalog.list('volumes/')).find((e) => (JSON.parse(e.value) as { name: string }).name === name);
    assert.ok(entry, `volume ${name} has a record`);
    return { id: (JSON.parse(entry.value) as { id: string }).id, modRevision: entry.modRevision };
  };

  /** The catalog revision of a volume's record, read straight from etcd. */
  const recordRevision = async (name: string): Promise<number> => {
    const catalog = await catalogOf();
    try {
      return (await recordOf(catalog, name)).modRevision;
    } finally {
      await catalog.close();
    }
  };

  const waitUntil = async (what: string, withinMs: number, ready: () => Promise<boolean>): Promise<number> => {
    const started = Date.now();
    while (!(await ready())) {
      if (Date.now() - started > withinMs) throw new Error(`${what}: not within ${withinMs} ms`);
      await sleep(100);
    }
    return Date.now() - started;
  };

  /** The members other than `leader`. */
  const followersOf = (leader: EtcdMember) => servers.etcd.members.filter((m) => m !== leader);

  /** Kills the leader and one follower, and waits until the survivor knows it has no leader. */
  const killLeaderAndFollower = async (): Promise<{ stopped: EtcdMember[]; outageAt: number }> => {
    const leader = await servers.etcd.leader();
    assert.ok(leader);
    const stopped = [leader, followersOf(leader)[0]];
    await Promise.all(stopped.map((m) => m.kill()));
    const outageAt = Date.now();
    await waitUntil('the survivor knows it has no leader', 10_000, async () => (await servers.etcd.leader()) === undefined);
    return { stopped, outageAt };
  };

  before(async () => {
    dir = tempDir();
    await createVolumes('one-down', 'no-quorum', 'let-go', 'leftover', 'long-outage', 'stopped-without-quorum');
    nodeA = await startNode('node-a', leaseTtlMs);
    nodeB = await startNode('node-b', leaseTtlMs);
  });

  afterEach(async function () {
    // Whatever a test left stopped comes back, so the next one starts from three healthy members.
    const stopped = servers.etcd?.members.filter((m) => !m.running()) ?? [];
    if (stopped.length > 0) await Promise.all(stopped.map((m) => m.start()));
    if (this.currentTest?.state === 'failed') for (const node of nodes) console.log(`--- ${node.dataDir}:\n${node.log().split('\n').slice(-30).join('\n')}`);
  });

  it('the leader killed: writes and flushes go on (a flush waits while the client fails over), everything flushed reads back, the member rejoins', async () => {
    const model = new Model('one-down');
    const { client } = await connectWithin(nodeA, 'one-down');
    let flushes = 0;
    let killedAt = 0;
    let stop = false;
    const afterKill: number[] = [];
    const writer = (async () => {
      for (let i = 0; !stop; i++) {
        await model.write(client, i % blocks);
        if (i % 8 === 7) {
          const startedAt = Date.now();
          const ms = await model.flush(client);
          flushes++;
          if (killedAt && startedAt >= killedAt - 1000) afterKill.push(ms);
        }
      }
    })();
    writer.catch(() => {}); // awaited below; a failure must not go unhandled while we wait
    await waitUntil('32 flushes before the kill', 30_000, async () => flushes >= 32);
    const leader = await servers.etcd.leader();
    assert.ok(leader, 'three healthy members have a leader');
    killedAt = Date.now();
    await leader.kill();
    const flushesAtKill = flushes;
    // Keep going for a while without the leader: not one write or flush may fail.
    await waitUntil('flushes go on without the old leader', 20_000, async () => flushes >= flushesAtKill + 32 && Date.now() - killedAt > 3000);
    stop = true;
    await writer;
    // The writer stops after whichever write it was on: flush what it wrote since its last flush, so that what
    // was acknowledged is also what a flush covered (reading the volume shows every acknowledged write).
    await model.flush(client);
    const worst = Math.max(...afterKill);
    note(
      `leader killed: ${afterKill.length} flushes after the kill, the slowest ${worst} ms (median ${afterKill.sort((a, b) => a - b)[afterKill.length >> 1]} ms)`,
    );
    // A call in flight to the old leader waits out its deadline once; then the client asks another member.
    assert.ok(worst < etcdCallDeadlineMs + 3000, `a flush during the failover took ${worst} ms`);
    await model.check(client, model.durable, 'after the leader was killed');

    const restartedAt = Date.now();
    await leader.start();
    await servers.etcd.waitHealthy();
    note(`the killed member rejoined and all three were healthy ${Date.now() - restartedAt} ms after its restart`);
    assert.ok(await servers.etcd.leader(), 'the cluster has a leader again');
    await model.write(client, 0);
    await model.flush(client);
    await model.check(client, model.durable, 'after the member rejoined');
    await client.disconnect();
  });

  it('two members stopped: a FLUSH and a FUA write fail with ESHUTDOWN while there is no quorum; back within the lease TTL, the node commits again and loses nothing flushed', async () => {
    const model = new Model('no-quorum');
    let { client } = await connectWithin(nodeA, 'no-quorum');
    for (let i = 0; i < 64; i++) await model.write(client, i);
    await model.flush(client);
    const flushedBefore = Buffer.from(model.durable);
    const revisionBefore = await recordRevision('no-quorum');

    const leader = await servers.etcd.leader();
    assert.ok(leader);
    const stopped = followersOf(leader);
    // The followers go; the leader stays up, and until it notices (an election timeout)
    // it still takes proposals that it can no longer commit.
    await Promise.all(stopped.map((m) => m.kill()));
    const outageAt = Date.now();
    for (let i = 64; i < 96; i++) await model.write(client, i);
    const raced = Date.now();
    await assert.rejects(model.flush(client), isShutdownError, 'a FLUSH sent just as quorum went does not succeed');
    note(`quorum lost: a FLUSH sent at once failed with ESHUTDOWN after ${Date.now() - raced} ms`);
    await waitUntil('the survivor knows it has no leader', 10_000, async () => (await servers.etcd.leader()) === undefined);

    // Writes without FUA are still acknowledged (they need no catalog); what needs a commit fails.
    for (let i = 96; i < 128; i++) await model.write(client, i);
    const failedAt = Date.now();
    await assert.rejects(model.write(client, 128, CMD_FLAG.FUA), isShutdownError, 'a FUA write without quorum does not succeed');
    note(`quorum lost: a FUA write with no leader left failed with ESHUTDOWN after ${Date.now() - failedAt} ms`);
    // A failed write leaves its range undefined (NBD): overwrite it so the model knows it again.
    await model.write(client, 128);

    // Both back within the lease TTL: the node's lease (and its owner key) survive. One
    // at a time: the old leader, whose log is longest, and the first member back form a
    // quorum that only it can lead, so the FLUSH sent at once (in its log, never
    // acknowledged) is committed now. The node must cope with a commit it was told failed.
    const restartedMs = Date.now() - outageAt;
    await stopped[0].start();
    await stopped[1].start();
    await servers.etcd.waitHealthy();
    const healthyAt = Date.now();
    note(
      `quorum back: the two members restarted ${restartedMs} ms after they were killed (lease TTL ${leaseTtlMs} ms), all three healthy ${healthyAt - outageAt - restartedMs} ms later`,
    );
    assert.ok(
      restartedMs < leaseTtlMs,
      `the members were restarted ${restartedMs} ms after they were killed, later than the lease TTL this test means to stay within`,
    );
    const landed = (await recordRevision('no-quorum')) !== revisionBefore;
    note(`quorum back: the FLUSH that failed at once ${landed ? 'was committed all the same' : 'was not committed'} when quorum came back`);
    // What this test is about: the old leader had taken that FLUSH's transaction and, elected again, committed it.
    assert.ok(landed, 'etcd committed the transaction of the FLUSH that failed (the old leader won the election)');

    // The same connection commits again: everything written since the last good flush.
    let recoveredMs = -1;
    let lastError = '';
    for (;;) {
      try {
        await model.flush(client);
        recoveredMs = Date.now() - healthyAt;
        break;
      } catch (err) {
        lastError = (err as Error).message;
        if (Date.now() - healthyAt > 20_000)
          assert.fail(
            `no FLUSH succeeded within 20 s of quorum coming back; the last failed with: ${lastError}\n${nodeA.log().split('\n').slice(-15).join('\n')}`,
          );
        await sleep(250);
      }
    }
    note(
      `quorum back: the first FLUSH on the same connection succeeded ${recoveredMs} ms after the cluster was healthy${lastError ? ` (earlier tries: ${lastError})` : ''}`,
    );
    assert.ok(recoveredMs < 10_000, `recovery took ${recoveredMs} ms`);
    await model.check(client, model.acknowledged, 'after quorum came back, on the same connection');
    assert.ok(!nodeA.log().includes('the owner lease ended'), 'node A kept its lease through the outage');
    for (let i = 0; i < 64; i += 4) await model.write(client, 200 + i);
    await model.write(client, 300, CMD_FLAG.FUA);
    await model.flush(client);
    assert.ok(!model.durable.equals(flushedBefore));
    await client.disconnect();

    // Another connection to the same node, then the other node: the bytes are in etcd and S3.
    ({ client } = await connectWithin(nodeA, 'no-quorum', 5000));
    await model.check(client, model.durable, 'on a new connection to the same node');
    await client.disconnect();
    const onB = await connectWithin(nodeB, 'no-quorum', 5000);
    await model.check(onB.client, model.durable, 'on the second node');
    await onB.client.disconnect();
  });

  it('a connection closed while there is no quorum: once quorum is back the node lets go of the volume, and either node serves what was flushed', async () => {
    const model = new Model('let-go');
    const { client } = await connectWithin(nodeA, 'let-go');
    for (let i = 0; i < 32; i++) await model.write(client, i);
    await model.flush(client);

    const { stopped, outageAt } = await killLeaderAndFollower();
    for (let i = 32; i < 48; i++) await model.write(client, i);
    // The last connection goes: the node commits (which fails) and deletes its owner key (which fails too).
    await client.disconnect();
    model.lose();
    await waitUntil('node A tried to let go', 60_000, async () => nodeA.log().includes('letting go of a volume failed'));
    note(`closed in the outage: node A failed to let go of the volume ${Date.now() - outageAt} ms into the outage`);

    await Promise.all(stopped.map((m) => m.start()));
    await servers.etcd.waitHealthy();
    const healthyAt = Date.now();
    // Node A's lease lives on (the outage is shorter than it): only node A itself can delete the key.
    const onB = await connectWithin(nodeB, 'let-go', 15_000);
    note(`closed in the outage: node B served the volume ${onB.waitedMs} ms after quorum came back`);
    // What the failed close could not commit was never acknowledged by a flush: it is not there.
    await model.check(onB.client, model.durable, 'on node B after the outage');
    for (let i = 100; i < 116; i++) await model.write(onB.client, i);
    await model.flush(onB.client);
    await onB.client.disconnect();
    const again = await connectWithin(nodeA, 'let-go', 5000);
    await model.check(again.client, model.durable, 'on node A again');
    await again.client.disconnect();
    assert.ok(Date.now() - healthyAt < 20_000);
  });

  it("an owner key on the node's own lease that no open volume holds (an acquire that landed, its answer lost) does not block the volume", async () => {
    const model = new Model('leftover');
    const first = await connectWithin(nodeA, 'leftover');
    for (let i = 0; i < 8; i++) await model.write(first.client, i);
    await model.flush(first.client);
    const catalog = await catalogOf();
    try {
      const owner = await catalog.get(`owners/${(await recordOf(catalog, 'leftover')).id}`);
      assert.ok(owner, 'node A owns the volume it serves');
      await first.client.disconnect();
      await waitUntil('node A let go', 5000, async () => (await catalog.get(owner.key)) === undefined);
      // As if node A's acquire had landed and the etcd client, its answer lost, had tried it again:
      // the key is back, on node A's live lease, and no volume of node A holds it.
      const lease = { id: (JSON.parse(owner.value) as { lease: string }).lease } as Lease;
      assert.ok((await catalog.txn([absent(owner.key)], [put(owner.key, JSON.parse(owner.value), lease)])).succeeded);
    } finally {
      await catalog.close();
    }
    const again = await connectWithin(nodeA, 'leftover');
    await model.check(again.client, model.durable, 'on node A with its leftover key');
    await model.write(again.client, 8);
    await model.flush(again.client);
    await again.client.disconnect();
    const onB = await connectWithin(nodeB, 'leftover', 5000);
    await model.check(onB.client, model.durable, 'on node B once node A let go');
    await onB.client.disconnect();
  });

  it('an outage longer than the lease: the node gives the volume up, nothing flushed is lost, and it serves the volume again within a bound once quorum is back', async () => {
    const nodeC = await startNode('node-c', shortLeaseTtlMs);
    const model = new Model('long-outage');
    const { client } = await connectWithin(nodeC, 'long-outage');
    for (let i = 0; i < 64; i++) await model.write(client, i);
    await model.flush(client);

    // This time the leader and one follower go: the survivor has no leader at all.
    const { stopped, outageAt } = await killLeaderAndFollower();
    for (let i = 64; i < 96; i++) await model.write(client, i);
    await assert.rejects(model.flush(client), isShutdownError, 'a FLUSH without quorum does not succeed');
    await waitUntil('node C gives up its lease', 30_000, async () => nodeC.log().includes('the owner lease ended'));
    const lostLine = nodeC
      .log()
      .split('\n')
      .find((line) => line.includes('the owner lease ended'))!;
    const lostAfterMs = Date.parse((JSON.parse(lostLine) as { timestamp: string }).timestamp) - outageAt;
    note(`long outage: node C declared its lease (TTL ${shortLeaseTtlMs} ms) lost ${lostAfterMs} ms into the outage`);
    // Not before etcd could have ended it (the TTL), and not much after twice the TTL without an answered keep-alive.
    assert.ok(lostAfterMs > shortLeaseTtlMs && lostAfterMs < 2 * shortLeaseTtlMs + 3000, `lost after ${lostAfterMs} ms`);
    // Once lost, the volume refuses everything on the old connection: no write can be taken for durable any more.
    await assert.rejects(model.write(client, 97), isShutdownError, 'a write on a volume the node lost fails');
    await assert.rejects(model.flush(client), isShutdownError, 'a flush on a volume the node lost fails');

    await Promise.all(stopped.map((m) => m.start()));
    await servers.etcd.waitHealthy();
    const healthyAt = Date.now();
    note(`long outage: quorum back after ${healthyAt - outageAt} ms`);
    client.destroy();
    model.lose();

    // A new connection to the same node: the owner key on the old lease goes only when that
    // lease expires in etcd, a TTL after quorum came back; until then even node C is refused.
    const again = await connectWithin(nodeC, 'long-outage', 30_000);
    note(
      `long outage: node C served the volume again ${Date.now() - healthyAt} ms after quorum came back${again.lastError ? ` (refused until then: ${again.lastError})` : ''}`,
    );
    assert.ok(Date.now() - healthyAt < 2 * shortLeaseTtlMs + 10_000, 'within a bound of the lease TTL');
    // The writes after the last good flush were never committed: the volume is as that flush left it.
    await model.check(again.client, model.durable, 'after the long outage, on node C');
    for (let i = 0; i < 16; i++) await model.write(again.client, 400 + i);
    await model.flush(again.client);
    await again.client.disconnect();

    const onB = await connectWithin(nodeB, 'long-outage', 5000);
    await model.check(onB.client, model.durable, 'after the long outage, on node B');
    await onB.client.disconnect();
  });
  it('SIGTERM while etcd has no quorum: the node gives up what it cannot commit or release, says so, and exits 0 in time; another node then serves what was flushed', async () => {
    const nodeD = await startNode('node-d', defaultOwnerLeaseTtlMs);
    const model = new Model('stopped-without-quorum');
    const { client } = await connectWithin(nodeD, 'stopped-without-quorum');
    for (let i = 0; i < 32; i++) await model.write(client, i);
    await model.flush(client);
    // Acknowledged, never flushed: the node's last commit at the stop cannot land.
    for (let i = 32; i < 48; i++) await model.write(client, i);

    const { stopped, outageAt } = await killLeaderAndFollower();
    const signalledAt = Date.now();
    // The connection stays open: the node closes it, and lets go of the volume, itself.
    const status = await Promise.race([nodeD.stop(), sleep(stopWithinMs).then(() => 'still running' as const)]);
    const stopMs = Date.now() - signalledAt;
    if (status === 'still running') await nodeD.kill();
    client.destroy();
    model.lose();
    note(
      `stopped without quorum: node D exited ${status === 'still running' ? '(killed)' : status} ${stopMs} ms after SIGTERM, ${signalledAt - outageAt} ms into the outage (close budget ${closeCatalogWithinMs} ms)`,
    );
    assert.equal(status, 0, `node D exits 0 on SIGTERM without quorum (${stopMs} ms after it):\n${nodeD.log().split('\n').slice(-15).join('\n')}`);
    // What it gave up, said in the log: the volume's last commit and its owner key (when the connection closed, or
    // when the store closed, whichever came first), and the lease.
    const lines = nodeD.log().split('\n');
    const said = (...words: string[]) => lines.some((line) => words.every((w) => line.includes(w)));
    for (const [what, ok] of [
      ['the last commit', said('closing the export after its connection ended failed', 'etcd txn volumes/') || said('a volume could not commit')],
      ['the owner key', said('letting go of a volume failed') || said('the owner key of a volume could not be deleted')],
      ['the lease', said('revoking an etcd lease failed')],
    ] as const) {
      assert.ok(ok, `node D's log says it gave up ${what}:\n${lines.slice(-15).join('\n')}`);
    }

    // Node D's owner key lives on its lease: once quorum is back, another node serves the volume when that lease has ended.
    await Promise.all(stopped.map((m) => m.start()));
    await servers.etcd.waitHealthy();
    const onB = await connectWithin(nodeB, 'stopped-without-quorum', defaultOwnerLeaseTtlMs + 15_000);
    note(`stopped without quorum: node B served the volume ${onB.waitedMs} ms after quorum came back`);
    await model.check(onB.client, model.durable, 'on node B after node D stopped without quorum');
    await onB.client.disconnect();
  });
});
