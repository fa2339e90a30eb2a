/**
 * The reference model of one volume's bytes: a plain map of 4 KiB pages, missing
 * pages reading as zeros, so a model of a huge sparse volume stays small.
 */
const pageSize = 4096;

export class SparseBytes {
  private pages = new Map<number, Buffer>();

  constructor(public size: number) {}

  clone(): SparseBytes {
    const copy = new SparseBytes(this.size);
    for (const [index, page] of this.pages) copy.pages.set(index, Buffer.from(page));
    return copy;
  }

  write(offset: number, data: Buffer): void {
    for (let done = 0; done < data.length;) {
      const at = offset + done;
      const index = Math.floor(at / pageSize);
      const inPage = at - index * pageSize;
      const n = Math.min(pageSize - inPage, data.length - done);
      let page = this.pages.get(index);
      if (!page) this.pages.set(index, (page = Buffer.alloc(pageSize)));
      data.copy(page, inPage, done, done + n);
      done += n;
    }
  }

  zero(offset: number, length: number): void {
    for (let done = 0; done < length;) {
      const at = offset + done;
      const index = Math.floor(at / pageSize);
      const inPage = at - index * pageSize;
      const n = Math.min(pageSize - inPage, length - done);
      const page = this.pages.get(index);
      if (page) {
        if (n === pageSize) this.pages.delete(index);
        else page.fill(0, inPage, inPage + n);
      }
      done += n;
    }
  }

  read(offset: number, length: number): Buffer {
    const out = Buffer.alloc(length);
    for (let done = 0; done < length;) {
      const at = offset + done;
      const index = Math.floor(at / pageSize);
      const inPage = at - index * pageSize;
      const n = Math.min(pageSize - inPage, length - done);
      this.pages.get(index)?.copy(out, done, inPage, inPage + n);
      done += n;
    }
    return out;
  }

  /** Offsets of pages holding a non-zero byte. */
  nonZeroPages(): number[] {
    const out: number[] = [];
    for (const [index, page] of this.pages) if (page.some((b) => b !== 0)) out.push(index * pageSize);
    return out.sort((a, b) => a - b);
  }
}
