/**
 * What the guest's reports promise about the volume, checked against its bytes.
 *
 * The guest prints "arbor-write" only after its write and fsync returned, so for every
 * block the newest reported seq is on the volume: the block holds that stamp, or a
 * later one the guest had in flight when its console was last read. An older stamp,
 * another block's, another run's or a torn one is data lost.
 */
import fs from 'node:fs/promises';
import { GuestWrite } from './console';
import { blockBytes, readStamp } from './stamp';

/**
 * How many writes past the newest reported one can be on the volume: the one in
 * flight, and the one before it, whose line was still in the guest's serial transmit
 * buffer (echo returns once its line is queued in the tty, not sent) when QEMU died.
 */
const maxUnreportedWrites = 2;

/** For each block, the newest seq the guest reported completed (0: none). */
export function newestCompleted(writes: readonly GuestWrite[], blocks: number): number[] {
  const newest = new Array<number>(blocks).fill(0);
  for (const write of writes) {
    if (write.block >= blocks) throw new Error(`the guest reported a write to block ${write.block}, beyond its ${blocks} blocks`);
    newest[write.block] = Math.max(newest[write.block], write.seq);
  }
  return newest;
}

/**
 * What is wrong with the sequence of reports itself: the writer is one loop, so the
 * seqs go 1, 2, 3, ... without gap or reordering (a line may repeat, if a migration
 * cut it), and seq n goes to block n % blocks.
 */
export function sequenceProblems(writes: readonly GuestWrite[], blocks: number): string[] {
  const problems: string[] = [];
  let expected = 1;
  for (const write of writes) {
    if (write.block !== write.seq % blocks) problems.push(`write ${write.seq} went to block ${write.block}, not ${write.seq % blocks}`);
    if (write.seq === expected - 1) continue;
    if (write.seq !== expected) problems.push(`write ${write.seq} was reported after write ${expected - 1}`);
    expected = write.seq + 1;
  }
  return problems.slice(0, 20);
}

export interface VolumeCheck {
  /** Blocks holding exactly their newest completed stamp. */
  exact: number;
  /** Blocks holding a later stamp than the newest reported (a write in flight when the log was cut). */
  newer: number;
  /** Blocks never reported written and still zero. */
  unwritten: number;
  problems: string[];
}

/** Reads every block and compares it with what the guest reported (`newestCompleted`). */
export async function verifyVolume(options: { run: string; newest: readonly number[]; readBlock: (index: number) => Promise<Buffer> }): Promise<VolumeCheck> {
  const { run, newest } = options;
  const blocks = newest.length;
  const highest = Math.max(0, ...newest);
  const check: VolumeCheck = { exact: 0, newer: 0, unwritten: 0, problems: [] };
  for (let index = 0; index < blocks; index++) {
    const stamp = readStamp(await options.readBlock(index));
    const expected = newest[index] === 0 ? 'nothing' : `stamp ${newest[index]}`;
    if (stamp === undefined) check.problems.push(`block ${index}: not a stamp nor zeros (expected ${expected})`);
    else if (stamp === 'zero') {
      if (newest[index] === 0) check.unwritten++;
      else check.problems.push(`block ${index}: zeros, but the guest completed write ${newest[index]} there`);
    } else if (stamp.run !== run) check.problems.push(`block ${index}: a stamp of run ${stamp.run}, not ${run} (expected ${expected})`);
    else if (stamp.block !== index || stamp.seq % blocks !== index)
      check.problems.push(`block ${index}: holds write ${stamp.seq}, meant for block ${stamp.block}`);
    else if (stamp.seq < newest[index])
      check.problems.push(`block ${index}: holds write ${stamp.seq}, older than write ${newest[index]} the guest completed there`);
    else if (stamp.seq === newest[index]) check.exact++;
    // A write in flight when the log was cut: one of the next few the guest began.
    else if (stamp.seq <= highest + maxUnreportedWrites) check.newer++;
    else check.problems.push(`block ${index}: holds write ${stamp.seq}, beyond any the guest can have begun (${highest + maxUnreportedWrites})`);
  }
  return check;
}

/** readBlock for a raw image file (the volume as a host file, read once its VMs are stopped). */
export function rawImageReader(imagePath: string): (index: number) => Promise<Buffer> {
  return async (index) => {
    const handle = await fs.open(imagePath, 'r');
    try {
      const block = Buffer.alloc(blockBytes);
      const { bytesRead } = await handle.read(block, 0, blockBytes, index * blockBytes);
      return bytesRead === blockBytes ? block : block.subarray(0, bytesRead);
    } finally {
      await handle.close();
    }
  };
}
