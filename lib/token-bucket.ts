/**
 * A token bucket that may go into debt: it fills at `ratePerSecond` up to
 * `capacity`; a take is allowed once the bucket holds what it costs or is full (so a
 * cost larger than the bucket still passes), and may leave it below zero: what comes
 * after waits until the debt is paid. Time comes from the caller (milliseconds), so
 * tests need no clock.
 */
export class TokenBucket {
  private tokens: number;
  private at: number;

  constructor(
    private ratePerSecond: number,
    private capacity: number,
    nowMs: number,
  ) {
    if (!(ratePerSecond > 0 && capacity > 0)) throw new Error(`a token bucket needs a positive rate and capacity (got ${ratePerSecond}, ${capacity})`);
    this.tokens = capacity;
    this.at = nowMs;
  }

  /** Changes rate and capacity from now on; what the bucket holds (or owes) is kept, up to the new capacity. */
  reshape(ratePerSecond: number, capacity: number, nowMs: number): void {
    if (!(ratePerSecond > 0 && capacity > 0)) throw new Error(`a token bucket needs a positive rate and capacity (got ${ratePerSecond}, ${capacity})`);
    this.refill(nowMs);
    this.ratePerSecond = ratePerSecond;
    this.capacity = capacity;
    this.tokens = Math.min(this.tokens, capacity);
  }

  /** Milliseconds until a take of `cost` is allowed (0: now). */
  waitMs(cost: number, nowMs: number): number {
    this.refill(nowMs);
    const needed = Math.min(cost, this.capacity);
    return this.tokens >= needed ? 0 : ((needed - this.tokens) * 1000) / this.ratePerSecond;
  }

  /** Takes `cost` (the caller checked waitMs was 0); the bucket may go below zero. */
  take(cost: number): void {
    this.tokens -= cost;
  }

  private refill(nowMs: number): void {
    if (nowMs > this.at) {
      this.tokens = Math.min(this.capacity, this.tokens + ((nowMs - this.at) * this.ratePerSecond) / 1000);
      this.at = nowMs;
    }
  }
}
