import { Catalog, KvEntry, Lease, Op, absent, del, put, unchanged } from './catalog/catalog';
import { count, decode, shape, string } from './decode';
import { ArborError } from './errors';
import { blobId, classOf, maxSerial, serialOf, sizeClassCount } from './blob-id';
import { blobIdBatchSize } from './limits';

export const nextSerialKeyPrefix = 'meta/next-blob-serial/';

/**
 * Where processes share the catalog, each reserved batch is also recorded here,
 * attached to its process's lease, until every id of it is either in a committed
 * tree or freed: the collector never sweeps an id of a batch it finds here.
 */
export const batchKeyPrefix = 'meta/batches/';
const batchKey = (sizeClass: number, start: number) => `${batchKeyPrefix}${sizeClass}/${start}`;

export function nextSerialKey(sizeClass: number): string {
  return `${nextSerialKeyPrefix}${sizeClass}`;
}

/** The committed next serial of every size class, as the catalog holds them. */
/** The next serial of a size class that no process has handed out (meta/next-blob-serial/<class>). */
const decodeMark = (entry: KvEntry): number => decode(entry, 'a blob serial mark', count);
const batchShape = shape<{ limit: number; lease: string }>({ limit: count, lease: string });

export async function committedMarks(catalog: Catalog): Promise<number[]> {
  const marks = new Array<number>(sizeClassCount).fill(0);
  for (const entry of await catalog.list(nextSerialKeyPrefix)) marks[Number(entry.key.slice(nextSerialKeyPrefix.length))] = decodeMark(entry);
  return marks;
}

interface ClassState {
  next: number;
  limit: number;
  reserving?: Promise<void>;
  /** The recorded batch being handed out (where batches are recorded). */
  batch?: string;
}

/** A recorded batch that has handed out every id, and when. */
interface SpentBatch {
  key: string;
  spentAt: number;
}

/**
 * Hands out blob ids, each exactly once for the life of the store. Each size class
 * has its own serial counter, reserved from the catalog a batch at a time; the
 * reservation commits before any serial of the batch is used, so after a crash no
 * id can be handed out twice: the unused rest of a batch is simply skipped. Serial 0
 * of class 0 is id 0, which means "no blob", and is never handed out.
 */
export class BlobIdAllocator {
  private readonly classes: ClassState[] = Array.from({ length: sizeClassCount }, () => ({ next: 0, limit: 0 }));
  private spent: SpentBatch[] = [];

  /** `recordBatches`: the lease to attach batch records to, where the catalog is shared. */
  constructor(
    private readonly catalog: Catalog,
    private readonly recordBatches?: () => Promise<Lease>,
  ) {}

  async allocate(sizeClass: number): Promise<number> {
    const state = this.classes[sizeClass];
    while (state.next >= state.limit) await this.reserve(sizeClass);
    return this.take(sizeClass, state);
  }

  /** An id at once when the class's reserved batch has one left; undefined when a batch must be reserved first. */
  allocateNow(sizeClass: number): number | undefined {
    const state = this.classes[sizeClass];
    return state.next < state.limit ? this.take(sizeClass, state) : undefined;
  }

  private take(sizeClass: number, state: ClassState): number {
    const id = blobId(sizeClass, state.next++);
    if (state.next >= state.limit && state.batch) {
      this.spent.push({ key: state.batch, spentAt: Date.now() });
      state.batch = undefined;
    }
    return id;
  }

  /**
   * Forgets the records of spent batches that `settled` says are safe: every id they
   * handed out has since been committed into a tree or freed (the store knows: every
   * volume it has open committed a capture taken after the batch was spent).
   */
  async forgetSettledBatches(settled: (spentAt: number) => boolean): Promise<void> {
    const done = this.spent.filter((b) => settled(b.spentAt));
    if (done.length === 0) return;
    this.spent = this.spent.filter((b) => !done.includes(b));
    const ops: Op[] = done.map((b) => del(b.key));
    await this.catalog.txn([], ops).catch(() => (this.spent.push(...done), undefined));
  }

