/**
 * Live migration of the writing guest between two QEMUs, and what it cost the guest.
 *
 * `migrate` drives one migration over QMP; `longestStall` reads the guest's write
 * reports around it; `runMigration` does the whole thing on an NBD export (boot a
 * source, start a target, migrate or cancel, check the guest went on writing, check
 * the volume) for tests and benchmarks.
 */
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { daemonTempDir } from '../etcd';
import { completedWrites, GuestWrite } from './console';
import { prepareGuest } from './guest';
import { bootTimeoutMs, defaultBlocks, migrationTimeoutMs, pollEveryMs, quitTimeoutMs, writesTimeoutMs } from './limits';
import { MigrationInfo, queryDiskOperations, queryMigrate } from './qmp';
import { newestCompleted, sequenceProblems, verifyVolume, VolumeCheck } from './verify';
import { MigrationVm, NbdExport } from './vm';

export interface MigrateOptions {
  /** QEMU's max-bandwidth, bytes/s (QEMU's own default: 128 MiB/s). */
  maxBandwidthBytesPerSecond?: number;
  /** QEMU's downtime-limit, ms: the pause it aims for at the switchover (default 300). */
  downtimeLimitMs?: number;
  /** migrate_cancel this long after `migrate`, if it has not ended by then. */
  cancelAfterMs?: number;
  /** Runs once `migrate` was sent, beside the polling (what a test does to the storage during the migration); awaited before the outcome. */
  whileMigrating?: () => Promise<void>;
  timeoutMs?: number;
}

export interface MigrationOutcome {
  status: 'completed' | 'failed' | 'cancelled';
  /** performance.now() when `migrate` was sent. */
  startedAtMs: number;
  /** performance.now() when query-migrate first gave the final status (polled every `pollEveryMs`). */
  endedAtMs: number;
  /** endedAtMs - startedAtMs: the migration as the host saw it. */
  totalMs: number;
  /** performance.now() when migrate_cancel was answered, if it was sent. */
  cancelledAtMs?: number;
  /** query-migrate just before migrate_cancel: how far the migration had got. */
  qemuAtCancel?: MigrationInfo;
  /** The last query-migrate: QEMU's own total-time, downtime, setup-time, bytes. */
  qemu: MigrationInfo;
}

const finalStatuses = ['completed', 'failed', 'cancelled'];

/** Migrates `source` to `target` (started with an incoming socket) and waits for the end; does not throw for failed or cancelled. */
export async function migrate(source: MigrationVm, target: MigrationVm, options: MigrateOptions = {}): Promise<MigrationOutcome> {
  if (!target.incomingUri) throw new Error(`${target.name} was started without an incoming socket: it cannot be a migration's target`);
  const targetStatus = await target.status();
  if (targetStatus !== 'inmigrate') throw target.failure(`is ${targetStatus}, not waiting for a migration`);
  const parameters: Record<string, number> = {};
  if (options.maxBandwidthBytesPerSecond !== undefined) parameters['max-bandwidth'] = options.maxBandwidthBytesPerSecond;
  if (options.downtimeLimitMs !== undefined) parameters['downtime-limit'] = options.downtimeLimitMs;
  if (Object.keys(parameters).length > 0) await source.qmp.execute('migrate-set-parameters', parameters);

  const startedAtMs = performance.now();
  const deadline = startedAtMs + (options.timeoutMs ?? migrationTimeoutMs);
  await source.qmp.execute('migrate', { uri: target.incomingUri });
  const meanwhile = options.whileMigrating?.();
  // Awaited below; a failure meanwhile must not go unhandled while the loop polls.
  meanwhile?.catch(() => undefined);
  let cancelledAtMs: number | undefined;
  let qemuAtCancel: MigrationInfo | undefined;
  for (;;) {
    const qemu = await queryMigrate(source.qmp);
    const now = performance.now();
    if (finalStatuses.includes(qemu.status)) {
      const status = qemu.status as MigrationOutcome['status'];
      await meanwhile;
      return {
        status,
        startedAtMs,
        endedAtMs: now,
        totalMs: now - startedAtMs,
        cancelledAtMs,
        qemuAtCancel,
        qemu: status === 'completed' ? await completedInfo(source) : qemu,
      };
    }
    if (options.cancelAfterMs !== undefined && cancelledAtMs === undefined && now - startedAtMs >= options.cancelAfterMs) {
      qemuAtCancel = qemu;
      await source.qmp.execute('migrate_cancel');
      cancelledAtMs = performance.now();
    }
    if (now > deadline) {
      await source.qmp.execute('migrate_cancel').catch(() => undefined);
      throw source.failure(`has not migrated to ${target.name} within ${(deadline - startedAtMs) / 1000} s (${JSON.stringify(qemu)})`);
    }
    if (!target.running() && cancelledAtMs === undefined) throw target.failure(`ended during the migration (source: ${qemu.status})`);
    await sleep(pollEveryMs);
  }
}

/**
 * query-migrate once QEMU has filled in its figures: it says "completed" a moment
 * before it sets total-time and downtime (0 until then).
 */
