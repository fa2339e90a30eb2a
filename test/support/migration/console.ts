/**
 * A VM's serial console as the harness received it: chunks, each with the host's
 * monotonic time (performance.now(), ms) at which it arrived on QEMU's stdout.
 *
 * Timing is taken by the host, not the guest: a write's time is when its
 * "arbor-write" line reached the harness. The guest's own clock is no help across a
 * migration, and a line leaves the guest within microseconds of the write completing
 * (the serial port is emulated in the same QEMU), so the host's times measure the
 * guest's stalls to within the harness's event-loop latency.
 */
import { performance } from 'node:perf_hooks';
import { maxConsoleBytes } from './limits';
import { writeFailedLinePattern, writeLinePattern } from './stamp';

export interface ConsoleChunk {
  atMs: number;
  text: string;
}

/** A write the guest reported completed, and when its line arrived. */
export interface GuestWrite {
  seq: number;
  block: number;
  atMs: number;
}

export class ConsoleLog {
  readonly chunks: ConsoleChunk[] = [];
  /** Writes reported on this console alone (a line cut by a migration is in neither half: see `completedWrites`). */
  readonly writes: GuestWrite[] = [];
  /** "arbor-write-failed" lines: the guest's dd failed. */
  readonly failures: string[] = [];
  private bytes = 0;
  private partial = '';

  /** Takes what QEMU printed; false once more than `maxConsoleBytes` arrived (the rest is dropped). */
  push(data: Buffer | string, atMs = performance.now()): boolean {
    // latin1: a chunk may end inside a multi-byte character, and the lines read here are ASCII.
    const text = typeof data === 'string' ? data : data.toString('latin1');
    if (this.bytes + text.length > maxConsoleBytes) return false;
    this.bytes += text.length;
    this.chunks.push({ atMs, text });
    this.partial += text;
    const lines = this.partial.split('\n');
    this.partial = lines.pop()!;
    for (const line of lines) {
      const write = parseWrite(line, atMs);
      if (write) this.writes.push(write);
      else if (writeFailedLinePattern.test(line.trim())) this.failures.push(line.trim());
    }
    return true;
  }

  text(): string {
    return this.chunks.map((chunk) => chunk.text).join('');
  }

  tail(lines = 30): string {
    const text = this.text()
      .slice(-16 * 1024)
      .trimEnd();
    return text === '' ? '(nothing)' : text.split('\n').slice(-lines).join('\n');
  }
}

function parseWrite(line: string, atMs: number): GuestWrite | undefined {
  const match = writeLinePattern.exec(line.replace(/\r$/, ''));
  return match ? { seq: Number(match[1]), block: Number(match[2]), atMs } : undefined;
}

/**
 * The writes one guest reported across the VMs it ran in, in migration order (source
 * first). The consoles are read as one stream, since the serial port's state moves
 * with the guest: a line the source began and the target finished counts once, at
 * the time its end arrived.
 */
export function completedWrites(consoles: readonly ConsoleLog[]): GuestWrite[] {
  const writes: GuestWrite[] = [];
  let partial = '';
  for (const chunk of consoles.flatMap((console) => console.chunks)) {
    const lines = (partial + chunk.text).split('\n');
    partial = lines.pop()!;
    for (const line of lines) {
      const write = parseWrite(line, chunk.atMs);
      if (write) writes.push(write);
    }
  }
  return writes;
}
