import { NbdExport } from '../nbd/export';

/** A change a backend acknowledged, kept until a flush makes it durable. */
type Change =
  | { kind: 'write'; offset: number; data: Buffer }
  | { kind: 'trim'; offset: number; length: number }
  | { kind: 'zero'; offset: number; length: number; noHole: boolean };

/** Past this many bytes of kept writes, a write waits for a flush before it is acknowledged. */
export const maxUnflushedBytes = 64 * 1024 * 1024;

/**
 * The changes a backend acknowledged since the last flush that covered them. NBD lets
 * a server that dies lose what it acknowledged and never flushed; a client's next
 * FLUSH must then not succeed as if nothing happened. A route that moves to another
 * backend (the owner died, was paused past its lease, or handed the volume over)
 * replays these on the new one, in the order they were acknowledged, before any other
 * request: so every write acknowledged to the client is either durable or on the
 * backend that now serves it. Replaying is safe because each change is idempotent
 * and, while the route moves, nothing else is sent.
 */
export class UnflushedWrites {
  private changes: Array<{ serial: number; change: Change }> = [];
  private next = 1;
  private heldBytes = 0;

  /** The serial of the next change: a flush sent now covers every change below it. */
  get mark(): number {
    return this.next;
  }

  get bytes(): number {
    return this.heldBytes;
  }

  get count(): number {
    return this.changes.length;
  }

  /** A write acknowledged by the backend; the data is copied (the caller's buffer is reused). */
  wrote(offset: number, data: Buffer): void {
    this.keep({ kind: 'write', offset, data: Buffer.from(data) });
    this.heldBytes += data.length;
  }

  trimmed(offset: number, length: number): void {
    this.keep({ kind: 'trim', offset, length });
  }

  zeroed(offset: number, length: number, noHole: boolean): void {
    this.keep({ kind: 'zero', offset, length, noHole });
  }

  /** A flush sent when the mark was `mark` succeeded: what came before it is durable. */
  flushed(mark: number): void {
    // Serials grow in the order changes were acknowledged: the covered ones are a prefix.
    let covered = 0;
    for (; covered < this.changes.length && this.changes[covered].serial < mark; covered++) {
      const { change } = this.changes[covered];
      if (change.kind === 'write') this.heldBytes -= change.data.length;
    }
    this.changes.splice(0, covered);
  }

  /** Sends every kept change to a backend, in order; they stay kept until a flush there covers them. */
  async replay(backend: NbdExport): Promise<void> {
    for (const { change } of [...this.changes]) {
      if (change.kind === 'write') await backend.write(change.offset, change.data, false);
      else if (change.kind === 'trim') await backend.trim(change.offset, change.length);
      else await backend.zero(change.offset, change.length, { noHole: change.noHole, fua: false, fast: false });
    }
  }

  private keep(change: Change): void {
    this.changes.push({ serial: this.next++, change });
  }
}
