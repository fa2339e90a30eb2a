import { classOf, serialOf } from './blob-id';

/** Serials per page of bits: 4 KiB of bits each. */
const pageSerials = 32768;

/**
 * A set of blob ids kept as bits, a page per 32768 serials of a class, with the ids
 * in the order first added beside them. The write path adds the blob it wrote on
 * every write: a `Set<number>` of ids above 2^31 (every extent's: class × 2^41 +
 * serial) hashes a heap number and chases it through the heap, and in a server
 * busy copying pages that lookup missed the cache (6% of the server's samples in
 * 4 KiB random writes); a bit in a page found by a small map does not.
 */
export class BlobIdSet implements Iterable<number> {
  private readonly pages = new Map<number, Int32Array>();
  /** Every id added since the last clear, each once while present; may also hold ids deleted since (`stale`). */
  private order: number[] = [];
  private stale = false;
  private count = 0;

  get size(): number {
    return this.count;
  }

  has(id: number): boolean {
    const page = this.pages.get(pageKey(id));
    if (page === undefined) return false;
    const bit = serialOf(id) % pageSerials;
    return (page[bit >>> 5] & (1 << (bit & 31))) !== 0;
  }

  add(id: number): this {
    const key = pageKey(id);
    let page = this.pages.get(key);
    if (page === undefined) this.pages.set(key, (page = new Int32Array(pageSerials / 32)));
    const bit = serialOf(id) % pageSerials;
    const word = bit >>> 5;
    const mask = 1 << (bit & 31);
    if ((page[word] & mask) !== 0) return this;
    page[word] |= mask;
    this.order.push(id);
    this.count++;
    return this;
  }

  delete(id: number): boolean {
    const page = this.pages.get(pageKey(id));
    if (page === undefined) return false;
    const bit = serialOf(id) % pageSerials;
    const word = bit >>> 5;
    const mask = 1 << (bit & 31);
    if ((page[word] & mask) === 0) return false;
    page[word] &= ~mask;
    this.count--;
    this.stale = true;
    return true;
  }

  clear(): void {
    this.pages.clear();
    this.order = [];
    this.stale = false;
    this.count = 0;
  }

  /** The ids present, in the order they were first added since they were last absent. */
  [Symbol.iterator](): Iterator<number> {
    if (this.stale) this.compact();
    return this.order[Symbol.iterator]();
  }

  /** Drops ids deleted since they were listed, and the first listing of one deleted and added again. */
  private compact(): void {
    const kept: number[] = [];
    const seen = new Set<number>();
    for (let i = this.order.length - 1; i >= 0; i--) {
      const id = this.order[i];
      if (this.has(id) && !seen.has(id)) {
        seen.add(id);
        kept.push(id);
      }
    }
    this.order = kept.reverse();
    this.stale = false;
  }
}

function pageKey(id: number): number {
  return classOf(id) * 2 ** 27 + Math.floor(serialOf(id) / pageSerials);
}
