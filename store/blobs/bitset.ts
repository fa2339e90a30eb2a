/** A fixed-size set of small integers, one bit each. */
export class Bitset {
  readonly bytes: Uint8Array;

  constructor(
    readonly size: number,
    bytes?: Uint8Array,
  ) {
    this.bytes = bytes ?? new Uint8Array(Math.ceil(size / 8));
  }

  has(i: number): boolean {
    return (this.bytes[i >> 3] & (1 << (i & 7))) !== 0;
  }

  add(i: number): void {
    this.bytes[i >> 3] |= 1 << (i & 7);
  }

  remove(i: number): void {
    this.bytes[i >> 3] &= ~(1 << (i & 7));
  }

  count(): number {
    let n = 0;
    for (const byte of this.bytes) {
      let b = byte;
      while (b) {
        b &= b - 1;
        n++;
      }
    }
    return n;
  }

  *members(): Generator<number> {
    for (let at = 0; at < this.bytes.length; at++) {
      if (this.bytes[at] === 0) continue;
      for (let bit = 0; bit < 8; bit++) if (this.bytes[at] & (1 << bit)) yield at * 8 + bit;
    }
  }
}
