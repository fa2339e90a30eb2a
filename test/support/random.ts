/** A small seeded generator (mulberry32): a failing seed replays exactly. */
const poolBytes = 4 * 1024 * 1024;

export class Random {
  private state: number;
  private pool?: Buffer;

  constructor(readonly seed: number) {
    this.state = seed >>> 0;
  }

  next(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }

  /** An integer in [min, max]. */
  int(min: number, max: number): number {
    return min + Math.floor(this.next() * (max - min + 1));
  }

  pick<T>(items: readonly T[]): T {
    return items[Math.floor(this.next() * items.length)];
  }

  chance(p: number): boolean {
    return this.next() < p;
  }

  /**
   * Random-looking bytes, cheaply: a slice of a 4 MiB pool filled once from the seed,
   * starting at a random place (so two writes almost never carry the same bytes).
   */
  bytes(length: number): Buffer {
    if (!this.pool) {
      this.pool = Buffer.allocUnsafe(poolBytes);
      for (let i = 0; i < poolBytes; i += 4) this.pool.writeUInt32LE((this.next() * 4294967296) >>> 0, i);
    }
    const out = Buffer.allocUnsafe(length);
    let start = this.int(0, poolBytes - 1);
    for (let done = 0; done < length;) {
      const n = Math.min(length - done, poolBytes - start);
      this.pool.copy(out, done, start, start + n);
      done += n;
      start = 0;
    }
    return out;
  }

  /** Picks a key by weight. */
  weighted<K extends string>(weights: Record<K, number>): K {
    const entries = Object.entries(weights) as Array<[K, number]>;
    let roll = this.next() * entries.reduce((sum, [, w]) => sum + w, 0);
    for (const [key, weight] of entries) {
      roll -= weight;
      if (roll < 0) return key;
    }
    return entries[entries.length - 1][0];
  }
}

export function seedFromEnv(name: string): number {
  const value = process.env[name];
  return value ? Number(value) : (Math.random() * 2 ** 31) >>> 0;
}
