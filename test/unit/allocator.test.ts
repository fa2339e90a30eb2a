import assert from 'node:assert/strict';
import path from 'node:path';
import { BlobIdAllocator, committedMarks } from '../../store/allocator';
import { blobId, classOf, serialOf } from '../../store/blob-id';
import { SqliteCatalog } from '../../store/catalog/sqlite';
import { blobIdBatchSize } from '../../store/limits';
import { tempDir } from '../support/tmp';

describe('blob id allocation', () => {
  let dir: { dir: string; cleanup: () => void };
  beforeEach(() => (dir = tempDir()));
  afterEach(() => dir.cleanup());

  const openCatalog = () => SqliteCatalog.open(path.join(dir.dir, 'catalog.sqlite'), () => 'test');

  it('hands out each id once per size class, never id 0, and commits a batch before using it', async () => {
    const catalog = openCatalog();
    const ids = new BlobIdAllocator(catalog);
    const seen = new Set<number>();
    for (let i = 0; i < blobIdBatchSize * 2 + 5; i++) {
      for (const sizeClass of [0, 4, 10]) {
        const id = await ids.allocate(sizeClass);
        assert.ok(!seen.has(id));
        assert.equal(classOf(id), sizeClass);
        seen.add(id);
      }
    }
    assert.ok(!seen.has(0));
    assert.ok(seen.has(blobId(4, 0)) && seen.has(blobId(0, 1)), 'serials start at 0, except class 0 where 0 means no blob');
    const marks = await committedMarks(catalog);
    assert.ok(
      [...seen].every((id) => serialOf(id) < marks[classOf(id)]),
      "every id handed out is below its class's committed mark",
    );
    await catalog.close();
  });

  it('never hands out an id again after a restart, even one never used', async () => {
    let catalog = openCatalog();
    const first = await new BlobIdAllocator(catalog).allocate(0);
    await catalog.close();
    catalog = openCatalog();
    const second = await new BlobIdAllocator(catalog).allocate(0);
    assert.ok(second > first + blobIdBatchSize - 1, `${second} skips the unused rest of ${first}'s batch`);
    await catalog.close();
  });

  it('after a clean release the next process continues where this one stopped', async () => {
    let catalog = openCatalog();
    const ids = new BlobIdAllocator(catalog);
    const first = await ids.allocate(4);
    await ids.release();
    await catalog.close();
    catalog = openCatalog();
    assert.equal(await new BlobIdAllocator(catalog).allocate(4), first + 1);
    await catalog.close();
  });

  it('concurrent callers get distinct ids while a batch is being reserved', async () => {
    const catalog = openCatalog();
    const ids = new BlobIdAllocator(catalog);
    const got = await Promise.all(Array.from({ length: blobIdBatchSize + 100 }, (_, i) => ids.allocate(i % 2)));
    assert.equal(new Set(got).size, got.length);
    await catalog.close();
  });

  it('the watermark tells every id handed out before it from every id handed out after', async () => {
    const catalog = openCatalog();
    const ids = new BlobIdAllocator(catalog);
    const before = await Promise.all(Array.from({ length: 10 }, (_, i) => ids.allocate(i % 3)));
    const allocatedAfter = await ids.watermark();
    const after = [await ids.allocate(0), await ids.allocate(1), await ids.allocate(7)];
    assert.ok(before.every((id) => !allocatedAfter(id)));
    assert.ok(after.every((id) => allocatedAfter(id)));
    await catalog.close();
  });
});
