import assert from 'node:assert/strict';
import { TokenBucket } from '../../lib/token-bucket';
import { QosThrottle } from '../../node-plugin/qos-throttle';

describe('QoS token bucket and throttle', () => {
  it('a bucket fills at its rate up to its capacity, and a cost larger than the bucket passes once it is full, leaving a debt', () => {
    const bucket = new TokenBucket(100, 10, 0);
    assert.equal(bucket.waitMs(10, 0), 0, 'it starts full');
    bucket.take(10);
    assert.equal(bucket.waitMs(1, 0), 10, 'one token takes 10 ms at 100/s');
    assert.equal(bucket.waitMs(1, 1000), 0);
    assert.equal(bucket.waitMs(50, 1000), 0, 'a cost of 50 needs only a full bucket of 10');
    bucket.take(50);
    assert.equal(bucket.waitMs(1, 1000), 410, 'the debt of 40 is paid before the next token');
    bucket.reshape(1000, 100, 1000);
    assert.equal(bucket.waitMs(1, 1000), 41, 'a new rate pays the debt faster');
  });

  it('an unlimited throttle lets every request go at once, without a promise', () => {
    const throttle = new QosThrottle('unit-free');
    assert.equal(throttle.limited, false);
    assert.equal(throttle.admit(4096), undefined);
  });

  it('requests wait in arrival order, never fail, and all go when the limits are lifted', async () => {
    let now = 0;
    const throttle = new QosThrottle('unit-limited', () => now);
    throttle.setLimits({ maxIops: 10, burstSeconds: 0.1 });
    assert.equal(throttle.admit(0), undefined, 'the first request takes the one token of a 0.1 s bucket');
    const order: number[] = [];
    const waits = [1, 2, 3].map((i) => throttle.admit(0)!.then(() => order.push(i)));
    assert.equal(throttle.waiting, 3);
    now += 100; // one token
    await new Promise((resolve) => setTimeout(resolve, 120));
    assert.deepEqual(order, [1], 'one token lets one request go');
    throttle.setLimits({});
    await Promise.all(waits);
    assert.deepEqual(order, [1, 2, 3], 'lifting the limit lets the rest go, in order');
    assert.equal(throttle.admit(0), undefined);
  });

  it('mayGoNow takes nothing: a request goes at once only when the buckets hold its cost and nobody waits, and charge takes it', async () => {
    let now = 0;
    const throttle = new QosThrottle('unit-now', () => now);
    assert.ok(throttle.mayGoNow(1 << 20), 'unlimited: always');
    throttle.setLimits({ maxIops: 10, maxBandwidthBytes: 100 * 4096, burstSeconds: 0.2 });
    assert.ok(throttle.mayGoNow(4096) && throttle.mayGoNow(4096), 'asking twice takes nothing');
    throttle.charge(4096);
    assert.ok(throttle.mayGoNow(4096), 'the bucket of 2 requests holds one more');
    throttle.charge(4096);
    assert.equal(throttle.mayGoNow(0), false, 'both request tokens taken: not now');
    const queued = throttle.admit(0)!;
    now += 100; // one token back
    assert.equal(throttle.mayGoNow(0), false, 'a request waits: nothing overtakes it, token or not');
    await queued;
    assert.equal(throttle.mayGoNow(0), false, 'the waiter took that token');
    now += 100;
    assert.ok(throttle.mayGoNow(4096));
    assert.equal(throttle.mayGoNow(100 * 4096 + 1), true, 'more than the byte bucket goes once it is full');
    throttle.charge(100 * 4096 + 1);
    now += 500;
    assert.equal(throttle.mayGoNow(4096), false, 'a debt of 320 KiB (over a bucket of 80 KiB) is not paid 0.5 s later at 400 KiB/s');
    now += 400;
    assert.ok(throttle.mayGoNow(4096), '0.9 s later it is');
    throttle.close();
    assert.ok(throttle.mayGoNow(1 << 20), 'lifted: always again');
  });

  it('a request larger than the byte bucket goes when the bucket is full, and the next waits for its debt', async () => {
    let now = 0;
    const throttle = new QosThrottle('unit-bytes', () => now);
    throttle.setLimits({ maxBandwidthBytes: 1000 * 1024, burstSeconds: 0.1 });
    assert.equal(throttle.admit(1024 * 1024), undefined, 'a full bucket admits 1 MiB though it holds 100 KiB');
    let went = false;
    const next = throttle.admit(4096)!.then(() => (went = true));
    now += 500;
    await new Promise((resolve) => setTimeout(resolve, 30));
    assert.equal(went, false, 'half a second pays half the debt');
    now += 530;
    await next;
    assert.ok(went);
    throttle.close();
  });
});
