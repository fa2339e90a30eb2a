import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { GetObjectCommand, HeadBucketCommand, HeadObjectCommand, ListObjectsV2Command } from '@aws-sdk/client-s3';
import { Log } from '../../lib/logger';
import { s3Requests } from '../../lib/metrics';
import { blobId, bytesOfClass, classOf } from '../../store/blob-id';
import { isArborError } from '../../store/errors';
import { Catalog } from '../../store/catalog/catalog';
import { SqliteCatalog } from '../../store/catalog/sqlite';
import { S3BlobStore } from '../../store/blobs/s3';
import { BlobsLocation, idOfKey, objectKey, parseBlobsUrl } from '../../store/blobs/s3-url';
import { S3Http, S3HttpError, S3HttpOptions } from '../../store/blobs/s3-http';
import { Random, seedFromEnv } from '../support/random';
import { rgwForSuite } from '../support/rgw';
import { bucketForEachTest } from '../support/s3-bucket';
import { memoryTempDir } from '../support/tmp';

/**
 * The S3 blob backend against a real Ceph RGW: a seeded random model test (replay a
 * failure with ARBOR_S3_SEED=<seed>, lengthen with ARBOR_S3_OPS), then the contract's
 * behaviours one by one. parseBlobsUrl needs no server.
 */
const seed = seedFromEnv('ARBOR_S3_SEED');
const operations = Number(process.env.ARBOR_S3_OPS ?? 500);
const trace = process.env.ARBOR_S3_TRACE === '1';
const KiB = 1024;

