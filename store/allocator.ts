import { Catalog, absent, put, unchanged } from './catalog/catalog';
import { ArborError } from './errors';
import { maxBlobId } from './entry';
import { blobIdBatchSize } from './limits';

export const nextBlobIdKey = 'meta/next-blob-id';

/**
 * Hands out blob ids, each exactly once for the life of the store. Ids are reserved
 * from the catalog a batch at a time, and the reservation commits before any id of
 * the batch is used, so after a crash no id can be handed out twice: the unused rest
 * of a batch is simply skipped. Id 0 means "no blob" and is never handed out.
 */
export class BlobIdAllocator {
  private next = 0;
  private limit = 0;
  private reserving?: Promise<void>;

  constructor(private readonly catalog: Catalog) {}

  async allocate(): Promise<number> {
    while (this.next >= this.limit) await this.reserve();
    return this.next++;
  }

  /**
   * Every id below the watermark was handed out before this call; every id handed
   * out after it is at or above it. The collector never frees an id at or above the
   * watermark it read when its pass began.
   */
  async watermark(): Promise<number> {
    if (this.next >= this.limit) await this.reserve();
    return this.next;
  }

  /**
   * Gives back the unused rest of the batch on a clean shutdown, so that the next
   * process continues where this one stopped instead of skipping ids (which the
   * file backend would have to treat as possibly written until a collector pass).
   */
  async release(): Promise<void> {
    if (this.reserving) await this.reserving;
    if (this.next >= this.limit) return;
    const current = await this.catalog.get(nextBlobIdKey);
    if (!current || (JSON.parse(current.value) as number) !== this.limit) return;
    const result = await this.catalog.txn([unchanged(current)], [put(nextBlobIdKey, this.next)]);
    if (result.succeeded) this.limit = this.next;
  }

  private reserve(): Promise<void> {
    this.reserving ??= this.reserveBatch().finally(() => (this.reserving = undefined));
    return this.reserving;
  }

  private async reserveBatch(): Promise<void> {
    for (;;) {
      const current = await this.catalog.get(nextBlobIdKey);
      const start = current ? (JSON.parse(current.value) as number) : 1;
      const limit = start + blobIdBatchSize;
      if (limit > maxBlobId) throw new ArborError('resource-exhausted', 'the store has used every blob id it can address');
      const result = await this.catalog.txn([current ? unchanged(current) : absent(nextBlobIdKey)], [put(nextBlobIdKey, limit)]);
      if (result.succeeded) {
        this.next = start;
        this.limit = limit;
        return;
      }
    }
  }
}
