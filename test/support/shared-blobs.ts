import { BlobStore } from '../../store/blobs/blobs';
import { FileBlobStore } from '../../store/blobs/files';

/**
 * One blob store several stores in a test use, as nodes share a bucket: files that
 * behave as an immutable object store. Each store closes it; the test closes the
 * files once, after all of them.
 */
export class SharedBlobs implements BlobStore {
  readonly rewritable = false;

  constructor(protected readonly inner: FileBlobStore) {}

  read(id: number, offset: number, target: Buffer, targetOffset: number, length: number): Promise<void> {
    return this.inner.read(id, offset, target, targetOffset, length);
  }
  write(id: number, offset: number, source: Buffer, sourceOffset: number, length: number): Promise<void> {
    return this.inner.write(id, offset, source, sourceOffset, length);
  }
  sync(ids: Iterable<number>): Promise<void> {
    return this.inner.sync(ids);
  }
  delete(ids: Iterable<number>): Promise<void> {
    return this.inner.delete(ids);
  }
  list(): Promise<number[]> {
    return this.inner.list();
  }
  usage(): Promise<{ blobs: number; bytes: number }> {
    return this.inner.usage();
  }
  availableBytes(): Promise<number | undefined> {
    return this.inner.availableBytes();
  }
  async close(): Promise<void> {}
}