  /**
   * The lease the batches were recorded on has ended: their records are gone, so the
   * collector no longer leaves their ids alone. Hand out nothing more from them; the
   * next ids come from batches recorded on the new lease.
   */
  abandonBatches(): void {
    for (const state of this.classes) {
      state.next = state.limit;
      state.batch = undefined;
    }
    this.spent = [];
  }

  /** Every id inside a batch some process has recorded and not forgotten (the collector leaves them alone). */
  static async recordedBatches(catalog: Catalog, exceptLease?: string): Promise<(id: number) => boolean> {
    const ranges = (await catalog.list(batchKeyPrefix)).flatMap((entry) => {
      const record = decode(entry, 'a recorded id batch', batchShape);
      // The collector's own batches are covered by its own watermark.
      if (record.lease === exceptLease) return [];
      const [sizeClass, start] = entry.key.slice(batchKeyPrefix.length).split('/').map(Number);
      return [{ sizeClass, start, limit: record.limit }];
    });
    return (id) => ranges.some((r) => r.sizeClass === classOf(id) && serialOf(id) >= r.start && serialOf(id) < r.limit);
  }

  /**
   * A test that tells, for any id, whether it was handed out after this call. Every
   * id handed out before it answers false. The collector never frees an id that
   * was handed out after its pass began.
   */
  async watermark(): Promise<(id: number) => boolean> {
    const marks: number[] = [];
    for (let c = 0; c < sizeClassCount; c++) {
      const state = this.classes[c];
      // A class that never allocated here has handed out nothing at or above its committed mark.
      marks.push(state.limit === 0 ? await this.committedNext(c) : state.next);
    }
    return (id) => serialOf(id) >= marks[classOf(id)];
  }

  /**
   * Gives back the unused rest of each batch on a clean shutdown, so that the next
   * process continues where this one stopped instead of skipping serials (which the
   * file backend would count as possibly written until a collector pass).
   */
  async release(): Promise<void> {
    for (let c = 0; c < sizeClassCount; c++) {
      const state = this.classes[c];
      if (state.reserving) await state.reserving;
      if (state.next >= state.limit) continue;
      const current = await this.catalog.get(nextSerialKey(c));
      if (!current || decodeMark(current) !== state.limit) continue;
      if ((await this.catalog.txn([unchanged(current)], [put(nextSerialKey(c), state.next)])).succeeded) state.limit = state.next;
    }
  }

  private async committedNext(sizeClass: number): Promise<number> {
    const entry = await this.catalog.get(nextSerialKey(sizeClass));
    return entry ? decodeMark(entry) : 0;
  }

  private reserve(sizeClass: number): Promise<void> {
    const state = this.classes[sizeClass];
    state.reserving ??= this.reserveBatch(sizeClass).finally(() => (state.reserving = undefined));
    return state.reserving;
  }

  private async reserveBatch(sizeClass: number): Promise<void> {
    const key = nextSerialKey(sizeClass);
    for (;;) {
      const current = await this.catalog.get(key);
      const start = Math.max(current ? decodeMark(current) : 0, blobId(sizeClass, 0) === 0 ? 1 : 0);
      const limit = start + blobIdBatchSize;
      if (limit > maxSerial) throw new ArborError('resource-exhausted', 'the store has used every blob id of this size it can address');
      const lease = this.recordBatches ? await this.recordBatches() : undefined;
      const record = lease ? [put(batchKey(sizeClass, start), { limit, lease: lease.id }, lease)] : [];
      const result = await this.catalog.txn([current ? unchanged(current) : absent(key)], [put(key, limit), ...record]);
      if (result.succeeded) {
        const state = this.classes[sizeClass];
        state.next = start;
        state.limit = limit;
        state.batch = lease ? batchKey(sizeClass, start) : undefined;
        return;
      }
    }
  }
}
