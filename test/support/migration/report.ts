/**
 * One line about a migration run, for a test's or a benchmark's output: the host's
 * and QEMU's times, the guest's longest write stall and where it fell, and the writes
 * on each side.
 */
import { MigrationRun } from './migrate';

export function formatMs(value: number | undefined): string {
  return value === undefined ? 'n/a' : `${value.toFixed(0)} ms`;
}

export function describeRun(what: string, run: MigrationRun): string {
  const { before, after } = run.stallBetween;
  return (
    `${what}: ${run.status}, total ${formatMs(run.totalMs)} (QEMU: total ${formatMs(run.qemu.totalTimeMs)}, downtime ${formatMs(run.qemu.downtimeMs)}; ` +
    `source paused to target resumed ${formatMs(run.vmPausedMs)}); longest write stall ${formatMs(run.longestStallMs)}, ` +
    `between writes ${before.seq} and ${after.seq} (typical gap ${formatMs(run.typicalGapMs)}); guest boot ${formatMs(run.bootMs)}; ` +
    `writes: ${run.writesOnSource} on the source (last ${run.lastSourceSeq}), ${run.writesOnTarget} on the target (first ${run.firstTargetSeq})`
  );
}
