/**
 * Bytes received during the handshake, read back in exact amounts. A read waits
 * until enough bytes arrive; when the connection ends first it rejects.
 */
export class ByteQueue {
  private chunks: Buffer[] = [];
  private queued = 0;
  private waiter?: { length: number; resolve: (b: Buffer) => void; reject: (e: Error) => void };
  private ended?: Error;

  /** Takes a copy: the caller may reuse `chunk`. */
  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(Buffer.from(chunk));
    this.queued += chunk.length;
    this.wake();
  }

  end(reason: Error): void {
    this.ended ??= reason;
    this.wake();
  }

  read(length: number): Promise<Buffer> {
    if (this.waiter) throw new Error('one read at a time');
    if (this.queued >= length) return Promise.resolve(this.take(length));
    if (this.ended) return Promise.reject(this.ended);
    return new Promise((resolve, reject) => {
      this.waiter = { length, resolve, reject };
    });
  }

  /** Everything received and not read (handed to the transmission phase). */
  drain(): Buffer {
    const rest = Buffer.concat(this.chunks, this.queued);
    this.chunks = [];
    this.queued = 0;
    return rest;
  }

  private wake(): void {
    const waiter = this.waiter;
    if (!waiter) return;
    if (this.queued >= waiter.length) {
      this.waiter = undefined;
      waiter.resolve(this.take(waiter.length));
    } else if (this.ended) {
      this.waiter = undefined;
      waiter.reject(this.ended);
    }
  }

  private take(length: number): Buffer {
    const out = Buffer.allocUnsafe(length);
    let filled = 0;
    while (filled < length) {
      const head = this.chunks[0];
      const n = Math.min(head.length, length - filled);
      head.copy(out, filled, 0, n);
      filled += n;
      if (n === head.length) this.chunks.shift();
      else this.chunks[0] = head.subarray(n);
    }
    this.queued -= length;
    return out;
  }
}