async function completedInfo(source: MigrationVm): Promise<MigrationInfo> {
  for (let tries = 0; ; tries++) {
    const qemu = await queryMigrate(source.qmp);
    if ((qemu.totalTimeMs ?? 0) > 0 || tries >= 50) return qemu;
    await sleep(pollEveryMs);
  }
}

export interface StallReport {
  /** The longest time between consecutive completed writes, from the last before `fromMs` to the first after `toMs`. */
  longestStallMs: number;
  /** The writes either side of it. */
  before: GuestWrite;
  after: GuestWrite;
  /** The median time between writes before `fromMs`: the guest's pace when nothing happens. */
  typicalGapMs: number;
}

/**
 * The guest's longest wait for a write across a window (a migration): the times are
 * those at which the host received each "arbor-write" line (console.ts), so a stall
 * is measured from the last write reported before the window to the first after it.
 */
export function longestStall(writes: readonly GuestWrite[], fromMs: number, toMs: number): StallReport {
  const sorted = [...writes].sort((a, b) => a.atMs - b.atMs);
  const first = sorted.filter((write) => write.atMs <= fromMs).length - 1;
  const last = sorted.findIndex((write) => write.atMs >= toMs);
  if (first < 0) throw new Error('no write was reported before the window: the stall has no start');
  if (last < 0) throw new Error('no write was reported after the window: the guest has not resumed');
  let longest = { longestStallMs: -1, before: sorted[first], after: sorted[first] };
  for (let i = first + 1; i <= last; i++) {
    const gap = sorted[i].atMs - sorted[i - 1].atMs;
    if (gap > longest.longestStallMs) longest = { longestStallMs: gap, before: sorted[i - 1], after: sorted[i] };
  }
  const gaps = sorted
    .slice(0, first + 1)
    .map((write, i, list) => (i === 0 ? NaN : write.atMs - list[i - 1].atMs))
    .filter((gap) => !Number.isNaN(gap))
    .sort((a, b) => a - b);
  return { ...longest, typicalGapMs: gaps.length > 0 ? gaps[Math.floor(gaps.length / 2)] : NaN };
}

export interface RunMigrationOptions {
  /** The volume: both VMs open it through QEMU's NBD client (the server must allow two clients). */
  disk: NbdExport;
  /** The target's way to the same volume, when it is not `disk` (another node's socket); default `disk`. */
  targetDisk?: NbdExport;
  /** Blocks the guest cycles through; the export must hold blocks × 4 KiB. */
  blocks?: number;
  memoryMiB?: number;
  /** Completed writes on the source before migrating. */
  writesBeforeMigration?: number;
  /** Completed writes wanted after the migration: on the target, or on the source when it was cancelled. */
  writesAfterMigration?: number;
  migrate?: MigrateOptions;
  /**
   * Called once the guest completed `writesAfterMigration` writes after the migration,
   * with both VMs and the one the guest now runs in: what a test does to the running
   * guest's storage (restart a server) before both are stopped and the volume read.
   */
  afterMigration?: (vms: { source: MigrationVm; target: MigrationVm; running: MigrationVm }) => Promise<void>;
  /** Reads block `index` of the volume, called once both VMs are stopped; then the result holds `volume`. */
  readBlock?: (index: number) => Promise<Buffer>;
  /** Progress lines. */
  log?: (line: string) => void;
}

export interface MigrationRun {
  status: MigrationOutcome['status'];
  /** The run id stamped into every block. */
  run: string;
  /** From starting the source QEMU to the guest's first completed write. */
  bootMs: number;
  /** From sending `migrate` to query-migrate's final status, on the host's clock. */
  totalMs: number;
  /** The final query-migrate (QEMU's own total-time, downtime, bytes sent). */
  qemu: MigrationInfo;
  /** For a cancelled migration: how far it had got. */
  qemuAtCancel?: MigrationInfo;
  longestStallMs: number;
  /** The writes either side of the longest stall. */
  stallBetween: { before: GuestWrite; after: GuestWrite };
  typicalGapMs: number;
  /** From the source's STOP event to the target's RESUME event, as QMP reported them to the host (undefined: not both seen). */
  vmPausedMs?: number;
  writesOnSource: number;
  writesOnTarget: number;
  /** Write and flush requests each QEMU sent to the export (query-blockstats): the guest's O_DIRECT writes and fsyncs as they left QEMU. */
  diskOperations: { source: { writes: number; flushes: number }; target: { writes: number; flushes: number } };
  lastSourceSeq: number;
  /** The first write reported on the target's console (0: none). */
  firstTargetSeq: number;
  /** Every write the guest reported, source then target. */
  writes: GuestWrite[];
  /** Per block, the newest completed seq. */
  newest: number[];
  /** What is wrong: the reports' sequence, the guest's continuity across the migration, and the volume, if read. */
  problems: string[];
  volume?: VolumeCheck;
}

/**
 * Boots a source on `disk`, starts a target on `targetDisk` (the same volume, maybe
 * through another server; default the same export), lets the guest write,
 * migrates (or cancels the migration), waits for the guest to write on, stops both,
 * and reports. Throws when a VM fails or the guest stops writing; returns data
 * problems in `problems` for the caller to judge.
 */
