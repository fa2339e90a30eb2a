import assert from 'node:assert/strict';
import { daemonTempDir, requireCommands } from '../support/etcd';
import { DataNodeRestart, EmbeddedNodes, startEmbeddedNodes } from '../support/migration/arbor-nodes';
import { MigrationBetweenServersOptions, runMigrationBetweenServers } from '../support/migration/between-servers';
import { writesTimeoutMs } from '../support/migration/limits';
import { longestStall, MigrationRun } from '../support/migration/migrate';
import { nbdVolume } from '../support/migration/nbd-volume';
import { describeRun, formatMs } from '../support/migration/report';
import { stampBlock } from '../support/migration/stamp';
import { verifyVolume } from '../support/migration/verify';

/** Few blocks, so every block is written several times and an older stamp is a real lost write. */
const blocks = 32;
const MiB = 1024 * 1024;
/** How long no data node exists during its restart: the guest must wait at least this long, and no longer fail. */
const dataNodeAwayMs = 1_000;

/**
 * Live migration of a writing guest between two Arbor nodes in embedded mode: the
 * source VM's disk is the volume through the data node's unix socket, the target
 * VM's the same volume through the socket of a node without the data, which relays
 * NBD to the data node over mutual TLS. The guest's reports say what the volume must
 * hold; it is read back on the data node with Arbor's NBD client.
 */
