import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { absent, Catalog, put, unchanged, WatchEvent } from '../../store/catalog/catalog';
import { EtcdCatalog, parseStoreUrl } from '../../store/catalog/etcd';
import { SqliteCatalog } from '../../store/catalog/sqlite';
import { etcdWatchRetryMostMs } from '../../store/limits';
import { etcdForSuite, sleep } from '../support/etcd';
import { tempDir } from '../support/tmp';

const until = async (what: string, check: () => boolean, timeoutMs = 5000) => {
  const end = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
};

/** The same contract, checked on the embedded catalog and on a real etcd. */
function catalogContract(name: string, open: () => Promise<Catalog>, reopen?: () => Promise<Catalog>) {
  describe(`the catalog contract: ${name}`, function () {
    this.timeout(30_000);
    let catalog: Catalog;
    beforeEach(async () => (catalog = await open()));
    afterEach(async () => catalog.close());

    it('get, getMany and list see what a transaction wrote, each key with the revision that wrote it', async () => {
      const first = await catalog.txn([], [put('things/a', 1), put('things/b', 2)]);
      assert.ok(first.succeeded);
      const second = await catalog.txn([], [put('things/c', 3), put('other/x', 9)]);
      assert.ok(second.revision > first.revision);
      assert.deepEqual(await catalog.get('things/a'), { key: 'things/a', value: '1', modRevision: first.revision });
      assert.equal(await catalog.get('things/zz'), undefined);
      assert.deepEqual(await catalog.getMany(['things/c', 'things/zz', 'things/a']), [
        { key: 'things/c', value: '3', modRevision: second.revision },
        undefined,
        { key: 'things/a', value: '1', modRevision: first.revision },
      ]);
      const listed = await catalog.list('things/');
      assert.deepEqual(
        listed.map((e) => [e.key, e.value, e.modRevision]),
        [
          ['things/a', '1', first.revision],
          ['things/b', '2', first.revision],
          ['things/c', '3', second.revision],
        ],
      );
      assert.deepEqual(
        (await catalog.list('things/', { after: 'things/a', limit: 1 })).map((e) => e.key),
        ['things/b'],
      );
      assert.deepEqual(
        (await catalog.list('things/', { after: 'things/c' })).map((e) => e.key),
        [],
      );
    });

    it('a transaction applies only when every compare holds, and then all of its ops', async () => {
      await catalog.txn([], [put('cas/k', 'v1')]);
      const entry = (await catalog.get('cas/k'))!;
      const lost = await catalog.txn([unchanged(entry), absent('cas/other')], [put('cas/k', 'v2'), put('cas/other', 'x')]);
      assert.ok(lost.succeeded);
      const stale = await catalog.txn([unchanged(entry)], [put('cas/k', 'v3'), { type: 'delete', key: 'cas/other' }]);
      assert.equal(stale.succeeded, false);
      assert.equal((await catalog.get('cas/k'))!.value, '"v2"');
      assert.ok(await catalog.get('cas/other'), 'nothing of a failed transaction applies');
      assert.equal((await catalog.txn([absent('cas/k')], [put('cas/k', 'v4')])).succeeded, false);
    });

    it('a transaction that fails reads the keys it was given instead, at its revision; one that applies reads nothing', async () => {
      const written = await catalog.txn([], [put('else/a', 'a1'), put('else/b', 'b1')]);
      const [a, b] = await catalog.getMany(['else/a', 'else/b']);
      const failed = await catalog.txn([unchanged(a!), absent('else/b')], [put('else/a', 'a2')], ['else/b', 'else/none', 'else/a']);
      assert.equal(failed.succeeded, false);
      assert.equal(failed.revision, written.revision);
      assert.deepEqual(failed.read, [b, undefined, a], 'each key asked, in order, as get reads it');
      assert.equal((await catalog.get('else/a'))!.value, '"a1"', 'nothing of the failed transaction applies');
      const applied = await catalog.txn([unchanged(a!)], [put('else/a', 'a3')], ['else/b']);
      assert.ok(applied.succeeded);
      assert.equal(applied.read, undefined);
      assert.deepEqual(await catalog.get('else/a'), { key: 'else/a', value: '"a3"', modRevision: applied.revision });
    });

    it('watchers see committed changes in order, deletes included', async () => {
      const seen: WatchEvent[] = [];
      const stop = catalog.watch('watched/', (events) => seen.push(...events));
      await new Promise((r) => setTimeout(r, 200)); // etcd watches are created asynchronously
      await catalog.txn([], [put('watched/a', 1)]);
      await catalog.txn([], [put('watched/a', 2), put('unwatched/b', 1)]);
      await catalog.txn([], [{ type: 'delete', key: 'watched/a' }]);
      await until('three events', () => seen.length >= 3);
      stop();
      assert.deepEqual(
        seen.map((e) => [e.type, e.key, e.value]),
        [
          ['put', 'watched/a', '1'],
          ['put', 'watched/a', '2'],
          ['delete', 'watched/a', undefined],
        ],
      );
      assert.ok(seen[0].modRevision < seen[1].modRevision && seen[1].modRevision < seen[2].modRevision);
    });

    it('keys attached to a lease vanish when it is revoked; others stay', async () => {
      const lease = await catalog.grantLease(5000);
      await catalog.txn([], [put('leased/a', 1, lease), put('leased/b', 2)]);
      assert.ok(await catalog.get('leased/a'));
      await lease.revoke();
      assert.equal(await catalog.get('leased/a'), undefined);
      assert.ok(await catalog.get('leased/b'));
    });

    if (reopen) {
      it('keys of a lease whose holder went away are gone; the rest is durable', async () => {
        const lease = await catalog.grantLease(2000);
        await catalog.txn([], [put('held/a', 1, lease), put('held/b', 2)]);
        await catalog.close();
        catalog = await reopen();
        for (let i = 0; i < 100 && (await catalog.get('held/a')); i++) await new Promise((r) => setTimeout(r, 100));
        assert.equal(await catalog.get('held/a'), undefined);
        assert.equal((await catalog.get('held/b'))!.value, '2');
      });
    }
  });
}

