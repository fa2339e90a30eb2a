import assert from 'node:assert/strict';
import path from 'node:path';
import { BlobIdAllocator, nextBlobIdKey } from '../../store/allocator';
import { SqliteCatalog } from '../../store/catalog/sqlite';
import { blobIdBatchSize } from '../../store/limits';
import { tempDir } from '../support/tmp';

describe('blob id allocation', () => {
  let dir: { dir: string; cleanup: () => void };
  beforeEach(() => (dir = tempDir()));
  afterEach(() => dir.cleanup());

  const openCatalog = () => SqliteCatalog.open(path.join(dir.dir, 'catalog.sqlite'), () => 'test');

  it('hands out each id once, starting at 1, and commits a batch before using it', async () => {
    const catalog = openCatalog();
    const ids = new BlobIdAllocator(catalog);
    const seen = new Set<number>();
    for (let i = 0; i < blobIdBatchSize * 2 + 5; i++) {
      const id = await ids.allocate();
      assert.ok(!seen.has(id));
      seen.add(id);
    }
    assert.equal(Math.min(...seen), 1);
    const mark = JSON.parse((await catalog.get(nextBlobIdKey))!.value) as number;
    assert.ok(Math.max(...seen) < mark, 'every id handed out is below the committed mark');
    await catalog.close();
  });

  it('never hands out an id again after a restart, even one never used', async () => {
    let catalog = openCatalog();
    const first = await new BlobIdAllocator(catalog).allocate();
    await catalog.close();
    catalog = openCatalog();
    const second = await new BlobIdAllocator(catalog).allocate();
    assert.ok(second > first + blobIdBatchSize - 1, `${second} skips the unused rest of ${first}'s batch`);
    await catalog.close();
  });

  it('after a clean release the next process continues where this one stopped', async () => {
    let catalog = openCatalog();
    const ids = new BlobIdAllocator(catalog);
    const first = await ids.allocate();
    await ids.release();
    await catalog.close();
    catalog = openCatalog();
    assert.equal(await new BlobIdAllocator(catalog).allocate(), first + 1);
    await catalog.close();
  });

  it('concurrent callers get distinct ids while a batch is being reserved', async () => {
    const catalog = openCatalog();
    const ids = new BlobIdAllocator(catalog);
    const got = await Promise.all(Array.from({ length: blobIdBatchSize + 100 }, () => ids.allocate()));
    assert.equal(new Set(got).size, got.length);
    await catalog.close();
  });

  it('the watermark is above every id handed out and at or below every later one', async () => {
    const catalog = openCatalog();
    const ids = new BlobIdAllocator(catalog);
    const before = await Promise.all(Array.from({ length: 10 }, () => ids.allocate()));
    const mark = await ids.watermark();
    const after = await ids.allocate();
    assert.ok(before.every((id) => id < mark) && after >= mark);
    await catalog.close();
  });
});
