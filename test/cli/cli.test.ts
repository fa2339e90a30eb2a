import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { Random } from '../support/random';
import { run } from '../support/run';
import { tempDir } from '../support/tmp';
import { cliPath as cli } from '../support/arbor-server';

const MiB = 1024 * 1024;

describe('the arbor CLI', function () {
  this.timeout(120_000);
  let dir: { dir: string; cleanup: () => void };
  let dataDir: string;
  const arbor = (...args: string[]) => {
    const result = spawnSync(process.execPath, [cli, '--data-dir', dataDir, ...args], { encoding: 'utf8', maxBuffer: 256 * MiB });
    return { status: result.status, stdout: result.stdout, stderr: result.stderr };
  };
  const ok = (...args: string[]) => {
    const result = arbor(...args);
    assert.equal(result.status, 0, `arbor ${args.join(' ')} failed: ${result.stderr}`);
    return result.stdout;
  };

  /** Like arbor(), without blocking the event loop (a server child is running). */
  const runAsync = async (...args: string[]) => run(process.execPath, [cli, '--data-dir', dataDir, ...args]);

  before(() => {
    dir = tempDir();
    dataDir = path.join(dir.dir, 'data');
  });
  after(() => dir.cleanup());

  it('round trip: import, snapshot, clone, overwrite part of the clone, export each byte-exact', () => {
    const rng = new Random(42);
    const image = rng.bytes(64 * MiB);
    // Zero runs in the image become holes.
    image.fill(0, 8 * MiB, 12 * MiB);
    const imageFile = path.join(dir.dir, 'image.raw');
    fs.writeFileSync(imageFile, image);
    const patch = rng.bytes(3 * MiB + 1234);
    const patchFile = path.join(dir.dir, 'patch.raw');
    fs.writeFileSync(patchFile, patch);

    assert.match(ok('volume', 'create', 'golden', '--size', '80MiB'), /volume golden \(vol-[0-9a-f]+\): 80 MiB, extent size 64 KiB/);
    assert.match(ok('volume', 'import', 'golden', imageFile), /imported 67108864 bytes \(64 MiB\) in .* into volume golden/);
    ok('snapshot', 'create', 'golden@v1');
    ok('volume', 'clone', 'golden@v1', 'vm');
    ok('volume', 'import', 'vm', patchFile);

    const expectedGolden = Buffer.concat([image, Buffer.alloc(16 * MiB)]);
    const expectedVm = Buffer.from(expectedGolden);
    patch.copy(expectedVm, 0);
    for (const [source, expected] of [
      ['golden', expectedGolden],
      ['golden@v1', expectedGolden],
      ['vm', expectedVm],
    ] as const) {
      const out = path.join(dir.dir, `${source}.raw`);
      assert.match(ok('volume', 'export', source, out), new RegExp(`exported ${source} to .*: 83886080 bytes`));
      assert.ok(fs.readFileSync(out).equals(expected), `${source} exported to a file is byte-exact`);
      const piped = spawnSync(process.execPath, [cli, '--data-dir', dataDir, 'volume', 'export', source, '-'], { maxBuffer: 256 * MiB });
      assert.equal(piped.status, 0);
      assert.ok(piped.stdout.equals(expected), `${source} exported to stdout is byte-exact`);
      const blocks = fs.statSync(out).blocks * 512;
      assert.ok(blocks < 70 * MiB, `the exported file is sparse (${blocks} bytes on disk)`);
    }
    const info = JSON.parse(ok('volume', 'info', 'golden', '--json'));
    assert.equal(info.allocatedBytes, 60 * MiB, 'the 4 MiB zero run and the unwritten tail are holes');
    assert.deepEqual(
      info.snapshots.map((s: { name: string }) => s.name),
      ['v1'],
    );
    const vm = JSON.parse(ok('volume', 'info', 'vm', '--json'));
    assert.deepEqual(vm.lineage, [{ volumeId: info.id, volume: 'golden', snapshotId: info.snapshots[0].id, snapshot: 'v1' }]);
    assert.equal(vm.exclusiveBytes, 48 * 65536 + 4096, 'the clone owns only the 48 extents it overwrote whole and the one page it wrote of the 49th');
  });

  it('imports from standard input', async () => {
    ok('volume', 'create', 'piped', '--size', '4MiB');
    const data = new Random(7).bytes(MiB + 17);
    const child = spawn(process.execPath, [cli, '--data-dir', dataDir, 'volume', 'import', 'piped', '-']);
    child.stdin.end(data);
    const status = await new Promise((resolve) => child.on('exit', resolve));
    assert.equal(status, 0);
    const exported = spawnSync(process.execPath, [cli, '--data-dir', dataDir, 'volume', 'export', 'piped', '-'], { maxBuffer: 16 * MiB }).stdout;
    assert.ok(exported.subarray(0, data.length).equals(data));
  });

  it('lists volumes and snapshots as tables and as documented JSON', () => {
    assert.match(ok('volume', 'list'), /^NAME +SIZE +EXTENT +PARENT +CREATED\n/);
    const volumes = JSON.parse(ok('volume', 'list', '--json'));
    const vm = volumes.find((v: { name: string }) => v.name === 'vm');
    assert.deepEqual(Object.keys(vm), ['id', 'name', 'sizeBytes', 'extentSizeBytes', 'createdAt', 'parent']);
    assert.equal(vm.parent.snapshot, 'v1');
    const snapshots = JSON.parse(ok('snapshot', 'list', 'golden', '--json'));
    assert.deepEqual(Object.keys(snapshots[0]), ['id', 'name', 'volumeId', 'volume', 'sizeBytes', 'extentSizeBytes', 'createdAt']);
    assert.match(ok('snapshot', 'list'), /golden@v1/);
  });

  it('errors name the volume or snapshot, say what to do, and exit non-zero', () => {
    const cases: Array<[string[], number, RegExp]> = [
      [['volume', 'info', 'nope'], 1, /volume nope does not exist/],
      [
        ['volume', 'resize', 'golden', '--size', '1MiB'],
        1,
        /volume golden: requested size 1048576 is smaller than its current size 83886080; shrinking is not supported/,
      ],
      [['volume', 'create', 'golden', '--size', '1GiB'], 1, /volume golden already exists with size 83886080/],
      [['volume', 'create', 'x', '--size', 'lots'], 2, /--size "lots" is not a size/],
      [['volume', 'create', 'x', '--size', '1000'], 1, /not a multiple of 512 bytes/],
      [['volume', 'export', 'vm@v1', '-'], 1, /snapshot vm@v1 does not exist; see 'arbor snapshot list vm'/],
      [['snapshot', 'create', 'golden'], 2, /names no snapshot: write NAME@SNAP/],
      [['snapshot', 'rm', 'golden@nope'], 1, /snapshot golden@nope does not exist/],
      [['volume', 'import', 'piped', path.join(dir.dir, 'image.raw')], 1, /larger than volume piped .*resize the volume first/],
      [['volume', 'import', 'piped', '/does/not/exist'], 1, /ENOENT/],
      [['volume', 'rm'], 2, /missing NAME/],
    ];
    for (const [args, status, pattern] of cases) {
      const result = arbor(...args);
      assert.equal(result.status, status, `arbor ${args.join(' ')} exits ${status}: ${result.stderr}`);
      assert.match(result.stderr, pattern);
    }
  });

  it('gc reclaims what a deleted snapshot held, and rm frees a volume', () => {
    ok('volume', 'rm', 'vm');
    ok('volume', 'rm', 'golden');
    ok('volume', 'rm', 'piped');
    assert.match(ok('gc'), /gc: freed 0 of \d+ blobs/);
    ok('snapshot', 'rm', 'golden@v1');
    assert.match(ok('gc'), /gc: freed [1-9]\d* of \d+ blobs \(0 in use\)/);
    assert.equal(ok('volume', 'list', '--json').trim(), '[]');
  });

  it('while serve holds the data directory the CLI works through it; a second serve gets a clear error; SIGTERM stops it cleanly', async () => {
    const server = spawn(process.execPath, [cli, '--data-dir', dataDir, 'serve', '--nbd-socket', path.join(dir.dir, 'nbd.sock')], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let log = '';
    await new Promise<void>((resolve) => server.stderr.on('data', (chunk) => ((log += chunk), log.includes('arbor serving') && resolve())));
    const second = arbor('serve');
    assert.equal(second.status, 1);
    assert.match(second.stderr, new RegExp(`in use by another process \\(pid ${server.pid}\\)`));
    const created = await runAsync('volume', 'create', 'through-server', '--size', '1MiB');
    assert.equal(created.status, 0, created.stderr);
    const listed = await runAsync('volume', 'list', '--json');
    assert.deepEqual(
      JSON.parse(listed.stdout).map((v: { name: string }) => v.name),
      ['through-server'],
    );
    server.kill('SIGTERM');
    const status = await new Promise((resolve) => server.on('exit', resolve));
    assert.equal(status, 0);
    assert.match(log, /"message":"stopped: every volume committed and the store closed"/);
    assert.equal(JSON.parse(ok('volume', 'list', '--json')).length, 1, 'what was created through the server is there after it stopped');
  });
});
