/**
 * Requests gathered per key (a volume id) and run together: one batch per key at a
 * time; what arrives while it runs waits and forms the next. A batch holds requests
 * of distinct slots (a snapshot's name): a second request for a slot waits for the
 * next batch, where it finds what the first one made.
 */
export interface Waiting<R, T> {
  readonly request: R;
  resolve(value: T): void;
  reject(err: unknown): void;
}

export class Batches<R, T> {
  private readonly queues = new Map<string, Array<Waiting<R, T>>>();

  constructor(
    private readonly maxBatch: number,
    private readonly slot: (request: R) => string,
    /** Settles every request of the batch; an error it throws rejects those it left unsettled. */
    private readonly run: (key: string, batch: Array<Waiting<R, T>>) => Promise<void>,
  ) {}

  add(key: string, request: R): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const waiting = { request, resolve, reject };
      const queue = this.queues.get(key);
      if (queue) queue.push(waiting);
      else {
        this.queues.set(key, [waiting]);
        void this.drain(key);
      }
    });
  }

  private async drain(key: string): Promise<void> {
    const queue = this.queues.get(key)!;
    while (queue.length > 0) {
      // Let requests that arrived meanwhile (their bytes read, their handlers run up to
      // here) join: a synchronous commit holds the event loop, so they wait unread until now.
      await new Promise((resolve) => setImmediate(resolve));
      const batch = this.take(queue);
      try {
        await this.run(key, batch);
      } catch (err) {
        // A promise settles once: this reaches only the requests `run` did not answer.
        for (const waiting of batch) waiting.reject(err);
      }
    }
    this.queues.delete(key);
  }

  /** The oldest requests of distinct slots, up to maxBatch; the rest stay queued in order. */
  private take(queue: Array<Waiting<R, T>>): Array<Waiting<R, T>> {
    const slots = new Set<string>();
    const batch: Array<Waiting<R, T>> = [];
    for (let i = 0; i < queue.length && batch.length < this.maxBatch;) {
      const slot = this.slot(queue[i].request);
      if (slots.has(slot)) {
        i++;
        continue;
      }
      slots.add(slot);
      batch.push(...queue.splice(i, 1));
    }
    return batch;
  }
}
