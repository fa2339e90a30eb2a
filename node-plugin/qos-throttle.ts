import { performance } from 'node:perf_hooks';
import { qosDelayedRequests, qosMaxBandwidth, qosMaxIops, qosWaitSeconds } from '../lib/metrics';
import { TokenBucket } from '../lib/token-bucket';
import { QosLimits, burstSecondsOf } from '../store/qos';

interface Waiter {
  bytes: number;
  since: number;
  go: () => void;
}

/**
 * A volume's QoS limits enforced on every request of every connection that serves
 * it here: one bucket of requests and one of bytes, and one queue in arrival order,
 * so connections share the limit fairly and no request overtakes an earlier one.
 * Requests wait; none is ever refused. A request larger than the bucket still goes
 * once the bucket is full, and the bucket's debt delays what follows.
 *
 * Unlimited (the usual case) costs one property read per request: `admit` returns
 * undefined and the request goes on synchronously. Limited, a request the buckets
 * let go at once still goes synchronously (`mayGoNow`, then `charge`): the promise
 * of the async path had cost 15% of the IOPS of a volume whose limit was never reached.
 */
export class QosThrottle {
  private ops?: TokenBucket;
  private bytes?: TokenBucket;
  private readonly queue: Waiter[] = [];
  private head = 0;
  private timer?: NodeJS.Timeout;
  private readonly waited;
  private readonly delayed;

  constructor(
    /** The volume's name: the metrics' label. */
    private readonly volume: string,
    private readonly now: () => number = () => performance.now(),
  ) {
    this.waited = qosWaitSeconds.labels(volume);
    this.delayed = qosDelayedRequests.labels(volume);
  }

  get limited(): boolean {
    return this.ops !== undefined || this.bytes !== undefined;
  }

  /** Requests waiting now. */
  get waiting(): number {
    return this.queue.length - this.head;
  }

  /** Undefined: go now. Otherwise resolves when the request (one op of `bytes` payload) may go. */
  admit(bytes: number): Promise<void> | undefined {
    if (!this.limited) return undefined;
    if (this.mayGoNow(bytes)) {
      this.take(bytes);
      return undefined;
    }
    const since = this.now();
    return new Promise<void>((go) => {
      this.queue.push({ bytes, since, go });
      if (this.waiting === 1) this.drain();
    });
  }

  /**
   * Whether a request of `bytes` may go at once, taking nothing yet: for a caller
   * that may still not go (it then takes the async path, through `admit`), and
   * charges with `charge` once it went. Synchronous, so nothing comes between.
   */
  mayGoNow(bytes: number): boolean {
    return !this.limited || (this.waiting === 0 && this.waitMs(bytes, this.now()) === 0);
  }

  /** A request `mayGoNow` let go went: it takes its tokens. */
  charge(bytes: number): void {
    if (this.limited) this.take(bytes);
  }

  /** New limits, at once: waiting requests are measured against them from now on. */
  setLimits(limits: QosLimits): void {
    const now = this.now();
    const burst = burstSecondsOf(limits);
    this.ops = reshaped(this.ops, limits.maxIops, burst, 1, now);
    // A bucket of bytes holds at least one 4 KiB block, whatever the rate.
    this.bytes = reshaped(this.bytes, limits.maxBandwidthBytes, burst, 4096, now);
    if (limits.maxIops === undefined) qosMaxIops.remove(this.volume);
    else qosMaxIops.labels(this.volume).set(limits.maxIops);
    if (limits.maxBandwidthBytes === undefined) qosMaxBandwidth.remove(this.volume);
    else qosMaxBandwidth.labels(this.volume).set(limits.maxBandwidthBytes);
    clearTimeout(this.timer);
    this.timer = undefined;
    this.drain();
  }

  /** No connection serves the volume any more: let anything still waiting go, drop its limit series. */
  close(): void {
    this.setLimits({});
  }

  private drain(): void {
    this.timer = undefined;
    const now = this.now();
    while (this.waiting > 0) {
      const first = this.queue[this.head];
      const wait = this.limited ? this.waitMs(first.bytes, now) : 0;
      if (wait > 0) {
        this.timer = setTimeout(() => this.drain(), Math.max(1, Math.ceil(wait)));
        return;
      }
      if (this.limited) this.take(first.bytes);
      this.queue[this.head++] = undefined as unknown as Waiter;
      if (this.head >= 1024) {
        this.queue.splice(0, this.head);
        this.head = 0;
      }
      this.delayed.inc();
      this.waited.inc((now - first.since) / 1000);
      first.go();
    }
    this.queue.length = 0;
    this.head = 0;
  }

  private waitMs(bytes: number, now: number): number {
    return Math.max(this.ops?.waitMs(1, now) ?? 0, bytes > 0 ? (this.bytes?.waitMs(bytes, now) ?? 0) : 0);
  }

  private take(bytes: number): void {
    this.ops?.take(1);
    if (bytes > 0) this.bytes?.take(bytes);
  }
}

function reshaped(bucket: TokenBucket | undefined, rate: number | undefined, burstSeconds: number, least: number, now: number): TokenBucket | undefined {
  if (rate === undefined) return undefined;
  const capacity = Math.max(least, rate * burstSeconds);
  if (!bucket) return new TokenBucket(rate, capacity, now);
  bucket.reshape(rate, capacity, now);
  return bucket;
}

/**
 * One throttle per volume served here, shared by its connections: made by the first,
 * following the volume's limits in the store (`follow`) until the last one closes.
 */
export class QosThrottles {
  private readonly entries = new Map<string, { throttle: QosThrottle; users: number; following: Promise<() => void> }>();

  constructor(private readonly follow: (volumeId: string, listener: (limits: QosLimits) => void) => Promise<() => void>) {}

  async acquire(volumeId: string, volumeName: string): Promise<QosThrottle> {
    let entry = this.entries.get(volumeId);
    if (!entry) {
      const throttle = new QosThrottle(volumeName);
      entry = { throttle, users: 0, following: this.follow(volumeId, (limits) => throttle.setLimits(limits)) };
      this.entries.set(volumeId, entry);
    }
    entry.users++;
    try {
      await entry.following;
    } catch (err) {
      this.release(volumeId);
      throw err;
    }
    return entry.throttle;
  }

  release(volumeId: string): void {
    const entry = this.entries.get(volumeId);
    if (!entry || --entry.users > 0) return;
    this.entries.delete(volumeId);
    entry.throttle.close();
    void entry.following.then((stop) => stop()).catch(() => {});
  }

  /** The throttle serving the volume here, if any connection serves it. */
  find(volumeId: string): QosThrottle | undefined {
    return this.entries.get(volumeId)?.throttle;
  }
}
