import assert from 'node:assert/strict';
import {
  DeleteObjectsCommand,
  GetObjectCommand,
  ListObjectsV2Command,
  ListObjectsV2CommandOutput,
  PutObjectCommand,
  S3ServiceException,
} from '@aws-sdk/client-s3';
import { Etcd3 } from 'etcd3';
import { EtcdCluster, etcdForSuite, sleep } from '../support/etcd';
import { rgwForSuite } from '../support/rgw';
import { bucketForEachTest } from '../support/s3-bucket';

// Smoke tests of the test support itself: the real servers come up, behave as the
// distributed backends will rely on, and go away.

const callDeadlineMs = 3_000;

function etcdClient(cluster: EtcdCluster): Etcd3 {
  return new Etcd3({
    hosts: cluster.endpoints,
    dialTimeout: 2_000,
    defaultCallOptions: (context) => (context.isStream ? {} : { deadline: Date.now() + callDeadlineMs }),
  });
}

/** Retries `attempt` until it succeeds or `withinMs` has passed; the last error otherwise. */
async function eventually<T>(withinMs: number, attempt: () => Promise<T>): Promise<T> {
  const deadline = Date.now() + withinMs;
  for (;;) {
    try {
      return await attempt();
    } catch (error) {
      if (Date.now() > deadline) throw error;
      await sleep(200);
    }
  }
}

describe('test servers: etcd with one member', function () {
  const suite = etcdForSuite(1);
  let client: Etcd3;
  before(() => (client = etcdClient(suite.cluster)));
  after(() => client?.close());

  it('puts and gets, and commits a transaction only while the key still has the mod revision it was read at', async () => {
    await client.put('volumes/a').value('v1');
    const read = await client.get('volumes/a').exec();
    assert.equal(read.kvs.length, 1);
    const revision = read.kvs[0].mod_revision;

    const first = await client.if('volumes/a', 'Mod', '==', revision).then(client.put('volumes/a').value('v2')).commit();
    assert.equal(first.succeeded, true, 'the compare on an unchanged mod revision holds');
    const stale = await client.if('volumes/a', 'Mod', '==', revision).then(client.put('volumes/a').value('v3')).commit();
    assert.equal(stale.succeeded, false, 'the compare on a stale mod revision fails');

    const after = await client.get('volumes/a').exec();
    assert.equal(after.kvs[0].value.toString(), 'v2');
    assert.ok(BigInt(after.kvs[0].mod_revision) > BigInt(revision), 'revisions are 64-bit strings; compare them as BigInt');
  });
});

describe('test servers: etcd with three members', function () {
  this.timeout(90_000);
  const suite = etcdForSuite(3);

  it('keeps serving when the leader is killed, refuses writes without a quorum, and recovers when the members restart', async () => {
    const { cluster } = suite;
    const client = etcdClient(cluster);
    try {
      await client.put('k').value('1');

      const leader = await cluster.leader();
      assert.ok(leader, 'a three-member cluster has a leader');
      await leader.kill();
      await client.put('k').value('2');
      assert.equal(await client.get('k').string(), '2', 'two of three members still serve writes');

      const second = cluster.members.find((m) => m.running())!;
      await second.kill();
      const t0 = Date.now();
      await assert.rejects(client.put('k').value('3').exec(), 'one member of three cannot commit a write');
      assert.ok(Date.now() - t0 < 30_000, `the write without a quorum failed only after ${Date.now() - t0} ms`);

      await Promise.all([leader.start(), second.start()]);
      await cluster.waitHealthy();
      await eventually(15_000, () => client.put('k').value('4').exec());
      assert.equal(await client.get('k').string(), '4', 'the restarted cluster serves writes again');
    } finally {
      client.close();
    }
  });
});

describe('test servers: Ceph RGW', function () {
  this.timeout(60_000);
  const suite = rgwForSuite();
  const s3 = bucketForEachTest(suite);

  it('writes an object only once with If-None-Match: *', async () => {
    const put = () => s3.client.send(new PutObjectCommand({ Bucket: s3.bucket, Key: 'blob-1', Body: Buffer.from('first'), IfNoneMatch: '*' }));
    await put();
    await assert.rejects(put(), (error: unknown) => {
      assert.ok(error instanceof S3ServiceException, String(error));
      assert.equal(error.$metadata.httpStatusCode, 412);
      return true;
    });
    const got = await s3.client.send(new GetObjectCommand({ Bucket: s3.bucket, Key: 'blob-1' }));
    assert.equal(await got.Body!.transformToString(), 'first');
  });

  it('reads a byte range and a suffix range', async () => {
    await s3.client.send(new PutObjectCommand({ Bucket: s3.bucket, Key: 'blob', Body: Buffer.from('hello world 0123456789') }));
    const middle = await s3.client.send(new GetObjectCommand({ Bucket: s3.bucket, Key: 'blob', Range: 'bytes=6-10' }));
    assert.equal(await middle.Body!.transformToString(), 'world');
    assert.equal(middle.ContentRange, 'bytes 6-10/22');
    const suffix = await s3.client.send(new GetObjectCommand({ Bucket: s3.bucket, Key: 'blob', Range: 'bytes=-4' }));
    assert.equal(await suffix.Body!.transformToString(), '6789');
  });

  it('lists five objects in pages of two and deletes a batch', async () => {
    const keys = ['b/1', 'b/2', 'b/3', 'b/4', 'b/5'];
    for (const key of keys) await s3.client.send(new PutObjectCommand({ Bucket: s3.bucket, Key: key, Body: Buffer.from(key) }));

    const list = async (): Promise<string[][]> => {
      const pages: string[][] = [];
      let token: string | undefined;
      do {
        const page: ListObjectsV2CommandOutput = await s3.client.send(
          new ListObjectsV2Command({ Bucket: s3.bucket, Prefix: 'b/', MaxKeys: 2, ContinuationToken: token }),
        );
        pages.push((page.Contents ?? []).map((o) => o.Key!));
        token = page.IsTruncated ? page.NextContinuationToken : undefined;
        assert.ok(pages.length <= keys.length, 'listing ends');
      } while (token);
      return pages;
    };
    assert.deepEqual(await list(), [['b/1', 'b/2'], ['b/3', 'b/4'], ['b/5']]);

    const deleted = await s3.client.send(
      new DeleteObjectsCommand({ Bucket: s3.bucket, Delete: { Objects: ['b/1', 'b/3', 'b/5'].map((Key) => ({ Key })), Quiet: false } }),
    );
    assert.deepEqual(deleted.Errors ?? [], []);
    assert.deepEqual((deleted.Deleted ?? []).map((d) => d.Key).sort(), ['b/1', 'b/3', 'b/5']);
    assert.deepEqual(await list(), [['b/2', 'b/4']]);
  });
});
