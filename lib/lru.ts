/**
 * A map that keeps what was used last: the one least-recently-used bookkeeping the
 * caches share (map nodes, open files, the blob cache's copies). A Map iterates in
 * insertion order, so using an entry moves it to the end and the oldest is first.
 *
 * Bounded by `capacity`, counted in entries, or in what `weigh` says each weighs
 * (bytes); `trim` takes the bound from the caller when it depends on more than this
 * map. What leaves by eviction goes through `evicted` (close the file, delete the
 * copy); what the caller deletes does not.
 */
export interface LruOptions<K, V> {
  capacity: number;
  weigh?: (value: V) => number;
  evicted?: (key: K, value: V) => void;
}

export class Lru<K, V> {
  private readonly entries = new Map<K, V>();
  private weight = 0;

  constructor(private readonly options: LruOptions<K, V>) {}

  get size(): number {
    return this.entries.size;
  }

  /** The entries' weight (their count without `weigh`). */
  get totalWeight(): number {
    return this.weight;
  }

  /** The value, now the most recently used. */
  get(key: K): V | undefined {
    const value = this.entries.get(key);
    if (value !== undefined) {
      this.entries.delete(key);
      this.entries.set(key, value);
    }
    return value;
  }

  /** The value, leaving its place as it is. */
  peek(key: K): V | undefined {
    return this.entries.get(key);
  }

  has(key: K): boolean {
    return this.entries.has(key);
  }

  /** Stores the value as the most recently used, then evicts past the capacity. */
  set(key: K, value: V): V {
    this.delete(key);
    this.entries.set(key, value);
    this.weight += this.weighOf(value);
    this.trim();
    return value;
  }

  /** Forgets an entry without calling `evicted`. */
  delete(key: K): V | undefined {
    const value = this.entries.get(key);
    if (value === undefined) return undefined;
    this.entries.delete(key);
    this.weight -= this.weighOf(value);
    return value;
  }

  /** Evicts least recently used entries while `over` says there are too many (by default: past the capacity); returns how many. */
  trim(over: () => boolean = () => this.weight > this.options.capacity): number {
    let evicted = 0;
    while (this.entries.size > 0 && over()) {
      const [key, value] = this.entries.entries().next().value as [K, V];
      this.delete(key);
      this.options.evicted?.(key, value);
      evicted++;
    }
    return evicted;
  }

  /** Every entry, least recently used first. */
  values(): IterableIterator<V> {
    return this.entries.values();
  }

  /** Forgets every entry, calling `evicted` for each (closing every file). */
  clear(): void {
    for (const [key, value] of this.entries) this.options.evicted?.(key, value);
    this.entries.clear();
    this.weight = 0;
  }

  private weighOf(value: V): number {
    return this.options.weigh ? this.options.weigh(value) : 1;
  }
}
