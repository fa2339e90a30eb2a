/**
 * What the guest writes and prints, in one place: the guest's writer (guest.ts) makes
 * these, the console reader (console.ts) and the verifier (verify.ts) read them back.
 *
 *   block `seq % blocks` of /dev/vda  <- "arbor-stamp <run> <seq> <block>\n", then zeros to 4 KiB
 *   the serial console, once written  <- "arbor-write <seq> <block>"
 *
 * `run` is a fresh word per boot (on the kernel command line), so a block left by an
 * earlier guest on the same volume is never taken for this one's.
 */

export const blockBytes = 4096;

/** Printed by the guest after a write and its fsync completed. */
export const writeLinePattern = /^arbor-write (\d+) (\d+)$/;
/** Printed by the guest when dd failed; the writer then stops. */
export const writeFailedLinePattern = /^arbor-write-failed (\d+) (\d+) (\d+)$/;
/** Lines /init prints about itself (and about what went wrong). */
export const guestMarker = 'arbor-guest:';

const runPattern = /^[0-9a-z]{1,16}$/;

export interface Stamp {
  run: string;
  seq: number;
  block: number;
}

export function assertRun(run: string): void {
  if (!runPattern.test(run))
    throw new Error(`run id ${JSON.stringify(run)} must be 1 to 16 of [0-9a-z]: it goes on the kernel command line and into each block`);
}

export function stampText(stamp: Stamp): string {
  return `arbor-stamp ${stamp.run} ${stamp.seq} ${stamp.block}\n`;
}

/** The whole block the guest writes for `stamp`. */
export function stampBlock(stamp: Stamp): Buffer {
  const block = Buffer.alloc(blockBytes);
  block.write(stampText(stamp), 'ascii');
  return block;
}

/**
 * The stamp a block holds; `'zero'` for a block never written; undefined for
 * anything else, including a stamp followed by bytes the guest never writes.
 */
export function readStamp(block: Buffer): Stamp | 'zero' | undefined {
  if (block.length !== blockBytes) return undefined;
  const newline = block.indexOf(0x0a);
  if (newline < 0) return block.every((byte) => byte === 0) ? 'zero' : undefined;
  const match = /^arbor-stamp (\S+) (\d+) (\d+)$/.exec(block.subarray(0, newline).toString('latin1'));
  if (!match) return undefined;
  const stamp = { run: match[1], seq: Number(match[2]), block: Number(match[3]) };
  return stampBlock(stamp).equals(block) ? stamp : undefined;
}
