import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { serverForSuite } from '../support/arbor-server';
import { Random } from '../support/random';
import { ok, run } from '../support/run';

const MiB = 1024 * 1024;

/**
 * Arbor's NBD server against the real clients users attach with: qemu-io and
 * qemu-img (qemu-utils), nbdinfo, nbdcopy and nbdsh (libnbd). One server for the
 * whole suite, started with `arbor serve` in a temporary directory, stopped by PID.
 */
describe('NBD interop with qemu and libnbd', function () {
  this.timeout(180_000);
  const suite = serverForSuite();
  const file = (name: string) => path.join(suite.dir, name);

  describe('qemu-io and qemu-img', () => {
    it('qemu-io writes patterns at any offset and reads them back; unwritten ranges read as zeros', async () => {
      await suite.server.cliOk('volume', 'create', 'qio', '--size', '64MiB');
      const out = await ok('qemu-io', [
        '-f',
        'raw',
        '-c',
        'write -P 0x5a 0 1M',
        '-c',
        'write -P 0xa5 4097 3000',
        '-c',
        'write -P 0x11 63M 1M',
        '-c',
        'read -P 0x5a 0 4097',
        '-c',
        'read -P 0xa5 4097 3000',
        '-c',
        'read -P 0x5a 7097 1041479',
        '-c',
        'read -P 0 1M 62M',
        '-c',
        'read -P 0x11 63M 1M',
        suite.server.uri('qio'),
      ]);
      assert.doesNotMatch(out, /Pattern verification failed|error/i, out);
    });

    it('qemu-io with many requests in flight (aio) reads back what it wrote', async () => {
      await suite.server.cliOk('volume', 'create', 'aio', '--size', '16MiB', '--extent-size', '4KiB');
      const commands: string[] = [];
      for (let i = 0; i < 64; i++) commands.push('-c', `aio_write -P ${i + 1} ${i * 256 * 1024} 256k`);
      commands.push('-c', 'aio_flush');
      for (let i = 0; i < 64; i++) commands.push('-c', `aio_read -P ${i + 1} ${i * 256 * 1024} 256k`);
      commands.push('-c', 'aio_flush');
      const out = await ok('qemu-io', ['-f', 'raw', ...commands, suite.server.uri('aio')]);
      assert.doesNotMatch(out, /Pattern verification failed|error/i, out);
    });

    it('qemu-img compare: a raw file copied into a volume is identical, and one changed byte is found', async () => {
      const rng = new Random(3);
      const image = rng.bytes(32 * MiB);
      image.fill(0, 5 * MiB, 9 * MiB);
      fs.writeFileSync(file('compare.raw'), image);
      await suite.server.cliOk('volume', 'create', 'cmp', '--size', '32MiB');
      await ok('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', file('compare.raw'), suite.server.uri('cmp')]);
      assert.match(await ok('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', file('compare.raw'), suite.server.uri('cmp')]), /Images are identical/);
      await ok('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 12345678 1', suite.server.uri('cmp')]);
      const differs = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', file('compare.raw'), suite.server.uri('cmp')]);
      assert.equal(differs.status, 1);
      // qemu-img reports the sector (512 bytes) holding the first difference.
      assert.match(differs.stdout, /Content mismatch at offset 12345344!/);
    });

    it('qemu-img convert: a qcow2 golden image into a volume and back out, byte-exact, holes kept', async () => {
      await ok('qemu-img', ['create', '-q', '-f', 'qcow2', file('golden.qcow2'), '256M']);
      await ok('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x42 0 4M', '-c', 'write -P 0x43 100M 1M', '-c', 'write -P 0x44 255M 1M', file('golden.qcow2')]);
      await suite.server.cliOk('volume', 'create', 'golden', '--size', '256MiB');
      await ok('qemu-img', ['convert', '-n', '-f', 'qcow2', '-O', 'raw', file('golden.qcow2'), suite.server.uri('golden')]);
      await ok('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', suite.server.uri('golden'), file('out.qcow2')]);
      assert.match(await ok('qemu-img', ['compare', file('golden.qcow2'), file('out.qcow2')]), /Images are identical/);
      const info = JSON.parse(await suite.server.cliOk('volume', 'info', 'golden', '--json'));
      assert.equal(info.allocatedBytes, 6 * MiB, 'only the 6 MiB the image holds is allocated');
    });
  });

  describe('libnbd: nbdinfo, nbdcopy, nbdsh', () => {
    it('nbdinfo reports the size, the flags and the block sizes of a volume and a snapshot', async () => {
      await suite.server.cliOk('volume', 'create', 'info', '--size', '48MiB', '--extent-size', '16KiB');
      await suite.server.cliOk('snapshot', 'create', 'info@frozen');
      const volume = JSON.parse(await ok('nbdinfo', ['--json', suite.server.uri('info')]));
      const exp = volume.exports[0];
      assert.equal(exp['export-size'], 48 * MiB);
      for (const flag of ['can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_fast_zero', 'can_cache', 'can_df', 'can_multi_conn'])
        assert.equal(exp[flag], true, flag);
      assert.equal(exp.is_read_only, false);
      assert.deepEqual([exp.block_size_minimum, exp.block_size_preferred, exp.block_size_maximum], [1, 16384, 32 * MiB]);
      assert.deepEqual(exp.contexts, ['base:allocation']);
      const snapshot = JSON.parse(await ok('nbdinfo', ['--json', suite.server.uri('info@frozen')])).exports[0];
      assert.equal(snapshot.is_read_only, true);
      assert.equal(snapshot.can_trim, false);
      const list = await ok('nbdinfo', ['--list', '--json', `nbd+unix:///?socket=${suite.server.nbdSocket}`]);
      const names = JSON.parse(list).exports.map((e: { 'export-name': string }) => e['export-name']);
      assert.ok(names.includes('info') && names.includes('info@frozen'), names.join(','));
    });

    it('nbdinfo --map shows data, holes after TRIM, and allocated zeros after write-zeroes', async () => {
      await suite.server.cliOk('volume', 'create', 'map', '--size', '8MiB');
      // write -z sends WRITE_ZEROES with NO_HOLE (allocated zeros); -u lets the server punch a hole.
      await ok('qemu-io', [
        '-f',
        'raw',
        '-c',
        'write -P 1 0 8M',
        '-c',
        'discard 1M 2M',
        '-c',
        'write -z 4M 1M',
        '-c',
        'write -z -u 6M 1M',
        suite.server.uri('map'),
      ]);
      const map = JSON.parse(await ok('nbdinfo', ['--map', '--json', suite.server.uri('map')]));
      const simplified = map.map((m: { offset: number; length: number; type: number }) => [m.offset / MiB, m.length / MiB, m.type]);
      assert.deepEqual(simplified, [
        [0, 1, 0],
        [1, 2, 3],
        [3, 1, 0],
        [4, 1, 2],
        [5, 1, 0],
        [6, 1, 3],
        [7, 1, 0],
      ]);
    });

    it('nbdcopy copies whole volumes both ways with 1 MiB requests over 4 connections', async () => {
      const image = new Random(5).bytes(96 * MiB);
      image.fill(0, 10 * MiB, 30 * MiB);
      fs.writeFileSync(file('copy.raw'), image);
      await suite.server.cliOk('volume', 'create', 'copy', '--size', '96MiB');
      await ok('nbdcopy', ['--request-size=1048576', '--connections=4', '--requests=16', file('copy.raw'), suite.server.uri('copy')]);
      await ok('nbdcopy', ['--request-size=4194304', '--connections=4', suite.server.uri('copy'), file('copy.back')]);
      assert.ok(fs.readFileSync(file('copy.back')).equals(image), 'the round trip is byte-exact');
      await suite.server.cliOk('snapshot', 'create', 'copy@s');
      await ok('nbdcopy', ['--connections=2', suite.server.uri('copy@s'), file('copy.snap')]);
      assert.ok(fs.readFileSync(file('copy.snap')).equals(image));
    });

    it('nbdsh: options the way libnbd drives them (list, info, unknown export, meta contexts, simple replies, abort)', async () => {
      await suite.server.cliOk('volume', 'create', 'opts', '--size', '4MiB');
      const script = `
import nbd
uri = ${JSON.stringify(suite.server.uri('opts'))}
sock = ${JSON.stringify(suite.server.nbdSocket)}

h = nbd.NBD()
h.set_opt_mode(True)
h.connect_unix(sock)
names = []
h.opt_list(lambda name, desc: names.append(name))
assert 'opts' in names, names
h.set_export_name('no-such-volume')
try:
    h.opt_info()
    raise AssertionError('info on an unknown export succeeded')
except nbd.Error as e:
    pass
contexts = []
h.set_export_name('opts')
h.opt_list_meta_context(lambda ctx: contexts.append(ctx))
assert contexts == ['base:allocation'], contexts
h.opt_info()
assert h.get_size() == 4 * 1024 * 1024
h.opt_abort()

# Without structured replies (as the kernel client): simple replies carry the data.
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(uri)
assert not h.get_structured_replies_negotiated()
h.pwrite(b'x' * 5000, 1000)
assert h.pread(5000, 1000) == b'x' * 5000
assert h.pread(100, 0) == bytes(100)
h.flush()
h.shutdown()

# With structured replies and base:allocation.
h = nbd.NBD()
h.add_meta_context('base:allocation')
h.connect_uri(uri)
assert h.can_meta_context('base:allocation')
seen = []
def extents(metacontext, offset, entries, err):
    seen.extend(entries)
h.block_status(4 * 1024 * 1024, 0, extents)
assert seen[0] == 65536 and seen[1] == 0, seen
h.trim(65536, 0)
assert h.pread(5000, 1000) == bytes(5000)
h.zero(65536, 131072, nbd.CMD_FLAG_FAST_ZERO)
try:
    h.zero(100, 7, nbd.CMD_FLAG_FAST_ZERO)
except nbd.Error as e:
    raise AssertionError('fast zero of a hole is fast: ' + str(e))
h.pwrite(b'y' * 10, 200000)
try:
    h.zero(10, 200000 - 10 + 5, nbd.CMD_FLAG_FAST_ZERO)
    raise AssertionError('a fast zero that needs a data write succeeded')
except nbd.Error as e:
    assert e.errno == 95 or 'not fast' in str(e).lower() or 'ENOTSUP' in str(e), e
assert h.pread(10, 200000) == b'y' * 10, 'a refused fast zero changed nothing'
try:
    h.pread(10, 4 * 1024 * 1024 - 5)
    raise AssertionError('read past the end succeeded')
except nbd.Error as e:
    pass
h.shutdown()
print('ok')
`;
      // nbdsh needs Debian's python3 (python3-libnbd), not another one earlier on PATH.
      const out = await run('nbdsh', ['-c', script], { env: { ...process.env, PATH: `/usr/bin:${process.env.PATH}` } });
      assert.equal(out.status, 0, out.stderr + out.stdout);
      assert.match(out.stdout, /ok/);
    });
  });
});
