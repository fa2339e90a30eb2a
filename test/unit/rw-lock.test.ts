import assert from 'node:assert/strict';
import { RwLock } from '../../store/rw-lock';

describe('readers-writer lock', () => {
  it('is taken at once, without a promise, when free', () => {
    const lock = new RwLock();
    assert.equal(lock.shared(), undefined);
    assert.equal(lock.shared(), undefined);
    lock.releaseShared();
    lock.releaseShared();
    assert.equal(lock.exclusive(), undefined);
    lock.releaseExclusive();
    assert.ok(lock.idle);
  });

  it('a writer waits for readers, and readers that come after a waiting writer wait for it', async () => {
    const lock = new RwLock();
    const order: string[] = [];
    void lock.shared();
    const writer = Promise.resolve(lock.exclusive()).then(() => order.push('writer'));
    const lateReader = Promise.resolve(lock.shared()).then(() => order.push('late reader'));
    await Promise.resolve();
    assert.deepEqual(order, []);
    lock.releaseShared();
    await writer;
    assert.deepEqual(order, ['writer']);
    lock.releaseExclusive();
    await lateReader;
    assert.deepEqual(order, ['writer', 'late reader']);
    lock.releaseShared();
    assert.ok(lock.idle);
  });
});