describe('catalogs', () => {
  describe('embedded (SQLite)', () => {
    let dir: { dir: string; cleanup: () => void };
    before(() => (dir = tempDir()));
    after(() => dir.cleanup());
    let n = 0;
    let current = '';
    catalogContract(
      'SQLite',
      async () => SqliteCatalog.open(path.join(dir.dir, `c${(current = String(++n))}.sqlite`), () => 'test'),
      async () => SqliteCatalog.open(path.join(dir.dir, `c${current}.sqlite`), () => 'test'),
    );
  });

  describe('distributed (etcd)', () => {
    const suite = etcdForSuite(1);
    let n = 0;
    let current = '';
    const location = (id: string) => parseStoreUrl(`etcd://${suite.cluster.endpoints.map((e) => new URL(e).host).join(',')}/t${id}`);
    catalogContract(
      'etcd',
      async () => EtcdCatalog.open(location((current = String(++n)))),
      async () => EtcdCatalog.open(location(current)),
    );

    it('parses store URLs and refuses bad ones precisely', () => {
      assert.deepEqual(parseStoreUrl('etcd://10.0.0.1:2379,10.0.0.2:2379/prod'), {
        endpoints: ['http://10.0.0.1:2379', 'http://10.0.0.2:2379'],
        prefix: '/prod/arbor/',
      });
      assert.deepEqual(parseStoreUrl('etcds://etcd.example:2379'), { endpoints: ['https://etcd.example:2379'], prefix: '/arbor/' });
      assert.throws(() => parseStoreUrl('http://x:1/p'), /--store "http:\/\/x:1\/p" is not etcd:\/\/HOST:PORT/);
      assert.throws(() => parseStoreUrl('etcd://user:pw@x:1/p'), /credentials do not go in the URL; set ETCD_USERNAME and ETCD_PASSWORD/);
      assert.throws(() => parseStoreUrl('etcd://x/p'), /"x" is not HOST:PORT/);
      assert.throws(() => parseStoreUrl('etcd://x:1/p q'), /is not etcd:|may hold letters/);
    });

    it('a lease whose holder stops keeping it alive ends, and its keys go', async () => {
      const catalog = await EtcdCatalog.open(location('expiry'));
      const watcher = await EtcdCatalog.open(location('expiry'));
      try {
        const lease = await catalog.grantLease(1000);
        await catalog.txn([], [put('owners/v', 'me', lease)]);
        await catalog.close(); // stops keep-alives without revoking
        const start = Date.now();
        while ((await watcher.get('owners/v')) && Date.now() - start < 10_000) await new Promise((r) => setTimeout(r, 100));
        assert.equal(await watcher.get('owners/v'), undefined, 'the key went with its lease');
      } finally {
        await watcher.close();
      }
    });

    it('an unreachable etcd is a clear error, not a hang', async () => {
      await assert.rejects(EtcdCatalog.open(parseStoreUrl('etcd://127.0.0.1:1/x')), /cannot reach etcd at http:\/\/127.0.0.1:1: .*check --store/);
    });

    // It stops the suite's etcd for a while, and starts it again.
    it('after a long outage a watch is back within its retry bound, and a closed catalog lets the process exit at once', async function () {
      this.timeout(60_000);
      const outageMs = 15_000;
      const url = `etcd://${suite.cluster.endpoints.map((e) => new URL(e).host).join(',')}/toutage`;
      // A process of its own: what matters is when it can exit, which only its own event loop shows.
      const child = spawn(
        process.execPath,
        [
          '-e',
          `const [modulePath, url] = process.argv.slice(1);
           const { EtcdCatalog, parseStoreUrl } = require(modulePath);
           EtcdCatalog.open(parseStoreUrl(url)).then((catalog) => {
             catalog.watch('w/', (events) => events.forEach((e) => process.stdout.write('event ' + e.key + '\\n')));
             process.stdin.on('end', () => void catalog.close().then(() => process.stdout.write('closed\\n')));
             process.stdin.resume();
           });`,
          path.join(__dirname, '../../store/catalog/etcd.js'),
          url,
        ],
        { stdio: ['pipe', 'pipe', 'inherit'] },
      );
      let out = '';
      child.stdout.on('data', (chunk) => (out += chunk));
      const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
      const putKey = async (key: string) => {
        const writer = await EtcdCatalog.open(parseStoreUrl(url));
        try {
          await writer.txn([], [put(key, 1)]);
        } finally {
          await writer.close();
        }
      };
      // The watch misses what was put before it was up: put until it sees one.
      for (let tries = 0; !out.includes('event w/before'); tries++) {
        assert.ok(tries < 20, 'the watch sees a key within 10 s of the start');
        await putKey('w/before');
        await sleep(500);
      }
      const member = suite.cluster.members[0];
      await member.kill();
      await sleep(outageMs);
      await member.start();
      await suite.cluster.waitHealthy();
      const backAt = Date.now();
      await putKey('w/after');
      await until('the watch sees a key put after the outage', () => out.includes('event w/after'), etcdWatchRetryMostMs + 3000);
      const seenMs = Date.now() - backAt;
      child.stdin.end();
      await until('the catalog closed', () => out.includes('closed'), 10_000);
      const closedAt = Date.now();
      await Promise.race([exited, sleep(10_000)]);
      const exitMs = Date.now() - closedAt;
      if (child.exitCode === null) child.kill('SIGKILL');
      console.log(
        `      after a ${outageMs} ms outage: the watch saw a new key ${seenMs} ms after etcd was back; the process exited ${exitMs} ms after the close`,
      );
      assert.ok(exitMs < etcdWatchRetryMostMs + 1000, `the process exited ${exitMs} ms after the catalog closed`);
    });
  });
});
