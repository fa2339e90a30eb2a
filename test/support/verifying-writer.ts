import assert from 'node:assert/strict';
import { NbdClient } from '../../node-plugin/nbd/client';
import { Random } from './random';

const MiB = 1024 * 1024;
const blockBytes = 4096;

/**
 * A client that keeps writing random 4 KiB blocks (a few in flight, a FLUSH now and
 * then) and remembers what it wrote: what a VM's disk does while it is moved.
 */
export class Writer {
  readonly written = new Map<number, Buffer>();
  maxLatencyMs = 0;
  writes = 0;
  failure?: Error;
  private stopped = false;
  private done?: Promise<void>;

  constructor(
    private readonly client: NbdClient,
    private readonly rng: Random,
    private readonly volumeBytes: number,
  ) {}

  start(): void {
    this.done = Promise.all([0, 1, 2, 3].map(() => this.loop())).then(() => undefined);
  }

  async stop(): Promise<void> {
    await this.halt();
    if (this.failure) throw this.failure;
  }

  /** Stops writing (after a failed check: the connection must not outlive the test). */
  async halt(): Promise<void> {
    this.stopped = true;
    await this.done;
  }

  private async loop(): Promise<void> {
    while (!this.stopped && !this.failure) {
      const block = this.rng.int(0, this.volumeBytes / blockBytes - 1);
      const data = this.rng.bytes(blockBytes);
      const started = Date.now();
      try {
        // Two writers never write one block at once: NBD gives overlapping writes in flight no order.
        if (this.inFlight.has(block)) continue;
        this.inFlight.add(block);
        await this.client.write(block * blockBytes, data);
        this.written.set(block, data);
        this.inFlight.delete(block);
        if (++this.writes % 200 === 0) await this.client.flush();
      } catch (err) {
        this.failure = err as Error;
      }
      this.maxLatencyMs = Math.max(this.maxLatencyMs, Date.now() - started);
      await new Promise((resolve) => setTimeout(resolve, 2));
    }
  }

  private readonly inFlight = new Set<number>();

  /** Every block read back through `client` is what was last written there (zeros where nothing was). */
  async verify(client: NbdClient, what: string): Promise<void> {
    for (let at = 0; at < this.volumeBytes; at += 4 * MiB) {
      const data = await client.read(at, 4 * MiB);
      for (let offset = 0; offset < data.length; offset += blockBytes) {
        const expected = this.written.get((at + offset) / blockBytes) ?? Buffer.alloc(blockBytes);
        if (!data.subarray(offset, offset + blockBytes).equals(expected)) assert.fail(`${what}: block at ${at + offset} differs from what was written`);
      }
    }
  }
}
