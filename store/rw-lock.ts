/**
 * A readers-writer lock, fair in arrival order, with a synchronous fast path: when
 * nobody holds or waits for it, taking it costs no promise and no event-loop turn.
 */
export class RwLock {
  private readers = 0;
  private writer = false;
  private readonly waiting: Array<{ exclusive: boolean; grant: () => void }> = [];

  tryShared(): boolean {
    if (this.writer || this.waiting.length > 0) return false;
    this.readers++;
    return true;
  }

  shared(): Promise<void> | void {
    if (this.tryShared()) return;
    return new Promise((grant) => this.waiting.push({ exclusive: false, grant }));
  }

  releaseShared(): void {
    this.readers--;
    this.pump();
  }

  tryExclusive(): boolean {
    if (this.writer || this.readers > 0 || this.waiting.length > 0) return false;
    this.writer = true;
    return true;
  }

  exclusive(): Promise<void> | void {
    if (this.tryExclusive()) return;
    return new Promise((grant) => this.waiting.push({ exclusive: true, grant }));
  }

  releaseExclusive(): void {
    this.writer = false;
    this.pump();
  }

  get idle(): boolean {
    return !this.writer && this.readers === 0 && this.waiting.length === 0;
  }

  private pump(): void {
    while (this.waiting.length > 0 && !this.writer) {
      const next = this.waiting[0];
      if (next.exclusive) {
        if (this.readers > 0) return;
        this.writer = true;
      } else {
        this.readers++;
      }
      this.waiting.shift();
      next.grant();
    }
  }
}