describe('parseBlobsUrl', () => {
  const noEnv = {};

  it('takes bucket, prefix, endpoint and region from an s3:// URL', () => {
    assert.deepEqual(parseBlobsUrl('s3://my-bucket', noEnv), { bucket: 'my-bucket', prefix: '', region: 'us-east-1' });
    assert.deepEqual(parseBlobsUrl('s3://my-bucket/', noEnv), { bucket: 'my-bucket', prefix: '', region: 'us-east-1' });
    assert.deepEqual(parseBlobsUrl('s3://my.bucket-2/arbor', noEnv), { bucket: 'my.bucket-2', prefix: 'arbor/', region: 'us-east-1' });
    assert.deepEqual(parseBlobsUrl('s3://b01/a/b/?endpoint=http://127.0.0.1:7480&region=eu-west-1', noEnv), {
      bucket: 'b01',
      prefix: 'a/b/',
      endpoint: 'http://127.0.0.1:7480',
      region: 'eu-west-1',
    });
    assert.equal(parseBlobsUrl('s3://b01?endpoint=https://s3.example.com/', noEnv).endpoint, 'https://s3.example.com');
  });

  it('takes the region from AWS_REGION when the URL has none, else us-east-1', () => {
    assert.equal(parseBlobsUrl('s3://b01', { AWS_REGION: 'ap-south-1' }).region, 'ap-south-1');
    assert.equal(parseBlobsUrl('s3://b01?region=eu-north-1', { AWS_REGION: 'ap-south-1' }).region, 'eu-north-1');
    assert.equal(parseBlobsUrl('s3://b01', {}).region, 'us-east-1');
  });

  const refused: Array<[string, RegExp]> = [
    ['http://bucket/x', /^blob store URL "http:\/\/bucket\/x" is not of the form s3:\/\/bucket\[\/prefix\]/],
    ['s3:/bucket', /is not of the form s3:\/\/bucket/],
    ['s3://', /bucket name "" is empty/],
    ['s3://ab', /bucket name "ab" is 2 characters long; bucket names have 3 to 63/],
    [`s3://${'a'.repeat(64)}`, /is 64 characters long/],
    ['s3://My_Bucket', /bucket name "My_Bucket" may hold only lowercase letters, digits, dots and hyphens/],
    ['s3://-bucket', /must begin and end with a letter or a digit/],
    ['s3://a..b', /must not hold two adjacent dots/],
    ['s3://192.168.1.10', /must not look like an IP address/],
    ['s3://xn--bucket', /must not begin with "xn--" \(reserved by S3\)/],
    ['s3://bucket-s3alias', /must not end with "-s3alias"/],
    ['s3://bucket?foo=1', /unknown query parameter "foo" \(known: endpoint, region\)/],
    ['s3://bucket?region=a&region=b', /query parameter "region" is given twice/],
    ['s3://bucket?endpoint=', /query parameter "endpoint" is empty/],
    ['s3://bucket?endpoint=ftp://host', /endpoint "ftp:\/\/host" must be http:\/\/ or https:\/\//],
    ['s3://bucket?endpoint=127.0.0.1:7480', /endpoint "127\.0\.0\.1:7480" must be http:\/\/ or https:\/\/|is not a URL/],
    ['s3://bucket?endpoint=http://h:1/path', /must be only scheme, host and port \(no path or query\)/],
    ['s3://bucket?region=EU', /region "EU" may hold only lowercase letters, digits and hyphens/],
    ['s3://bucket/a//b', /the prefix "a\/\/b" has an empty segment/],
    ['s3://bucket/a/../b', /has a "\.\." segment/],
    ['s3://bucket/a%20b', /prefix segment "a b" may hold only letters, digits/],
    ['s3://bucket/a%zz', /malformed percent-escape/],
    ['s3://bucket/p#frag', /has a fragment \(#frag\); remove it/],
  ];
  for (const [url, message] of refused) {
    it(`refuses ${url.length > 40 ? `${url.slice(0, 40)}…` : url}`, () => {
      assert.throws(
        () => parseBlobsUrl(url, noEnv),
        (err: unknown) => isArborError(err, 'invalid-argument') && message.test(err.message),
      );
    });
  }

  it('refuses credentials in the URL, pointing at the environment, without repeating them', () => {
    const cases = [
      's3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/prefix',
      's3://AKIAEXAMPLE:wJalr/XUtnFEMI@bucket/prefix', // an unescaped '/' in the secret
      's3://bucket/prefix?endpoint=http://AKIAEXAMPLE:wJalrXUtnFEMI@127.0.0.1:7480',
      's3://bucket/prefix?endpoint=http%3A%2F%2FAKIAEXAMPLE%3AwJalrXUtnFEMI%40127.0.0.1%3A7480',
    ];
    for (const url of cases) {
      assert.throws(
        () => parseBlobsUrl(url, noEnv),
        (err: unknown) =>
          isArborError(err, 'invalid-argument') &&
          /carries credentials; put them in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY/.test(err.message) &&
          !err.message.includes('AKIAEXAMPLE') &&
          !err.message.includes('wJalr'),
        url,
      );
    }
  });

  it('object keys spread ids under 4 hex digits of a hash, and only our keys parse back', () => {
    const id = blobId(4, 0x123456);
    const key = objectKey('arbor/', id);
    assert.match(key, /^arbor\/[0-9a-f]{4}\/080000123456$/);
    assert.equal(idOfKey('arbor/', key), id);
    assert.equal(objectKey('', id), key.slice('arbor/'.length));
    assert.equal(idOfKey('other/', key), undefined);
    const wrongHash = key.replace(/^arbor\/([0-9a-f]{4})/, (_, h: string) => `arbor/${((parseInt(h, 16) + 1) % 65536).toString(16).padStart(4, '0')}`);
    assert.equal(idOfKey('arbor/', wrongHash), undefined, 'a key whose hash does not match its id is not ours');
    assert.equal(idOfKey('', 'arbor/abcd/000000000001'), undefined, 'a nested prefix is not ours');
    assert.equal(idOfKey('arbor/', 'arbor/readme.txt'), undefined);
  });
});

/** Requests of one operation and HTTP status that arbor_s3_request_duration_seconds counted (in this process). */
async function timedRequests(operation: string, status: string): Promise<number> {
  const { values } = await s3Requests.get();
  const count = values.find(
    (v) => v.metricName === 'arbor_s3_request_duration_seconds_count' && v.labels.operation === operation && v.labels.status === status,
  );
  return count?.value ?? 0;
}

/** A server on loopback that accepts connections and never answers; `close` drops them and stops it. */
async function silentServer(): Promise<{ port: number; close: () => Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => {});
    socket.on('close', () => sockets.delete(socket));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    close: async () => {
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

describe('S3 blob store (real Ceph RGW)', function () {
  this.timeout(120_000);
  const suite = rgwForSuite();
  const s3 = bucketForEachTest(suite);
  const savedEnv: Record<string, string | undefined> = {};
  const stores: S3BlobStore[] = [];
  const dirs: Array<{ dir: string; cleanup: () => void }> = [];

  before(() => {
    // The store takes credentials only from the SDK's default chain: here, the environment.
    for (const [name, value] of Object.entries(suite.rgw.env())) {
      savedEnv[name] = process.env[name];
      process.env[name] = value;
    }
  });
  after(() => {
    for (const [name, value] of Object.entries(savedEnv)) {
      if (value === undefined) delete process.env[name];
      else process.env[name] = value;
    }
  });
  afterEach(async () => {
    for (const store of stores.splice(0)) await store.close();
    for (const dir of dirs.splice(0)) dir.cleanup();
  });

  const urlOf = (bucket: string, prefix = 'arbor') => `s3://${bucket}/${prefix}?endpoint=${suite.rgw.endpoint}&region=${suite.rgw.region}`;
  const cacheDir = (): string => {
    const dir = memoryTempDir('arbor-s3-cache-');
    dirs.push(dir);
    return dir.dir;
  };
  const open = async (
    dir: string,
    options: { cacheBytes?: number; log?: Log; bucket?: string; url?: string; requestTimeoutMs?: number; packIndex?: Catalog; packGraceMs?: number } = {},
  ): Promise<S3BlobStore> => {
    const store = await S3BlobStore.open({
      location: options.url ?? urlOf(options.bucket ?? s3.bucket),
      cacheDir: dir,
      cacheBytes: options.cacheBytes ?? 16 * 1024 * KiB,
      log: options.log,
      requestTimeoutMs: options.requestTimeoutMs,
      packIndex: options.packIndex,
      packGraceMs: options.packGraceMs,
    });
    stores.push(store);
    return store;
  };
  let evictions = 0;
  const close = async (store: S3BlobStore): Promise<void> => {
    stores.splice(stores.indexOf(store), 1);
    evictions += store.cacheStats().evictions;
    await store.close();
  };
  const read = async (store: S3BlobStore, id: number, offset = 0, length = bytesOfClass(classOf(id))): Promise<Buffer> => {
    const out = Buffer.alloc(length, 0x5a); // not zeros: zeros must be written by the read
    await store.read(id, offset, out, 0, length);
    return out;
  };
  const write = (store: S3BlobStore, id: number, offset: number, bytes: Buffer) => store.write(id, offset, bytes, 0, bytes.length);
  const keysInBucket = async (prefix = 'arbor/'): Promise<string[]> => {
    const keys: string[] = [];
    let token: string | undefined;
    do {
      const page = await s3.client.send(new ListObjectsV2Command({ Bucket: s3.bucket, Prefix: prefix, ContinuationToken: token }));
      for (const object of page.Contents ?? []) keys.push(object.Key!);
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token);
    return keys;
  };
  const headStatus = async (key: string): Promise<number> => {
    try {
      await s3.client.send(new HeadObjectCommand({ Bucket: s3.bucket, Key: key }));
      return 200;
    } catch (err) {
      return (err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode ?? 0;
    }
  };

  /** A catalog for a store's pack index (SQLite: a real one, kept across the store's reopens like etcd would be). */
  const catalogs: SqliteCatalog[] = [];
  afterEach(async () => {
    for (const catalog of catalogs.splice(0)) await catalog.close();
  });
  const packCatalog = (): SqliteCatalog => {
    const catalog = SqliteCatalog.open(path.join(cacheDir(), 'catalog.sqlite'), () => 'this test');
    catalogs.push(catalog);
    return catalog;
  };

  for (const packed of [false, true]) {
    it(`random writes, reads, syncs, deletes and reopens match a model byte for byte (${operations} operations, seed ${seed}${packed ? '; commits pack their blobs, indexed in a catalog' : ''})`, async () => {
      const rng = new Random(seed);
      // With a pack index, a sync is a commit's (syncForCommit): its index ops go into the
      // catalog as a commit would carry them, or (a commit that failed) not yet: those
      // blobs come back with a later commit, as the volume's pending syncs do. A grace
      // period of 0: the collector may delete any pack no index names, at any step, and
      // a packed blob not yet indexed is always packed anew.
      const catalog = packed ? packCatalog() : undefined;
      const packOptions = packed ? { packIndex: catalog, packGraceMs: 0 } : {};
      let uncommitted: number[] = [];
      let packsDeleted = 0;
      evictions = 0;
      const classes = [0, 2, 4]; // 4, 16 and 64 KiB blobs
      const nextSerial = new Map<number, number>(classes.map((c) => [c, 1]));
      // The model: every blob written and not deleted, its bytes (zeros where unwritten), and whether a sync made it durable.
      const model = new Map<number, { bytes: Buffer; synced: boolean }>();
      const gone = new Set<number>();
      const warnings: string[] = [];
      const log: Log = { debug() {}, info() {}, warn: (message) => warnings.push(message), error() {} };
      const cacheBytes = 96 * KiB; // smaller than a few 64 KiB blobs: eviction all the time
      let dir = cacheDir();
      let store = await open(dir, { cacheBytes, log, ...packOptions });
      let storesOpened = 1;
      const tally: Record<string, number> = {};
      const timing: Record<string, number> = {};
      const t0 = Date.now();

      const unsynced = () => [...model].filter(([, blob]) => !blob.synced).map(([id]) => id);
      const anyId = (): number => {
        const roll = rng.next();
        if (roll < 0.08 && gone.size) return rng.pick([...gone]);
        if (roll < 0.12 || model.size === 0) return blobId(rng.pick(classes), 1_000_000 + rng.int(0, 1000)); // never written
        return rng.pick([...model.keys()]);
      };
      const range = (size: number): { offset: number; length: number } => {
        const offset = rng.chance(0.3) ? rng.int(0, size / 512 - 1) * 512 : rng.int(0, size - 1);
        const length = rng.chance(0.5) ? rng.int(1, Math.min(600, size - offset)) : rng.int(1, size - offset);
        return { offset, length };
      };
      const expected = (id: number, offset: number, length: number): Buffer => {
        const blob = model.get(id);
        return blob ? blob.bytes.subarray(offset, offset + length) : Buffer.alloc(length);
      };
      const checkRead = async (id: number, offset: number, length: number, step: number) => {
        const got = await read(store, id, offset, length);
        if (!got.equals(expected(id, offset, length))) {
          const at = got.findIndex((byte, i) => byte !== expected(id, offset, length)[i]);
          if (trace)
            process.stderr.write(`  got ${got.subarray(0, 32).toString('hex')}\n  exp ${expected(id, offset, length).subarray(0, 32).toString('hex')}\n`);
          assert.fail(`step ${step} (seed ${seed}): blob ${id} bytes ${offset}+${length} differ from the model first at +${at}`);
        }
      };

      /** A commit's sync of `ids`; with `lands`, its transaction carries their index, else they wait for a later commit. */
      const commit = async (ids: number[], lands: boolean): Promise<void> => {
        const durable = await store.syncForCommit(ids);
        if (trace) process.stderr.write(`  commit ${ids.join(' ')}: ${durable.ops.length} index keys, ${lands ? 'lands' : 'fails'}\n`);
        // A blob that went as an object of its own is durable whatever becomes of the commit; a packed one once its index is committed.
        const packedIds = new Set(durable.ops.map((op) => parseInt(op.key.slice('blob-packs/'.length), 16)));
        const durableNow = ids.filter((id) => !packedIds.has(id) || lands);
        if (lands) {
          assert.ok((await catalog!.txn([], durable.ops)).succeeded);
          durable.committed();
        }
        uncommitted = [...new Set([...uncommitted, ...ids])].filter((id) => model.has(id) && !durableNow.includes(id));
        for (const id of durableNow) {
          const blob = model.get(id);
          if (blob) blob.synced = true;
        }
      };

      for (let step = 0; step < operations; step++) {
        const op = rng.weighted({
          write: 40,
          read: 30,
          readTogether: 4,
          sync: 12,
          delete: 5,
          list: 3,
          reopen: 2,
          freshCache: 2,
          writeSynced: 2,
          commitAgain: packed ? 4 : 0,
          collect: packed ? 2 : 0,
        });
        tally[op] = (tally[op] ?? 0) + 1;
        const opStart = Date.now();
        if (trace) process.stderr.write(`step ${step}: ${op} ${JSON.stringify(store.cacheStats())}\n`);
        switch (op) {
          case 'write': {
            // Not one a commit has synced, even one that failed: the engine never writes a blob it handed to a sync.
            const open = unsynced().filter((id) => !uncommitted.includes(id));
            let id: number;
            if (open.length === 0 || rng.chance(0.3)) {
              const c = rng.pick(classes);
              id = blobId(c, nextSerial.get(c)!);
              nextSerial.set(c, nextSerial.get(c)! + 1);
              model.set(id, { bytes: Buffer.alloc(bytesOfClass(c)), synced: false });
            } else {
              id = rng.pick(open);
            }
            const blob = model.get(id)!;
            const { offset, length } = range(blob.bytes.length);
            const bytes = rng.chance(0.1) ? Buffer.alloc(length) : rng.bytes(length);
            await write(store, id, offset, bytes);
            bytes.copy(blob.bytes, offset);
            if (trace) process.stderr.write(`  write ${id} ${offset}+${length}\n`);
            break;
          }
          case 'read': {
            const id = anyId();
            const { offset, length } = range(bytesOfClass(classOf(id)));
            await checkRead(id, offset, length, step);
            break;
          }
          case 'readTogether': {
            // Concurrent reads of one blob, possibly all missing the cache at once.
            const id = anyId();
            const size = bytesOfClass(classOf(id));
            await Promise.all(Array.from({ length: 4 }, () => range(size)).map(({ offset, length }) => checkRead(id, offset, length, step)));
            break;
          }
          case 'sync': {
            const open = unsynced();
            const chosen = open.filter(() => rng.chance(0.9));
            // Already synced and unknown ids are no-ops.
            const extra = [anyId(), anyId()];
            // Reads while the uploads are in flight see the same bytes.
            const during = chosen.length && rng.chance(0.5) ? rng.pick(chosen) : undefined;
            const readDuring = during === undefined ? undefined : checkRead(during, 0, bytesOfClass(classOf(during)), step);
            if (packed) {
              // Small and few enough, they go as one pack; the commit carrying their index fails one time in five.
              await Promise.all([commit([...chosen, ...extra], rng.chance(0.8)), readDuring]);
              break;
            }
            await Promise.all([store.sync([...chosen, ...extra]), readDuring]);
            if (trace) process.stderr.write(`  sync ${[...chosen, ...extra].join(' ')}\n`);
            for (const id of [...chosen, ...extra]) {
              const blob = model.get(id);
              if (blob) blob.synced = true;
            }
            break;
          }
          case 'commitAgain': {
            // The blobs of commits that failed, with the next commit's.
            const next = unsynced().filter((id) => !uncommitted.includes(id) && rng.chance(0.3));
            await commit([...uncommitted, ...next], rng.chance(0.9));
            break;
          }
          case 'collect': {
            // Only packs that no index key names go (grace 0): those of commits that failed, and those whose blobs were all deleted.
            packsDeleted += await store.collectUnused();
            break;
          }
          case 'writeSynced': {
            const synced = [...model].filter(([, blob]) => blob.synced).map(([id]) => id);
            if (synced.length === 0) break;
            const id = rng.pick(synced);
            // Refused at once when this store knows the blob is synced; otherwise its sync is refused. Either way nothing changes.
            try {
              await write(store, id, 0, rng.bytes(16));
            } catch (err) {
              assert.ok(isArborError(err, 'internal') && err.message.includes(`blob ${id} was written after it was synced`), String(err));
              break;
            }
            // Found by the conditional upload where the blob has an object of its own, by the index where it was packed.
            await assert.rejects(
              store.sync([id]),
              (err: unknown) =>
                isArborError(err, 'internal') && (err.message.includes(`than blob ${id}`) || err.message.includes(`blob ${id} was synced before, in pack`)),
            );
            // The refused bytes stay staged in this store until it closes: reopen on a fresh cache to read the truth.
            await close(store);
            for (const [other, blob] of model) {
              if (!blob.synced) {
                model.delete(other);
                gone.add(other);
              }
            }
            dir = cacheDir();
            store = await open(dir, { cacheBytes, log, ...packOptions });
            storesOpened++;
            uncommitted = [];
            break;
          }
          case 'delete': {
            // Some of the blobs, and one more id: deleted, never written, or one of them again.
            const chosen = [...[...model.keys()].filter(() => rng.chance(0.08)), anyId()];
            await store.delete(chosen);
            for (const id of chosen) {
              if (model.delete(id)) gone.add(id);
            }
            break;
          }
          case 'list': {
            const listed = (await store.list()).sort((a, b) => a - b);
            assert.deepEqual(
              listed,
              [...model.keys()].sort((a, b) => a - b),
              `step ${step} (seed ${seed}): list differs from the model`,
            );
            break;
          }
          case 'reopen':
          case 'freshCache': {
            await close(store);
            // Unsynced blobs were never acknowledged as durable: they are gone.
            for (const [id, blob] of model) {
              if (!blob.synced) {
                model.delete(id);
                gone.add(id);
              }
            }
            if (op === 'freshCache') dir = cacheDir();
            store = await open(dir, { cacheBytes, log, ...packOptions });
            storesOpened++;
            uncommitted = [];
            break;
          }
        }
        timing[op] = (timing[op] ?? 0) + Date.now() - opStart;
        const stats = store.cacheStats();
        assert.ok(
          stats.stagedBytes + stats.cleanBytes <= cacheBytes || stats.cleanBlobs === 0,
          `step ${step}: the cache holds ${JSON.stringify(stats)}, over ${cacheBytes} with clean entries left`,
        );
      }

      // The end state, from a fresh cache: everything comes from S3.
      await close(store);
      for (const [id, blob] of model) if (!blob.synced) model.delete(id);
      store = await open(cacheDir(), { cacheBytes, log, ...packOptions });
      if (packed) {
        packsDeleted += await store.collectUnused();
        assert.ok(
          (await keysInBucket()).some((key) => key.startsWith('arbor/packs/')),
          'some commits were packed',
        );
        assert.ok(packsDeleted > 0, 'the collector deleted packs no blob used');
      }
      for (const id of [...model.keys(), ...gone]) await checkRead(id, 0, bytesOfClass(classOf(id)), operations);
      assert.deepEqual(
        (await store.list()).sort((a, b) => a - b),
        [...model.keys()].sort((a, b) => a - b),
      );
      assert.equal((await store.usage()).blobs, model.size);
      assert.ok(evictions > 0, 'the cache evicted');
      assert.ok(warnings.length <= storesOpened + 1, `at most one warning per store: ${warnings.length} for ${storesOpened + 1} stores`);
      process.stderr.write(
        `      s3 model: ${operations} operations in ${((Date.now() - t0) / 1000).toFixed(1)} s, ${model.size} blobs left; ${JSON.stringify(tally)}; ms ${JSON.stringify(timing)}; ` +
          `${evictions} evictions; seed ${seed}\n`,
      );
    });
  }

  it('a commit of a few small blobs uploads them as one pack, found through index keys that ride in the commit; a bigger commit uploads an object per blob', async () => {
    const catalog = packCatalog();
    const store = await open(cacheDir(), { packIndex: catalog });
    // A snapshot's commit: a data extent and the map nodes above it, each partly written.
    const ids = [blobId(4, 1), blobId(2, 1), blobId(0, 1)];
    const contents = ids.map((id, i) => Buffer.alloc(bytesOfClass(classOf(id)) - 1000 * (i + 1), 0x31 + i));
    for (const [i, id] of ids.entries()) await write(store, id, 0, contents[i]);
    const expected = (i: number) => Buffer.concat([contents[i], Buffer.alloc(1000 * (i + 1))]);

    const durable = await store.syncForCommit(ids);
    assert.equal(store.requestsSent('PutObject'), 1, 'one PUT for the three blobs');
    const packs = (await keysInBucket()).filter((key) => key.startsWith('arbor/packs/'));
    assert.equal(packs.length, 1);
    assert.equal((await keysInBucket()).length, 1, 'no blob has an object of its own');
    assert.deepEqual(
      durable.ops.map((op) => op.key),
      ids.map((id) => `blob-packs/${id.toString(16).padStart(12, '0')}`),
    );
    await assert.rejects(write(store, ids[1], 0, Buffer.from('late')), (err: unknown) => isArborError(err, 'internal'), 'a packed blob is sealed');

    // Until a commit carries the index, only this store can find them: the catalog has nothing.
    for (const [i, id] of ids.entries()) assert.ok((await read(store, id)).equals(expected(i)));
    const before = await open(cacheDir(), { packIndex: catalog });
    assert.ok((await read(before, ids[0])).equals(Buffer.alloc(bytesOfClass(classOf(ids[0])))), 'not committed: not there');
    // A commit that failed: the next names the blobs again, and gets the same ops without uploading anything.
    const again = await store.syncForCommit([...ids, blobId(0, 99)]);
    assert.equal(store.requestsSent('PutObject'), 1);
    assert.deepEqual(again.ops, durable.ops);

    assert.ok((await catalog.txn([], again.ops)).succeeded);
    again.committed();
    const fresh = await open(cacheDir(), { packIndex: catalog });
    for (const [i, id] of ids.entries()) assert.ok((await read(fresh, id)).equals(expected(i)), `blob ${id} read from its pack`);
    assert.equal(fresh.requestsSent('GetObject'), 6, 'per blob: its own object (none) and, at once, its index; then a ranged GET of the pack');
    assert.deepEqual(
      (await fresh.list()).sort((a, b) => a - b),
      [...ids].sort((a, b) => a - b),
    );
    assert.deepEqual(await fresh.usage(), { blobs: 3, bytes: contents.reduce((sum, c) => sum + c.length, 0) });
    assert.deepEqual((await store.syncForCommit(ids)).ops, [], 'once committed, nothing more to carry');

    // A packed blob written again by a process that cannot know: refused at its sync by its index key.
    const unaware = await open(cacheDir(), { packIndex: catalog });
    await write(unaware, ids[1], 0, Buffer.from('again'));
    await assert.rejects(
      unaware.syncForCommit([ids[1]]),
      (err: unknown) => isArborError(err, 'internal') && err.message.startsWith(`blob ${ids[1]} was synced before, in pack`),
    );
    assert.ok((await read(fresh, ids[1])).equals(expected(1)), 'reads keep the packed bytes');

    // More blobs than a pack holds: an object each, no index, and one read of the index for all of them.
    const reads = { get: 0, getMany: 0 };
    const { get, getMany } = catalog;
    let inGetMany = false; // this catalog's getMany reads each key with get
    catalog.get = (key) => (inGetMany || reads.get++, get.call(catalog, key));
    catalog.getMany = async (keys) => {
      reads.getMany++;
      inGetMany = true;
      try {
        return await getMany.call(catalog, keys);
      } finally {
        inGetMany = false;
      }
    };
    const many = Array.from({ length: 17 }, (_, i) => blobId(0, 100 + i));
    for (const id of many) await write(store, id, 0, Buffer.alloc(100, id % 251));
    const big = await store.syncForCommit(many);
    assert.equal(store.requestsSent('PutObject'), 1 + many.length);
    assert.deepEqual(big.ops, []);
    assert.deepEqual(reads, { get: 0, getMany: 1 }, 'whether any was packed before: one read for the sync');
    // And one blob alone: its own object.
    await write(store, blobId(0, 200), 0, Buffer.from('alone'));
    assert.deepEqual((await store.syncForCommit([blobId(0, 200)])).ops, []);
    assert.equal(await headStatus(objectKey('arbor/', blobId(0, 200))), 200);
    // A plain sync never packs: nothing would carry the index.
    for (const id of [blobId(0, 300), blobId(0, 301)]) await write(store, id, 0, Buffer.from('plain'));
    await store.sync([blobId(0, 300), blobId(0, 301)]);
    assert.equal(await headStatus(objectKey('arbor/', blobId(0, 301))), 200);
  });

  it('a pack goes once no index key names it and it is older than the grace period; a blob deleted is gone whoever packed it', async () => {
    const catalog = packCatalog();
    const store = await open(cacheDir(), { packIndex: catalog });
    const [a1, a2, b1, b2] = [blobId(0, 1), blobId(0, 2), blobId(1, 3), blobId(1, 4)];
    for (const id of [a1, a2, b1, b2]) await write(store, id, 0, Buffer.alloc(1000, id % 251));
    const a = await store.syncForCommit([a1, a2]);
    assert.ok((await catalog.txn([], a.ops)).succeeded);
    a.committed();
    // B's commit never lands (the process dies, say): its pack is named by nothing.
    await store.syncForCommit([b1, b2]);
    const packKeys = async () => (await keysInBucket()).filter((key) => key.startsWith('arbor/packs/')).sort();
    // A pack is named after its first blob: A's (class 0) sorts before B's (class 1).
    const [packA, packB] = await packKeys();
    assert.ok(packA.includes(a1.toString(16).padStart(12, '0')) && packB.includes(b1.toString(16).padStart(12, '0')), `packs ${packA} and ${packB}`);
    assert.equal(await store.collectUnused(), 0, 'an unused pack younger than the grace period stays: its index may still come');
    await close(store);

    // Another process, which knows nothing of who packed what, and no grace period.
    await new Promise((resolve) => setTimeout(resolve, 1100)); // past the second of LastModified
    const other = await open(cacheDir(), { packIndex: catalog, packGraceMs: 0 });
    assert.equal(await other.collectUnused(), 1);
    assert.deepEqual(await packKeys(), [packA], "B's pack went, A's stays");
    await other.delete([a1]);
    assert.deepEqual(await other.list(), [a2], 'the deleted blob is gone from the list: its index key went');
    assert.ok((await read(other, a1)).equals(Buffer.alloc(bytesOfClass(classOf(a1)))), 'and it reads as zeros');
    assert.equal(await other.collectUnused(), 0, 'a pack stays while one of its blobs is used');
    assert.ok((await read(other, a2)).equals(Buffer.concat([Buffer.alloc(1000, a2 % 251), Buffer.alloc(bytesOfClass(classOf(a2)) - 1000)])));
    await other.delete([a2]);
    assert.equal(await other.collectUnused(), 1);
    assert.deepEqual(await packKeys(), []);
    assert.deepEqual(await catalog.list('blob-packs/'), [], 'no index key is left');
  });

  it('the index keys of deleted packed blobs go together, a second later at most, and meanwhile the blobs are gone from every answer', async () => {
    const catalog = packCatalog();
    const store = await open(cacheDir(), { packIndex: catalog });
    const ids = Array.from({ length: 4 }, (_, i) => blobId(0, 10 + i));
    for (const id of ids) await write(store, id, 0, Buffer.alloc(512, id % 251));
    const durable = await store.syncForCommit(ids);
    assert.ok((await catalog.txn([], durable.ops)).succeeded);
    durable.committed();
    const keyOf = (id: number) => `blob-packs/${id.toString(16).padStart(12, '0')}`;

    // As a commit's frees do: one blob, then another, soon after.
    await store.delete([ids[0]]);
    await store.delete([ids[1]]);
    assert.ok(await catalog.get(keyOf(ids[0])), 'not yet: the keys of deleted blobs wait to go together');
    assert.deepEqual(
      (await store.list()).sort((a, b) => a - b),
      ids.slice(2),
    );
    assert.equal((await store.usage()).blobs, 2);
    const fresh = await open(cacheDir(), { packIndex: catalog });
    assert.ok((await read(store, ids[0])).equals(Buffer.alloc(bytesOfClass(classOf(ids[0])))), 'a deleted blob reads as zeros here at once');
    await new Promise((resolve) => setTimeout(resolve, 1500));
    assert.equal(await catalog.get(keyOf(ids[0])), undefined);
    assert.equal(await catalog.get(keyOf(ids[1])), undefined);
    assert.ok((await read(fresh, ids[1])).equals(Buffer.alloc(bytesOfClass(classOf(ids[1])))), 'and everywhere once its key went');
    assert.ok((await read(fresh, ids[2])).equals(Buffer.concat([Buffer.alloc(512, ids[2] % 251), Buffer.alloc(bytesOfClass(classOf(ids[2])) - 512)])));
    // A store that closes deletes the keys still waiting.
    await store.delete([ids[2]]);
    await close(store);
    assert.equal(await catalog.get(keyOf(ids[2])), undefined);
  });

  it('many small writes to one blob between syncs make exactly one PutObject, of bytes up to the highest one written', async () => {
    const store = await open(cacheDir());
    const rng = new Random(seed);
    const id = blobId(4, 7);
    const expectedBytes = Buffer.alloc(64 * KiB);
    let end = 0;
    for (let i = 0; i < 128; i++) {
      const offset = rng.int(0, 60 * KiB);
      const bytes = rng.bytes(512);
      await write(store, id, offset, bytes);
      bytes.copy(expectedBytes, offset);
      end = Math.max(end, offset + 512);
    }
    assert.equal(store.requestsSent('PutObject'), 0, 'nothing is uploaded before the sync');
    const timedBefore = await timedRequests('PutObject', '200');
    await store.sync([id]);
    assert.equal(store.requestsSent('PutObject'), 1);
    assert.equal(await timedRequests('PutObject', '200'), timedBefore + 1, 'the upload is in arbor_s3_request_duration_seconds');
    await store.sync([id]);
    await store.sync([id, blobId(4, 8)]);
    assert.equal(store.requestsSent('PutObject'), 1, 'a synced blob and an unknown one are no-ops');
    const head = await s3.client.send(new HeadObjectCommand({ Bucket: s3.bucket, Key: objectKey('arbor/', id) }));
    assert.equal(head.ContentLength, end);
    const other = await open(cacheDir());
    assert.ok((await read(other, id)).equals(expectedBytes), 'a fresh cache reads what was written, zeros past the object');
  });

  it('a write after sync is refused and changes nothing; one the store cannot know about fails at its sync, and nothing is overwritten', async () => {
    const store = await open(cacheDir());
    const id = blobId(0, 42);
    const original = Buffer.alloc(4 * KiB, 0xa1);
    await write(store, id, 0, original);
    await store.sync([id]);
    await assert.rejects(
      write(store, id, 100, Buffer.alloc(10, 0xff)),
      (err: unknown) =>
        isArborError(err, 'internal') && err.message.startsWith(`blob ${id} was written after it was synced`) && err.message.includes(objectKey('arbor/', id)),
    );
    assert.ok((await read(store, id)).equals(original));

    // Another process (a fresh cache) cannot know: its sync finds the object, with other bytes.
    const other = await open(cacheDir());
    await write(other, id, 0, Buffer.alloc(4 * KiB, 0xb2));
    await assert.rejects(
      other.sync([id]),
      (err: unknown) => isArborError(err, 'internal') && /already holds other bytes than blob \d+ .*nothing was overwritten/.test(err.message),
    );
    const third = await open(cacheDir());
    assert.ok((await read(third, id)).equals(original), 'the object keeps its first bytes');

    // The same bytes again (a retried upload whose first try landed) are fine.
    const retry = await open(cacheDir());
    await write(retry, id, 0, original);
    const refusedBefore = await timedRequests('PutObject', '412');
    await retry.sync([id]);
    assert.equal(await timedRequests('PutObject', '412'), refusedBefore + 1, 'the refused upload is counted by its HTTP status');
    assert.equal(retry.requestsSent('HeadObject'), 1, 'the refused conditional upload was checked against the object');
  });

  it('a second store on the same cache directory is refused, and the directory is free again after close', async () => {
    const dir = cacheDir();
    const first = await open(dir);
    await assert.rejects(
      open(dir),
      (err: unknown) =>
        isArborError(err, 'busy') &&
        err.message === `blob cache directory ${dir} is in use by another blob store (pid ${process.pid}); every store needs a cache directory of its own`,
    );
    await close(first);
    const second = await open(dir);
    await second.list();
  });

  it('blobs staged by a killed process are never uploaded; its synced blobs are, and its clean cache is reused', async () => {
    const dir = cacheDir();
    const synced = blobId(2, 1);
    const staged = blobId(2, 2);
    const script = `
      const { S3BlobStore } = require(${JSON.stringify(path.resolve(__dirname, '../../store/blobs/s3.js'))});
      (async () => {
        const store = await S3BlobStore.open({ location: ${JSON.stringify(urlOf(s3.bucket))}, cacheDir: ${JSON.stringify(dir)}, cacheBytes: 1 << 20 });
        await store.write(${synced}, 0, Buffer.alloc(16384, 0xaa), 0, 16384);
        await store.sync([${synced}]);
        await store.write(${staged}, 0, Buffer.alloc(16384, 0xbb), 0, 16384);
        process.stdout.write('ready\\n');
        setInterval(() => {}, 1000);
      })().catch((err) => { console.error(err); process.exit(1); });`;
    const child = spawn(process.execPath, ['-e', script], { env: { ...process.env, ...suite.rgw.env() }, stdio: ['ignore', 'pipe', 'pipe'] });
    const exited = new Promise<string>((resolve) => child.once('exit', (code, signal) => resolve(signal ?? `exit ${code}`)));
    try {
      let stderr = '';
      child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
      await new Promise<void>((resolve, reject) => {
        child.stdout.on('data', (chunk: Buffer) => chunk.toString().includes('ready') && resolve());
        void exited.then((how) => reject(new Error(`the child ended (${how}) before it was ready:\n${stderr}`)));
      });
      await assert.rejects(open(dir), (err: unknown) => isArborError(err, 'busy') && err.message.includes(`(pid ${child.pid})`));
    } finally {
      child.kill('SIGKILL');
    }
    assert.equal(await exited, 'SIGKILL');
    assert.equal(fs.readdirSync(path.join(dir, 'staged')).length, 1, 'the killed process left its staged blob behind');

    // The kernel dropped the dead process's lock: no stale lock to clear.
    const store = await open(dir);
    assert.deepEqual(fs.readdirSync(path.join(dir, 'staged')), [], 'staged leftovers are discarded at open');
    assert.deepEqual(await store.list(), [synced]);
    assert.equal(await headStatus(objectKey('arbor/', staged)), 404);
    assert.ok((await read(store, staged)).equals(Buffer.alloc(16 * KiB)));
    assert.ok((await read(store, synced)).equals(Buffer.alloc(16 * KiB, 0xaa)));
    assert.equal(store.requestsSent('GetObject'), 1, 'only the missing blob was fetched: the synced one came from the clean cache');
  });

  it('a clean cache survives a restart: reads after reopening need no GET', async () => {
    const dir = cacheDir();
    let store = await open(dir);
    const ids = [blobId(0, 1), blobId(0, 2), blobId(4, 1)];
    for (const id of ids) await write(store, id, 100, Buffer.from(`blob ${id}`));
    await store.sync(ids);
    await close(store);
    store = await open(dir);
    for (const id of ids) assert.equal((await read(store, id, 100, 20)).toString().replace(/\0+$/, ''), `blob ${id}`);
    assert.equal(store.requestsSent('GetObject'), 0);
  });

  it('concurrent misses of one blob share a single GET', async () => {
    const writer = await open(cacheDir());
    const id = blobId(4, 99);
    const bytes = new Random(seed).bytes(64 * KiB);
    await write(writer, id, 0, bytes);
    await writer.sync([id]);
    const reader = await open(cacheDir());
    const ranges = Array.from({ length: 16 }, (_, i) => ({ offset: i * 4 * KiB, length: 4 * KiB }));
    const got = await Promise.all(ranges.map(({ offset, length }) => read(reader, id, offset, length)));
    for (let i = 0; i < ranges.length; i++) assert.ok(got[i].equals(bytes.subarray(ranges[i].offset, ranges[i].offset + ranges[i].length)));
    assert.equal(reader.requestsSent('GetObject'), 1);
    await read(reader, id);
    assert.equal(reader.requestsSent('GetObject'), 1, 'then it is served from the cache');
  });

  it('keys spread over many prefixes', async () => {
    const store = await open(cacheDir());
    const ids = Array.from({ length: 256 }, (_, i) => blobId(0, i + 1));
    for (const id of ids) await write(store, id, 0, Buffer.from([1]));
    await store.sync(ids);
    const keys = await keysInBucket();
    assert.equal(keys.length, ids.length);
    for (const key of keys) assert.match(key, /^arbor\/[0-9a-f]{4}\/[0-9a-f]{12}$/);
    const prefixes = new Set(keys.map((key) => key.split('/')[1]));
    assert.ok(prefixes.size >= 250, `256 consecutive ids fall under ${prefixes.size} distinct prefixes`);
    assert.deepEqual(
      keys.map((key) => idOfKey('arbor/', key)).sort((a, b) => a! - b!),
      ids,
    );
  });

  it('a deleted blob is gone from the list and the bucket and reads as zeros; deletes go in batches of 1000 keys', async () => {
    const store = await open(cacheDir());
    const [a, b, c] = [blobId(1, 1), blobId(1, 2), blobId(1, 3)];
    for (const id of [a, b, c]) await write(store, id, 0, Buffer.alloc(8 * KiB, id % 251));
    await store.sync([a, b]);
    const unknown = Array.from({ length: 2497 }, (_, i) => blobId(3, 5000 + i));
    await store.delete([a, c, ...unknown]);
    assert.equal(store.requestsSent('DeleteObjects'), 3, '2500 keys in batches of at most 1000');
    assert.deepEqual(await store.list(), [b]);
    assert.equal(await headStatus(objectKey('arbor/', a)), 404);
    assert.ok((await read(store, a)).equals(Buffer.alloc(8 * KiB)));
    assert.ok((await read(store, c)).equals(Buffer.alloc(8 * KiB)), 'a deleted staged blob is gone too');
    const fresh = await open(cacheDir());
    assert.ok((await read(fresh, a)).equals(Buffer.alloc(8 * KiB)));
    assert.ok((await read(fresh, b)).equals(Buffer.alloc(8 * KiB, b % 251)));
    assert.deepEqual(await fresh.usage(), { blobs: 1, bytes: 8 * KiB });
    assert.equal(await fresh.availableBytes(), undefined);
  });

  it('stores under different prefixes of one bucket see only their own blobs', async () => {
    const one = await open(cacheDir(), { url: urlOf(s3.bucket, 'one') });
    const root = await open(cacheDir(), { url: `s3://${s3.bucket}?endpoint=${suite.rgw.endpoint}` });
    await write(one, blobId(0, 1), 0, Buffer.from('one'));
    await write(root, blobId(0, 2), 0, Buffer.from('root'));
    await one.sync([blobId(0, 1)]);
    await root.sync([blobId(0, 2)]);
    assert.deepEqual(await one.list(), [blobId(0, 1)]);
    assert.deepEqual(await root.list(), [blobId(0, 2)], "the root store ignores keys under another store's prefix");
  });

  it('opening creates a missing bucket; denied credentials and an unreachable endpoint fail with errors naming the bucket and endpoint', async () => {
    const bucket = `${s3.bucket}-new`;
    await open(cacheDir(), { bucket });
    await s3.client.send(new HeadBucketCommand({ Bucket: bucket }));

    const secret = process.env.AWS_SECRET_ACCESS_KEY!;
    process.env.AWS_SECRET_ACCESS_KEY = 'not-the-secret-0123456789';
    try {
      await assert.rejects(
        open(cacheDir(), { bucket: s3.bucket }),
        (err: unknown) =>
          isArborError(err, 'failed-precondition') &&
          err.message.startsWith(`s3://${s3.bucket}/arbor/ at ${suite.rgw.endpoint}: checking that the bucket exists failed: access denied (HTTP 403`) &&
          !err.message.includes('not-the-secret') &&
          !err.message.includes(secret),
      );
    } finally {
      process.env.AWS_SECRET_ACCESS_KEY = secret;
    }

    // No credentials anywhere in the default chain.
    const hidden = ['AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_EC2_METADATA_DISABLED', 'AWS_SHARED_CREDENTIALS_FILE', 'AWS_CONFIG_FILE', 'AWS_PROFILE'];
    const kept = Object.fromEntries(hidden.map((name) => [name, process.env[name]]));
    for (const name of hidden) delete process.env[name];
    Object.assign(process.env, {
      AWS_EC2_METADATA_DISABLED: 'true',
      AWS_SHARED_CREDENTIALS_FILE: '/nonexistent/credentials',
      AWS_CONFIG_FILE: '/nonexistent/config',
    });
    try {
      await assert.rejects(
        open(cacheDir()),
        (err: unknown) =>
          isArborError(err, 'failed-precondition') && /failed: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY/.test(err.message),
      );
    } finally {
      for (const name of hidden) {
        if (kept[name] === undefined) delete process.env[name];
        else process.env[name] = kept[name];
      }
    }

    const t0 = Date.now();
    await assert.rejects(
      open(cacheDir(), { url: `s3://${s3.bucket}/arbor?endpoint=http://127.0.0.1:9` }),
      (err: unknown) =>
        isArborError(err, 'unavailable') &&
        /^s3:\/\/[a-z0-9-]+\/arbor\/ at http:\/\/127\.0\.0\.1:9: checking that the bucket exists failed after \d tries \(.*ECONNREFUSED/.test(err.message),
    );
    assert.ok(Date.now() - t0 < 10_000, 'bounded retries');
    // A failed open lets go of its cache directory.
    const dir = cacheDir();
    await assert.rejects(open(dir, { url: `s3://${s3.bucket}/arbor?endpoint=http://127.0.0.1:9` }));
    await open(dir);
  });

  it('an endpoint that accepts connections and never answers fails requests after the timeout and bounded tries, not never', async () => {
    const silent = await silentServer();
    try {
      const t0 = Date.now();
      await assert.rejects(
        open(cacheDir(), { url: `s3://${s3.bucket}/arbor?endpoint=http://127.0.0.1:${silent.port}`, requestTimeoutMs: 300 }),
        (err: unknown) => isArborError(err, 'unavailable') && /checking that the bucket exists failed after 3 tries \(TimeoutError/.test(err.message),
      );
      const elapsed = Date.now() - t0;
      assert.ok(elapsed >= 900 && elapsed < 5_000, `failed after ${elapsed} ms`);
    } finally {
      await silent.close();
    }
  });

  describe('PutObject and GetObject on their own path, signed here (no SDK middleware)', () => {
    const clients: S3Http[] = [];
    const servers: http.Server[] = [];
    afterEach(async () => {
      for (const client of clients.splice(0)) client.destroy();
      for (const server of servers.splice(0)) await new Promise((resolve) => server.close(resolve));
    });
    const body = Buffer.from(Array.from({ length: 70_000 }, (_, i) => (i * 31) % 251));
    const md5 = crypto.createHash('md5').update(body).digest();
    const putter = (location: BlobsLocation, options: Partial<S3HttpOptions> = {}) => {
      const tries: Array<number | undefined> = [];
      const put = new S3Http({
        location,
        credentials: async () => ({ accessKeyId: process.env.AWS_ACCESS_KEY_ID!, secretAccessKey: process.env.AWS_SECRET_ACCESS_KEY! }),
        maxSockets: 8,
        maxAttempts: 3,
        connectTimeoutMs: 1_000,
        requestTimeoutMs: 300,
        socketIdleTimeoutMs: 300,
        onTry: (_operation, _seconds, status) => tries.push(status),
        ...options,
      });
      clients.push(put);
      return { put, tries };
    };
    /** An HTTP server on loopback that answers each request as `answer` says, and keeps what it was sent. */
    const fakeS3 = async (answer: (n: number, request: http.IncomingMessage, response: http.ServerResponse) => void) => {
      const seen: Array<{ path: string; headers: http.IncomingHttpHeaders; body: Buffer }> = [];
      const server = http.createServer((request, response) => {
        const chunks: Buffer[] = [];
        request.on('data', (chunk: Buffer) => chunks.push(chunk));
        request.on('end', () => {
          seen.push({ path: request.url!, headers: request.headers, body: Buffer.concat(chunks) });
          answer(seen.length, request, response);
        });
      });
      servers.push(server);
      await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
      const location = parseBlobsUrl(`s3://fake-bucket/arbor?endpoint=http://127.0.0.1:${(server.address() as net.AddressInfo).port}&region=us-east-1`);
      return { location, seen };
    };
    const s3Error = (response: http.ServerResponse, status: number, code: string) => {
      response.writeHead(status, { 'content-type': 'application/xml' });
      response.end(`<?xml version="1.0" encoding="UTF-8"?><Error><Code>${code}</Code><Message>${code} said the test</Message></Error>`);
    };
    const isPutError = (status: number | undefined, name: string, attempts: number) => (err: unknown) =>
      err instanceof S3HttpError && err.$metadata.httpStatusCode === status && err.name === name && err.$metadata.attempts === attempts;

    it('a PUT signed here lands on RGW with its bytes; write-once holds; a wrong secret is refused once, not tried again', async () => {
      const location = parseBlobsUrl(urlOf(s3.bucket));
      const { put, tries } = putter(location);
      await put.put('arbor/direct/a+b c', body, md5, true);
      const got = await s3.client.send(new GetObjectCommand({ Bucket: s3.bucket, Key: 'arbor/direct/a+b c' }));
      assert.ok(Buffer.from(await got.Body!.transformToByteArray()).equals(body), 'the bytes, under the key as given');
      await assert.rejects(put.put('arbor/direct/a+b c', body, md5, true), isPutError(412, 'PreconditionFailed', 1));
      await assert.rejects(put.put('arbor/direct/bad-md5', body, crypto.createHash('md5').update('other').digest(), true), isPutError(400, 'BadDigest', 1));
      const wrong = putter(location, { credentials: async () => ({ accessKeyId: process.env.AWS_ACCESS_KEY_ID!, secretAccessKey: 'not-the-secret' }) });
      await assert.rejects(wrong.put.put('arbor/direct/denied', body, md5, true), isPutError(403, 'SignatureDoesNotMatch', 1));
      assert.deepEqual(tries, [200, 412, 400]);
      assert.deepEqual(wrong.tries, [403]);
    });

    it('a GET signed here reads an object whole or a range of it; a missing one is undefined, asked once', async () => {
      const location = parseBlobsUrl(urlOf(s3.bucket));
      const { put, tries } = putter(location);
      await put.put('arbor/direct/read me', body, md5, true);
      assert.ok((await put.get('arbor/direct/read me'))!.equals(body));
      assert.ok((await put.get('arbor/direct/read me', 'bytes=65530-65545'))!.equals(body.subarray(65530, 65546)));
      assert.equal(await put.get('arbor/direct/nothing here'), undefined);
      assert.deepEqual(tries, [200, 200, 206, 404]);
    });

    it('a GET whose answer ends short of its Content-Length is tried again', async () => {
      const { location, seen } = await fakeS3((n, request, response) => {
        response.writeHead(200, { 'content-length': String(body.length) });
        if (n === 1) {
          response.write(body.subarray(0, 1000));
          setTimeout(() => request.socket.destroy(), 20);
        } else response.end(body);
      });
      const { put, tries } = putter(location);
      assert.ok((await put.get('arbor/k'))!.equals(body));
      assert.equal(seen.length, 2);
      assert.deepEqual(tries, [undefined, 200]);
      assert.equal(seen[1].headers['x-amz-content-sha256'], crypto.createHash('sha256').digest('hex'), 'a GET signs the hash of no body');
    });

    it('sends the key encoded once, the MD5, If-None-Match, the signed hash of the body, and a SigV4 signature', async () => {
      const { location, seen } = await fakeS3((_n, _request, response) => response.end());
      await putter(location).put.put('arbor/packs/a+b', body, md5, true);
      await putter(location).put.put('arbor/plain', body, md5, false);
      const [first, second] = seen;
      assert.equal(first.path, '/fake-bucket/arbor/packs/a%2Bb');
      assert.ok(first.body.equals(body));
      assert.equal(first.headers['content-md5'], md5.toString('base64'));
      assert.equal(first.headers['if-none-match'], '*');
      assert.equal(first.headers['x-amz-content-sha256'], crypto.createHash('sha256').update(body).digest('hex'));
      assert.match(
        String(first.headers.authorization),
        /^AWS4-HMAC-SHA256 Credential=[^/]+\/\d{8}\/us-east-1\/s3\/aws4_request, SignedHeaders=[a-z0-9;-]*if-none-match[a-z0-9;-]*, Signature=[0-9a-f]{64}$/,
      );
      assert.equal(second.headers['if-none-match'], undefined);
    });

    it('503 SlowDown, 500 and dropped connections are tried again up to three tries; a 403 is not', async () => {
      const slow = await fakeS3((n, _request, response) => (n === 1 ? s3Error(response, 503, 'SlowDown') : response.end()));
      const once = putter(slow.location);
      await once.put.put('arbor/k', body, md5, true);
      assert.deepEqual(once.tries, [503, 200]);

      const failing = await fakeS3((_n, _request, response) => s3Error(response, 500, 'InternalError'));
      const thrice = putter(failing.location);
      await assert.rejects(thrice.put.put('arbor/k', body, md5, true), isPutError(500, 'InternalError', 3));
      assert.equal(failing.seen.length, 3);

      const denied = await fakeS3((_n, _request, response) => s3Error(response, 403, 'AccessDenied'));
      await assert.rejects(putter(denied.location).put.put('arbor/k', body, md5, true), isPutError(403, 'AccessDenied', 1));
      assert.equal(denied.seen.length, 1);

      const dropping = await fakeS3((_n, request) => request.socket.destroy());
      const dropped = putter(dropping.location);
      await assert.rejects(
        dropped.put.put('arbor/k', body, md5, true),
        (err: unknown) => err instanceof S3HttpError && err.$metadata.httpStatusCode === undefined && err.$metadata.attempts === 3 && err.code === 'ECONNRESET',
      );
      assert.deepEqual(dropped.tries, [undefined, undefined, undefined]);
    });

    it('a server that never answers fails each try at the request timeout: three tries, then a TimeoutError', async () => {
      const silent = await silentServer();
      const location = parseBlobsUrl(`s3://silent/arbor?endpoint=http://127.0.0.1:${silent.port}&region=us-east-1`);
      const { put, tries } = putter(location);
      const t0 = Date.now();
      try {
        await assert.rejects(put.put('arbor/k', body, md5, true), isPutError(undefined, 'TimeoutError', 3));
      } finally {
        await silent.close();
      }
      const elapsed = Date.now() - t0;
      assert.ok(elapsed >= 900 && elapsed < 5_000, `failed after ${elapsed} ms`);
      assert.deepEqual(tries, [undefined, undefined, undefined]);
    });
  });
});
