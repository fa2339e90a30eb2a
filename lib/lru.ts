/**
 * A map that keeps what was used last: the one least-recently-used bookkeeping the
 * caches share (map nodes, open files, the blob cache's copies). A Map iterates in
 * insertion order, so using an entry moves it to the end and the oldest is first.
 *
 * Bounded by `capacity`, counted in entries, or in what `weigh` says each weighs
 * (bytes); `trim` takes the bound from the caller when it depends on more than this
 * map. What leaves by eviction goes through `evicted` (close the file, delete the
 * copy); what the caller deletes does not.
 *
 * A get moves an entry to the end only when it sits in the older half: moving it is a
 * Map delete and insert (and, in time, a rehash of the Map's table), and the caches
 * are read several times per NBD request, while an entry in the newer half is not
 * the next to go whether it moves or not.
 */
export interface LruOptions<K, V> {
  capacity: number;
  weigh?: (value: V) => number;
  evicted?: (key: K, value: V) => void;
}

interface Slot<V> {
  value: V;
  /** The `moves` count when the entry last went to the end: the entries newer than it are at most `moves` minus this. */
  movedAt: number;
}

export class Lru<K, V> {
  private readonly entries = new Map<K, Slot<V>>();
  private weight = 0;
  private moves = 0;

  constructor(private readonly options: LruOptions<K, V>) {}

  get size(): number {
    return this.entries.size;
  }

  /** The entries' weight (their count without `weigh`). */
  get totalWeight(): number {
    return this.weight;
  }

  /** The value, now among the more recently used half (moved to the end if it was not). */
  get(key: K): V | undefined {
    const slot = this.entries.get(key);
    if (slot === undefined) return undefined;
    if (this.moves - slot.movedAt > this.entries.size >> 1) {
      this.entries.delete(key);
      this.entries.set(key, slot);
      slot.movedAt = ++this.moves;
    }
    return slot.value;
  }

  /** The value, leaving its place as it is. */
  peek(key: K): V | undefined {
    return this.entries.get(key)?.value;
  }

  has(key: K): boolean {
    return this.entries.has(key);
  }

  /** Stores the value as the most recently used, then evicts past the capacity. */
  set(key: K, value: V): V {
    this.delete(key);
    this.entries.set(key, { value, movedAt: ++this.moves });
    this.weight += this.weighOf(value);
    this.trim();
    return value;
  }

  /** Forgets an entry without calling `evicted`. */
  delete(key: K): V | undefined {
    const slot = this.entries.get(key);
    if (slot === undefined) return undefined;
    this.entries.delete(key);
    this.weight -= this.weighOf(slot.value);
    return slot.value;
  }

  /** Evicts least recently used entries while `over` says there are too many (by default: past the capacity); returns how many. */
  trim(over: () => boolean = () => this.weight > this.options.capacity): number {
    let evicted = 0;
    while (this.entries.size > 0 && over()) {
      const [key, { value }] = this.entries.entries().next().value as [K, Slot<V>];
      this.delete(key);
      this.options.evicted?.(key, value);
      evicted++;
    }
    return evicted;
  }

  /** Every entry, least recently used first. */
  *values(): IterableIterator<V> {
    for (const slot of this.entries.values()) yield slot.value;
  }

  /** Forgets every entry, calling `evicted` for each (closing every file). */
  clear(): void {
    for (const [key, { value }] of this.entries) this.options.evicted?.(key, value);
    this.entries.clear();
    this.weight = 0;
  }

  private weighOf(value: V): number {
    return this.options.weigh ? this.options.weigh(value) : 1;
  }
}
