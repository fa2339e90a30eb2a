import assert from 'node:assert/strict';
import { ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { serverForSuite } from '../support/arbor-server';
import { ok, run } from '../support/run';

const MiB = 1024 * 1024;

function fioArgs(uri: string, extra: string[]): string[] {
  return ['--name=arbor', '--ioengine=nbd', `--uri=${uri}`, '--output-format=json', ...extra];
}

/** fio prints "fio: connected to NBD server" before its JSON. */
function fioJson(stdout: string): { jobs: Array<{ error: number; read: { io_bytes: number }; write: { io_bytes: number } }> } {
  return JSON.parse(stdout.slice(stdout.indexOf('{')));
}

describe('NBD with fio, a userspace attach, and snapshots while writing', function () {
  this.timeout(300_000);
  const suite = serverForSuite();

  it('fio random and sequential read/write with verify (nbd engine, queue depth 16)', async () => {
    await suite.server.cliOk('volume', 'create', 'fio', '--size', '128MiB', '--extent-size', '16KiB');
    for (const [rw, bs] of [
      ['randwrite', '4k'],
      ['write', '1m'],
      ['randrw', '8k'],
    ] as const) {
      const out = await ok(
        'fio',
        fioArgs(suite.server.uri('fio'), [
          `--rw=${rw}`,
          `--bs=${bs}`,
          '--iodepth=16',
          '--size=64M',
          '--verify=crc32c',
          '--do_verify=1',
          '--verify_fatal=1',
          '--randseed=7',
        ]),
      );
      const job = fioJson(out).jobs[0];
      assert.equal(job.error, 0, `${rw} verified without error`);
      assert.ok(job.write.io_bytes > 0 && job.read.io_bytes > 0, `${rw} wrote and read back`);
    }
  });

  it('userspace attach: nbdfuse → losetup → mkfs.ext4 → mount; files survive detach and re-attach', async () => {
    const problems = attachPrerequisites();
    assert.deepEqual(problems, [], `this machine cannot attach in userspace: ${problems.join('; ')}`);
    await suite.server.cliOk('volume', 'create', 'fs', '--size', '256MiB');
    const files = new Map<string, Buffer>();
    for (let i = 0; i < 8; i++) files.set(`file${i}.bin`, Buffer.alloc(MiB * (i + 1), i + 1));

    let attached = await attach(suite.dir, suite.server.uri('fs'));
    try {
      await ok('mkfs.ext4', ['-q', '-F', attached.device]);
      await ok('mount', [attached.device, attached.mountPoint]);
      for (const [name, data] of files) fs.writeFileSync(path.join(attached.mountPoint, name), data);
      await ok('sync', []);
    } finally {
      await attached.detach();
    }
    const info = JSON.parse(await suite.server.cliOk('volume', 'info', 'fs', '--json'));
    assert.ok(info.allocatedBytes < 128 * MiB, `the filesystem allocated what it wrote, not the whole volume (${info.allocatedBytes})`);

    attached = await attach(suite.dir, suite.server.uri('fs'));
    try {
      await ok('fsck.ext4', ['-n', attached.device]);
      await ok('mount', [attached.device, attached.mountPoint]);
      for (const [name, data] of files) assert.ok(fs.readFileSync(path.join(attached.mountPoint, name)).equals(data), `${name} is intact after re-attach`);
    } finally {
      await attached.detach();
    }
  });

  it('snapshots taken from the CLI while fio writes are prefix-consistent', async () => {
    const blocks = 1024;
    const blockBytes = 64 * 1024;
    await suite.server.cliOk('volume', 'create', 'busy', '--size', `${(blocks * blockBytes) / MiB}MiB`);
    // Old contents: 0xee everywhere, which no fio block (filled with its own offset) can look like.
    await ok('qemu-io', ['-f', 'raw', '-c', `write -P 0xee 0 ${blocks * blockBytes}`, suite.server.uri('busy')]);
    const fio = spawn(
      'fio',
      fioArgs(suite.server.uri('busy'), [
        '--rw=write',
        `--bs=${blockBytes}`,
        '--iodepth=16',
        `--size=${blocks * blockBytes}`,
        '--rate=24m',
        '--verify=pattern',
        '--verify_pattern=%o',
        '--do_verify=0',
      ]),
      { stdio: 'ignore' },
    );
    const finished = new Promise<number | null>((resolve) => fio.on('exit', resolve));
    const taken: string[] = [];
    for (let i = 0; i < 6; i++) {
      await sleep(350);
      await suite.server.cliOk('snapshot', 'create', `busy@t${i}`);
      taken.push(`busy@t${i}`);
    }
    assert.equal(await finished, 0, 'fio finished');
    taken.push('busy');
    const prefixes: number[] = [];
    for (const name of taken) {
      await suite.server.cliOk('volume', 'export', name, path.join(suite.dir, 'snap.raw'));
      const image = fs.readFileSync(path.join(suite.dir, 'snap.raw'));
      assert.equal(image.length, blocks * blockBytes, `${name} exported`);
      const written: boolean[] = [];
      for (let b = 0; b < blocks; b++) {
        const block = image.subarray(b * blockBytes, (b + 1) * blockBytes);
        if (block.every((x) => x === 0xee)) written.push(false);
        else if (isOffsetPattern(block, b * blockBytes)) written.push(true);
        else assert.fail(`${name}: block ${b} is neither the old bytes nor fio's whole block (torn or misplaced)`);
      }
      // fio writes in order with 16 in flight: what is there is a prefix, give or take the 16 in flight.
      const firstGap = written.indexOf(false) === -1 ? blocks : written.indexOf(false);
      const lastWritten = written.lastIndexOf(true);
      assert.ok(lastWritten - firstGap < 16, `${name}: written blocks stop at ${firstGap} but one is written at ${lastWritten}`);
      prefixes.push(firstGap);
    }
    assert.equal(prefixes[prefixes.length - 1], blocks, 'in the end fio wrote every block');
    for (let i = 1; i < prefixes.length; i++) assert.ok(prefixes[i] >= prefixes[i - 1], `later snapshots hold more: ${prefixes.join(', ')}`);
    assert.ok(
      prefixes.some((p) => p > 0 && p < blocks),
      `some snapshot caught fio mid-way: ${prefixes.join(', ')}`,
    );
    console.log(`      blocks written in each snapshot: ${prefixes.join(', ')} of ${blocks}`);
  });
});

function isOffsetPattern(block: Buffer, offset: number): boolean {
  for (let at = 0; at < block.length; at += 8) if (Number(block.readBigUInt64LE(at)) !== offset) return false;
  return true;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** What a userspace attach needs from this machine, as sentences (empty when all is there). */
export function attachPrerequisites(): string[] {
  const problems: string[] = [];
  if (process.getuid?.() !== 0) problems.push('losetup and mount need root (run the tests as root, as .ci/run does)');
  if (!fs.existsSync('/dev/fuse')) problems.push('/dev/fuse is missing, so nbdfuse cannot expose the export as a file');
  if (!fs.existsSync('/dev/loop-control')) problems.push('/dev/loop-control is missing, so losetup cannot create a loop device');
  return problems;
}

interface Attached {
  device: string;
  mountPoint: string;
  detach(): Promise<void>;
}

/** The node plugin's userspace path, by hand: nbdfuse exposes the export as a file, losetup makes it a block device. */
async function attach(dir: string, uri: string): Promise<Attached> {
  const fuseDir = fs.mkdtempSync(path.join(dir, 'fuse-'));
  const mountPoint = fs.mkdtempSync(path.join(dir, 'mnt-'));
  const pidFile = path.join(dir, `${path.basename(fuseDir)}.pid`);
  const nbdfuse: ChildProcess = spawn('nbdfuse', ['-P', pidFile, path.join(fuseDir, 'disk'), uri], { stdio: 'ignore' });
  const fuseExited = new Promise((resolve) => nbdfuse.on('exit', resolve));
  for (let i = 0; i < 100 && !fs.existsSync(pidFile); i++) await sleep(50);
  assert.ok(fs.existsSync(pidFile), 'nbdfuse came up');
  const device = (await ok('losetup', ['-f', '--show', '--direct-io=on', path.join(fuseDir, 'disk')])).trim();
  return {
    device,
    mountPoint,
    async detach() {
      if ((await run('mountpoint', ['-q', mountPoint])).status === 0) await ok('umount', [mountPoint]);
      await ok('losetup', ['-d', device]);
      await ok('fusermount3', ['-u', fuseDir]);
      await fuseExited;
    },
  };
}