describe('live migration of a VM from the data node to a node that relays to it (embedded mode)', function () {
  this.timeout(300_000);
  let dir: { dir: string; cleanup: () => void };
  let nodes: EmbeddedNodes;
  let volumes = 0;

  before(async () => {
    requireCommands(['qemu-system-x86_64', 'modprobe', 'openssl'], 'qemu-system-x86 linux-image-amd64 busybox-static kmod openssl');
    dir = daemonTempDir('arbor-migration-');
    nodes = await startEmbeddedNodes(dir.dir);
  });

  after(async () => {
    try {
      if (nodes) assert.deepEqual(await nodes.stop(), { relay: 0, data: 0 }, 'both nodes stop cleanly on SIGTERM');
    } finally {
      dir?.cleanup();
    }
  });

  /** A fresh volume per run: the guest's stamps carry a run id, and blocks left by another run would be reported as foreign. */
  async function freshVolume(): Promise<string> {
    const name = `vm-disk-${++volumes}`;
    await nodes.dataNode.cliOk('volume', 'create', name, '--size', '64MiB');
    return name;
  }

  /** Source on the data node, target on the relay node, the volume checked on the data node. */
  const dataNodeToRelayNode = (exportName: string, options: Partial<MigrationBetweenServersOptions> = {}) =>
    runMigrationBetweenServers({
      exportName,
      sourceSocket: nodes.dataNode.nbdSocket,
      targetSocket: nodes.relayNode.nbdSocket,
      verifySocket: nodes.dataNode.nbdSocket,
      blocks,
      ...options,
    });

  function assertMovedAndWhole(run: MigrationRun): void {
    assert.equal(run.status, 'completed');
    assert.deepEqual(run.problems, []);
    assert.ok(run.writesOnTarget >= 30, `the guest wrote on in the target (${run.writesOnTarget} writes)`);
    assert.ok(run.firstTargetSeq > run.lastSourceSeq, `the target's first write ${run.firstTargetSeq} follows the source's last ${run.lastSourceSeq}`);
    const { source, target } = run.diskOperations;
    // The target's flushes went to its own export, the relay node's socket: that is the way its writes took. (Of its
    // first 30 reported writes, the one in flight at the switch may have left from the source.)
    assert.ok(source.flushes >= run.lastSourceSeq - 1 && target.flushes >= 29, `each write was flushed to the export: ${JSON.stringify(run.diskOperations)}`);
    assert.equal(run.volume!.exact + run.volume!.newer, blocks, `every block was written and checked: ${JSON.stringify(run.volume)}`);
  }

  it('moves a writing guest to the relay node, where it writes on, and every block on the data node holds its newest completed write', async () => {
    const name = await freshVolume();
    const run = await dataNodeToRelayNode(name);
    console.log(`      ${describeRun('migration', run)}`);
    assertMovedAndWhole(run);

    // The check reads the volume itself: a block put back to its previous stamp on the data node is a lost write, and is found.
    const block = run.newest.findIndex((seq) => seq > blocks);
    assert.ok(block >= 0, 'some block was written twice');
    const volume = nbdVolume({ socketPath: nodes.dataNode.nbdSocket, exportName: name });
    try {
      await volume.writeBlock(block, stampBlock({ run: run.run, seq: run.newest[block] - blocks, block }));
      const damaged = await verifyVolume({ run: run.run, newest: run.newest, readBlock: volume.readBlock });
      assert.ok(
        damaged.problems.some((problem) => problem.startsWith(`block ${block}: holds write ${run.newest[block] - blocks}, older than`)),
        `the older stamp in block ${block} is reported: ${JSON.stringify(damaged.problems)}`,
      );
    } finally {
      await volume.close();
    }
  });

  it('a cancelled migration leaves the guest running and writing on the data node, with nothing lost', async () => {
    // Slow enough (the guest's RAM holds some 30 MiB that is not zero) to be cancelled halfway.
    const migrate = { maxBandwidthBytesPerSecond: 4 * MiB, cancelAfterMs: 1_000 };
    const run = await dataNodeToRelayNode(await freshVolume(), { migrate });
    console.log(`      ${describeRun('cancelled migration', run)}`);
    assert.equal(run.status, 'cancelled');
    const atCancel = run.qemuAtCancel!;
    console.log(`      cancelled while ${atCancel.status}, ${((atCancel.ramTransferredBytes ?? 0) / MiB).toFixed(1)} MiB sent`);
    assert.ok(atCancel.status === 'active' && (atCancel.ramTransferredBytes ?? 0) > 0, `cancelled halfway: ${JSON.stringify(atCancel)}`);
    assert.deepEqual(run.problems, []);
    assert.equal(run.writesOnTarget, 0, 'the target never ran the guest');
    assert.ok(run.writesOnSource >= 60, `the source wrote on after the cancel (${run.writesOnSource} writes)`);
    assert.equal(run.volume!.exact + run.volume!.newer, blocks, `every block was written and checked: ${JSON.stringify(run.volume)}`);
  });

  // Last: it restarts the data node the other tests share.
  it('the data node restarting under the migrated guest is a stall for it, not an I/O error, and nothing it completed is lost', async () => {
    let restart: DataNodeRestart | undefined;
    let writesBeforeRestart = 0;
    const run = await dataNodeToRelayNode(await freshVolume(), {
      afterMigration: async ({ source, running }) => {
        // As after a real migration, the source QEMU ends; the guest now reaches the volume only through the relay node.
        await source.quit();
        writesBeforeRestart = running.console.writes.length;
        restart = await nodes.restartDataNode(dataNodeAwayMs);
        // An I/O error would end the guest's writer, and fail this wait with the guest's report of it.
        await running.waitForWrites(running.console.writes.length + 30, writesTimeoutMs);
      },
    });
    console.log(`      ${describeRun('migration', run)}`);
    assertMovedAndWhole(run);
    const { exitCode, stoppedAtMs, exitedAtMs, servingAtMs } = restart!;
    assert.equal(exitCode, 0, 'the data node stopped cleanly on SIGTERM');
    const stall = longestStall(run.writes, stoppedAtMs, servingAtMs);
    console.log(
      `      data node restart: SIGTERM to exit ${formatMs(exitedAtMs - stoppedAtMs)}, exit to serving again ${formatMs(servingAtMs - exitedAtMs)} ` +
        `(${formatMs(dataNodeAwayMs)} of it with no data node); the guest's longest write stall ${formatMs(stall.longestStallMs)}, ` +
        `between writes ${stall.before.seq} and ${stall.after.seq} (typical gap ${formatMs(stall.typicalGapMs)}); ` +
        `${writesBeforeRestart} writes on the target before the restart, ${run.writesOnTarget - writesBeforeRestart} after`,
    );
    // No write can complete while there is no data node: the guest waited (its line may reach the host a few ms late).
    assert.ok(stall.longestStallMs >= dataNodeAwayMs - 50, `the guest's writes waited for the data node: longest stall ${stall.longestStallMs} ms`);
    assert.ok(run.writesOnTarget >= writesBeforeRestart + 30, 'the guest wrote on after the restart');
  });
});