export async function runMigration(options: RunMigrationOptions): Promise<MigrationRun> {
  const log = options.log ?? (() => undefined);
  const blocks = options.blocks ?? defaultBlocks;
  const writesBefore = options.writesBeforeMigration ?? 30;
  const writesAfter = options.writesAfterMigration ?? 30;
  const dir = daemonTempDir('arbor-migration-');
  const vms: MigrationVm[] = [];
  try {
    const guest = prepareGuest({ dir: dir.dir, blocks });
    const common = { guest, dir: dir.dir, memoryMiB: options.memoryMiB };
    const startedAt = performance.now();
    const source = await MigrationVm.start({ ...common, disk: options.disk, name: 'source' });
    vms.push(source);
    const targetDisk = options.targetDisk ?? options.disk;
    const target = await MigrationVm.start({ ...common, disk: targetDisk, name: 'target', incomingSocket: `${dir.dir}/incoming.sock` });
    vms.push(target);
    await source.waitForWrites(1, bootTimeoutMs);
    const bootMs = source.console.writes[0].atMs - startedAt;
    await source.waitForWrites(writesBefore, writesTimeoutMs);
    log(`the guest booted in ${(bootMs / 1000).toFixed(1)} s and completed ${source.console.writes.length} writes; migrating`);

    const outcome = await migrate(source, target, options.migrate);
    log(`migration ${outcome.status} after ${outcome.totalMs.toFixed(0)} ms (QEMU: ${JSON.stringify(outcome.qemu)})`);
    const cancelling = options.migrate?.cancelAfterMs !== undefined;
    if (outcome.status !== (cancelling ? 'cancelled' : 'completed')) {
      const expected = cancelling ? 'cancelled' : 'completed';
      throw new Error(
        `${source.failure(`migration ${outcome.status}, expected ${expected}: ${outcome.qemu.errorDesc ?? ''}`).message}\n${target.failure('was the target').message}`,
      );
    }
    const none = { writes: 0, flushes: 0 };
    let diskOperations = { source: none, target: none };
    if (outcome.status === 'completed') {
      await target.waitForWrites(writesAfter, writesTimeoutMs);
      diskOperations = { source: await queryDiskOperations(source.qmp), target: await queryDiskOperations(target.qmp) };
      const sourceStatus = await source.status();
      if (sourceStatus !== 'postmigrate') throw source.failure(`is ${sourceStatus} after its guest moved away`);
    } else {
      const sourceStatus = await source.status();
      if (sourceStatus !== 'running') throw source.failure(`is ${sourceStatus} after the migration was cancelled, not running`);
      const count = source.console.writes.length + writesAfter;
      await source.waitUntil(`reported ${writesAfter} writes after the cancelled migration`, writesTimeoutMs, () => source.console.writes.length >= count);
      diskOperations = { source: await queryDiskOperations(source.qmp), target: none };
      // A cancelled incoming migration ends the target QEMU ("load of migration failed"), which is not an error here.
      await Promise.race([target.exited, sleep(quitTimeoutMs)]);
      await target.kill();
    }
    await options.afterMigration?.({ source, target, running: outcome.status === 'completed' ? target : source });
    // Stopped before the volume is read: SIGKILL, so a write in flight lands or not, as in a crash.
    for (const vm of vms) await vm.kill();

    const writes = completedWrites([source.console, target.console]);
    const stall = longestStall(writes, outcome.startedAtMs, outcome.endedAtMs);
    const lastSourceSeq = Math.max(0, ...source.console.writes.map((write) => write.seq));
    const firstTargetSeq = target.console.writes[0]?.seq ?? 0;
    const stopped = source.qmp.events.find((event) => event.event === 'STOP' && event.atMs >= outcome.startedAtMs);
    const resumed = target.qmp.events.find((event) => event.event === 'RESUME');
    const problems = sequenceProblems(writes, blocks);
    if (firstTargetSeq !== 0 && firstTargetSeq <= lastSourceSeq) {
      problems.push(`the target's first write is ${firstTargetSeq}, not after the source's last (${lastSourceSeq}): the guest did not continue`);
    }
    const newest = newestCompleted(writes, blocks);
    let volume: VolumeCheck | undefined;
    if (options.readBlock) {
      volume = await verifyVolume({ run: guest.run, newest, readBlock: options.readBlock });
      problems.push(...volume.problems);
    }
    return {
      status: outcome.status,
      run: guest.run,
      bootMs,
      totalMs: outcome.totalMs,
      qemu: outcome.qemu,
      qemuAtCancel: outcome.qemuAtCancel,
      longestStallMs: stall.longestStallMs,
      stallBetween: { before: stall.before, after: stall.after },
      typicalGapMs: stall.typicalGapMs,
      vmPausedMs: stopped && resumed ? resumed.atMs - stopped.atMs : undefined,
      writesOnSource: source.console.writes.length,
      writesOnTarget: target.console.writes.length,
      diskOperations,
      lastSourceSeq,
      firstTargetSeq,
      writes,
      newest,
      problems,
      volume,
    };
  } finally {
    for (const vm of vms) await vm.kill();
    dir.cleanup();
  }
}
