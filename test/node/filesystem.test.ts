import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Attachment, AttachRequest } from '../../node-plugin/attach/attacher';
import { UserspaceAttacher } from '../../node-plugin/attach/userspace';
import { hostCommands } from '../../node-plugin/host/commands';
import {
  bindMount,
  blockDeviceSize,
  checkFilesystem,
  detectFilesystem,
  filesystemStats,
  FilesystemType,
  formatFilesystem,
  growFilesystem,
  isMounted,
  mountedDevice,
  mountFilesystem,
  unmount,
  validateMkfsOptions,
  validateMountFlags,
} from '../../node-plugin/host/filesystem';
import { isArborError } from '../../store/errors';
import { serverForSuite } from '../support/arbor-server';
import { leftoversUnder, RecordingRunner, removeLeftoversUnder, workDirFor } from '../support/host';
import { ok } from '../support/run';
import { tempDir } from '../support/tmp';

const MiB = 1024 * 1024;
/** mkfs.xfs 6.1 refuses filesystems under 300 MB. */
const volumeSize: Record<FilesystemType, number> = { ext4: 256 * MiB, xfs: 320 * MiB };

describe('filesystems on attached volumes', function () {
  this.timeout(60_000);
  // Registered before the server's own `after`, so a failed test's leftovers go before the server stops.
  after(async () => {
    if (suite.dir) await removeLeftoversUnder(suite.dir);
  });
  const suite = serverForSuite();
  const attacher = new UserspaceAttacher(hostCommands);

  async function volume(name: string, sizeBytes: number): Promise<AttachRequest> {
    await suite.server.cliOk('volume', 'create', name, '--size', String(sizeBytes));
    return { socketPath: suite.server.nbdSocket, exportName: name, volumeId: `vol-${name}`, readOnly: false, workDir: workDirFor(suite.dir, name) };
  }

  function assertNothingLeft(): void {
    assert.deepEqual(leftoversUnder(suite.dir), { loopDevices: [], mounts: [], nbdfuse: [] }, 'no loop device, mount or nbdfuse is left behind');
  }

  const files = new Map<string, Buffer>();
  for (let i = 0; i < 6; i++) files.set(`file${i}.bin`, Buffer.alloc(MiB * (i + 1), 0x41 + i));
  const filesBytes = [...files.values()].reduce((sum, data) => sum + data.length, 0);

  for (const [fsType, mkfsOptions, label] of [
    ['ext4', ['-L', 'arbor-data', '-m', '1'], 'arbor-data'],
    ['xfs', ['-L', 'lbl'], 'lbl'],
  ] as const) {
    it(`${fsType}: a blank volume is formatted, mounted and written; after detach and re-attach it checks clean, its files are intact, and a read-only bind refuses writes`, async () => {
      const name = `round-trip-${fsType}`;
      const req = await volume(name, volumeSize[fsType]);
      const staging = path.join(suite.dir, 'staging', name);
      const published = path.join(suite.dir, 'pods', name, 'mount');

      let attachment = await attacher.attach(req);
      const device = attachment.device;
      try {
        assert.equal(await detectFilesystem(device), undefined, 'a new volume is blank');
        await formatFilesystem(device, fsType, [...mkfsOptions]);
        assert.equal(await detectFilesystem(device), fsType);
        assert.equal((await ok('blkid', ['-p', '-o', 'value', '-s', 'LABEL', device])).trim(), label, 'the mkfs options were applied');
        await assert.rejects(
          formatFilesystem(device, fsType, []),
          (err) => isArborError(err, 'failed-precondition') && err.message.startsWith(`${device} already holds ${fsType}; refusing to format it`),
        );

        await mountFilesystem(device, staging, fsType, ['noatime'], false);
        await mountFilesystem(device, staging, fsType, ['noatime'], false);
        assert.equal(await isMounted(staging), true);
        assert.equal(await mountedDevice(staging), device);
        assert.equal(
          (await ok('findmnt', ['-n', '-o', 'SOURCE', '--mountpoint', staging])).trim().split('\n').length,
          1,
          'mounting again mounted nothing more',
        );
        assert.match(await ok('findmnt', ['-n', '-o', 'VFS-OPTIONS', '--mountpoint', staging]), /\bnoatime\b/);
        for (const [file, data] of files) fs.writeFileSync(path.join(staging, file), data);
        await ok('sync', ['-f', staging]);

        const stats = await filesystemStats(staging);
        // xfs counts its internal log (64 MiB here) out of the total.
        assert.ok(stats.totalBytes > volumeSize[fsType] * 0.75 && stats.totalBytes <= volumeSize[fsType], `size ${stats.totalBytes} is most of the volume`);
        assert.ok(stats.usedBytes >= filesBytes, `used ${stats.usedBytes} holds the ${filesBytes} bytes written`);
        assert.ok(
          stats.availableBytes <= stats.totalBytes - stats.usedBytes && stats.availableBytes > stats.totalBytes - stats.usedBytes - 0.1 * stats.totalBytes,
        );
        assert.ok(
          stats.totalInodes > 1000 && stats.usedInodes >= files.size && stats.freeInodes === stats.totalInodes - stats.usedInodes,
          JSON.stringify(stats),
        );

        await unmount(staging);
        await unmount(staging);
        assert.equal(await isMounted(staging), false);
        assert.equal(await mountedDevice(staging), undefined);
      } finally {
        await unmount(staging);
        await attacher.detach(attachment);
      }

      attachment = await attacher.attach(req);
      try {
        await checkFilesystem(attachment.device, fsType);
        await mountFilesystem(attachment.device, staging, fsType, [], false);
        for (const [file, data] of files) assert.ok(fs.readFileSync(path.join(staging, file)).equals(data), `${file} is intact after re-attach`);

        await bindMount(staging, published, true);
        await bindMount(staging, published, true);
        assert.equal((await ok('findmnt', ['-n', '-o', 'TARGET', '--mountpoint', published])).trim().split('\n').length, 1, 'binding again bound nothing more');
        assert.throws(
          () => fs.writeFileSync(path.join(published, 'new.txt'), 'x'),
          (err: NodeJS.ErrnoException) => err.code === 'EROFS',
          'the read-only bind refuses writes',
        );
        assert.ok(fs.readFileSync(path.join(published, 'file0.bin')).equals(files.get('file0.bin')!), 'and reads the files');
        fs.writeFileSync(path.join(staging, 'staging-stays-writable.txt'), 'x');
        assert.equal((await filesystemStats(published)).totalBytes, (await filesystemStats(staging)).totalBytes);
      } finally {
        await unmount(published);
        await unmount(staging);
        await attacher.detach(attachment);
      }
      assertNothingLeft();
    });
  }

  /** A volume with a filesystem and a file, resized to twice its size and attached again: the device is bigger, the filesystem not yet. */
  async function grownVolume(name: string, fsType: FilesystemType): Promise<{ attachment: Attachment; staging: string; before: number }> {
    const req = await volume(name, volumeSize[fsType]);
    const staging = path.join(suite.dir, 'staging', name);
    let attachment = await attacher.attach(req);
    let before: number;
    try {
      await formatFilesystem(attachment.device, fsType, []);
      await mountFilesystem(attachment.device, staging, fsType, [], false);
      fs.writeFileSync(path.join(staging, 'kept.bin'), files.get('file2.bin')!);
      before = (await filesystemStats(staging)).totalBytes;
      // nbdfuse fixes the size when it connects: the device grows only with a new attach.
      await suite.server.cliOk('volume', 'resize', name, '--size', String(2 * volumeSize[fsType]));
    } finally {
      await unmount(staging);
      await attacher.detach(attachment);
    }
    attachment = await attacher.attach(req);
    assert.equal(attachment.sizeBytes, 2 * volumeSize[fsType]);
    assert.equal(await blockDeviceSize(attachment.device), 2 * volumeSize[fsType]);
    return { attachment, staging, before };
  }

  async function assertGrown(staging: string, before: number, fsType: FilesystemType): Promise<void> {
    const after = (await filesystemStats(staging)).totalBytes;
    assert.ok(after > before + 0.9 * volumeSize[fsType], `the filesystem grew from ${before} to ${after} bytes`);
    assert.ok(fs.readFileSync(path.join(staging, 'kept.bin')).equals(files.get('file2.bin')!), 'its file is intact');
  }

  for (const fsType of ['ext4', 'xfs'] as const) {
    it(`${fsType} grows while mounted to fill a volume made larger and attached again`, async () => {
      const { attachment, staging, before } = await grownVolume(`grow-online-${fsType}`, fsType);
      try {
        await mountFilesystem(attachment.device, staging, fsType, [], false);
        assert.equal((await filesystemStats(staging)).totalBytes, before, 'the filesystem keeps its size until grown');
        if (fsType === 'ext4' && !hasCapSysResource()) {
          // This sandbox withholds CAP_SYS_RESOURCE, which the kernel requires for an online ext4 resize.
          await assert.rejects(growFilesystem(attachment.device, staging, fsType), (err) => {
            assert.ok(isArborError(err, 'failed-precondition'));
            assert.equal(
              err.message,
              `cannot grow the mounted ext4 filesystem on ${attachment.device} at ${staging}: the kernel resizes a mounted ext4 only for a process with CAP_SYS_RESOURCE, and this one lacks it; run the node plugin privileged, or grow it while unmounted`,
            );
            return true;
          });
          assert.equal((await filesystemStats(staging)).totalBytes, before, 'and nothing changed');
        } else {
          await growFilesystem(attachment.device, staging, fsType);
          await assertGrown(staging, before, fsType);
        }
      } finally {
        await unmount(staging);
        await attacher.detach(attachment);
      }
      assertNothingLeft();
    });
  }

  it('ext4 grows while unmounted; xfs refuses to', async () => {
    const { attachment, staging, before } = await grownVolume('grow-offline-ext4', 'ext4');
    try {
      await growFilesystem(attachment.device, staging, 'ext4');
      await mountFilesystem(attachment.device, staging, 'ext4', [], false);
      await assertGrown(staging, before, 'ext4');
      await assert.rejects(
        growFilesystem('/dev/loop9', staging, 'xfs'),
        (err) => isArborError(err, 'failed-precondition') && err.message.includes('can only grow while mounted'),
      );
    } finally {
      await unmount(staging);
      await attacher.detach(attachment);
    }
    assertNothingLeft();
  });

  it('checkFilesystem lets e2fsck -p repair what it may, and refuses a filesystem it cannot repair, naming the device', async () => {
    const req = await volume('damaged', 64 * MiB);
    const attachment = await attacher.attach(req);
    const device = attachment.device;
    try {
      await formatFilesystem(device, 'ext4', []);
      // A wrong free-block count on a filesystem not cleanly unmounted: e2fsck -p fixes it (exit status 1).
      await ok('debugfs', ['-w', '-R', 'ssv free_blocks_count 5', device]);
      await ok('debugfs', ['-w', '-R', 'ssv state 0', device]);
      await checkFilesystem(device, 'ext4');
      // A root inode that is not a directory: e2fsck -p gives up (exit status 4).
      await ok('debugfs', ['-w', '-R', 'clri <2>', device]);
      await ok('debugfs', ['-w', '-R', 'ssv state 0', device]);
      await assert.rejects(checkFilesystem(device, 'ext4'), (err) => {
        assert.ok(isArborError(err, 'failed-precondition'));
        assert.ok(
          err.message.startsWith(
            `the ext4 filesystem on ${device} failed its check and will not be mounted: e2fsck -p exited with status 4 (errors left uncorrected)`,
          ),
          err.message,
        );
        assert.ok(err.message.endsWith(`repair it by hand with 'e2fsck -f ${device}' while it is attached and not mounted`), err.message);
        return true;
      });
    } finally {
      await attacher.detach(attachment);
    }
    assertNothingLeft();
  });
});

describe('filesystem commands and their checks', () => {
  it('detectFilesystem reports a partition table as not blank, and formatFilesystem refuses it', async () => {
    const temp = tempDir();
    try {
      const image = path.join(temp.dir, 'disk.img');
      const mbr = Buffer.alloc(MiB);
      mbr.writeUInt8(0x83, 446 + 4); // one Linux partition
      mbr.writeUInt32LE(2048, 446 + 8);
      mbr.writeUInt32LE(2048, 446 + 12);
      mbr.writeUInt16LE(0xaa55, 510);
      fs.writeFileSync(image, mbr);
      assert.equal(await detectFilesystem(image), 'partition-table:dos');
      await assert.rejects(
        formatFilesystem(image, 'ext4', []),
        (err) => isArborError(err, 'failed-precondition') && err.message.startsWith(`${image} already holds partition-table:dos`),
      );
      assert.equal(await detectFilesystem(image), 'partition-table:dos', 'untouched');
    } finally {
      temp.cleanup();
    }
  });

  it('runs mkfs and mount with exact arguments', async () => {
    const blank = () => new RecordingRunner((argv) => (argv[0] === 'blkid' ? { status: 2 } : argv[0] === 'findmnt' ? { status: 1 } : undefined));
    let runner = blank();
    await formatFilesystem('/dev/loop9', 'ext4', ['-L', 'data', '-Ecommit=5'], runner);
    assert.deepEqual(runner.commands, [
      ['blkid', '-p', '-o', 'export', '-s', 'TYPE', '-s', 'PTTYPE', '/dev/loop9'],
      ['mkfs.ext4', '-q', '-F', '-L', 'data', '-Ecommit=5', '/dev/loop9'],
    ]);
    runner = blank();
    await formatFilesystem('/dev/loop9', 'xfs', ['-m', 'reflink=1'], runner);
    assert.deepEqual(runner.commands[1], ['mkfs.xfs', '-f', '-q', '-m', 'reflink=1', '/dev/loop9']);

    const temp = tempDir();
    try {
      runner = blank();
      await mountFilesystem('/dev/loop9', path.join(temp.dir, 'a'), 'xfs', ['noatime', 'discard'], true, runner);
      assert.deepEqual(runner.commands[1], ['mount', '-t', 'xfs', '-o', 'noatime,discard,ro,nouuid', '/dev/loop9', path.join(temp.dir, 'a')]);
      runner = blank();
      await mountFilesystem('/dev/loop9', path.join(temp.dir, 'b'), 'ext4', [], false, runner);
      assert.deepEqual(runner.commands[1], ['mount', '-t', 'ext4', '/dev/loop9', path.join(temp.dir, 'b')]);
      runner = blank();
      await bindMount(temp.dir + '/a', path.join(temp.dir, 'c'), true, runner);
      assert.deepEqual(runner.commands.slice(1), [
        ['mount', '--bind', temp.dir + '/a', path.join(temp.dir, 'c')],
        ['mount', '-o', 'remount,bind,ro', path.join(temp.dir, 'c')],
      ]);
      const mounted = new RecordingRunner((argv) => (argv[0] === 'findmnt' ? { stdout: argv.includes('SOURCE') ? '/dev/loop9\n' : '/mnt/x\n' } : undefined));
      await growFilesystem('/dev/loop9', '/mnt/x', 'ext4', mounted);
      await growFilesystem('/dev/loop9', '/mnt/x', 'xfs', mounted);
      assert.deepEqual(
        mounted.commands.filter((argv) => argv[0] !== 'findmnt'),
        [
          ['resize2fs', '/dev/loop9'],
          ['xfs_growfs', '-d', '/mnt/x'],
        ],
      );
      runner = blank();
      await growFilesystem('/dev/loop9', '/mnt/x', 'ext4', runner);
      assert.deepEqual(
        runner.commands.filter((argv) => argv[0] !== 'findmnt'),
        [['resize2fs', '/dev/loop9']],
        'unmounted ext4 grows offline',
      );
      let asked = false;
      runner = new RecordingRunner((argv) => {
        if (argv[0] === 'findmnt') return { status: 1 };
        if (argv[0] === 'resize2fs' && !asked) {
          asked = true;
          return { status: 1, stderr: "Please run 'e2fsck -f /dev/loop9' first.\n" };
        }
      });
      await growFilesystem('/dev/loop9', '/mnt/x', 'ext4', runner);
      assert.deepEqual(
        runner.commands.filter((argv) => argv[0] !== 'findmnt'),
        [
          ['resize2fs', '/dev/loop9'],
          ['e2fsck', '-f', '-p', '/dev/loop9'],
          ['resize2fs', '/dev/loop9'],
        ],
        'and checks first when resize2fs asks for it',
      );
    } finally {
      temp.cleanup();
    }
  });

  it('checkFilesystem accepts e2fsck exit statuses 0 to 3 and refuses 4 and above; xfs runs nothing', async () => {
    for (const status of [0, 1, 2, 3]) await checkFilesystem('/dev/loop9', 'ext4', new RecordingRunner(() => ({ status })));
    for (const status of [4, 8, 12]) {
      await assert.rejects(
        checkFilesystem('/dev/loop9', 'ext4', new RecordingRunner(() => ({ status, stdout: 'details' }))),
        (err) => isArborError(err, 'failed-precondition') && err.message.includes(`status ${status}`),
      );
    }
    const runner = new RecordingRunner();
    await checkFilesystem('/dev/loop9', 'xfs', runner);
    assert.deepEqual(runner.commands, []);
  });

  it('refuses mkfs options that are not options, select another device or file, or are not accepted', () => {
    assert.deepEqual(validateMkfsOptions('ext4', ['-L', 'data', '-m', '0', '-Ecommit=5', '-j']), ['-L', 'data', '-m', '0', '-Ecommit=5', '-j']);
    assert.deepEqual(validateMkfsOptions('xfs', ['-m', 'crc=1', '-K', '-Lx']), ['-m', 'crc=1', '-K', '-Lx']);
    const refused: Array<[FilesystemType, string[], RegExp]> = [
      ['ext4', ['/dev/sdb'], /'\/dev\/sdb' is not an option/],
      ['ext4', ['-L', 'data', 'label'], /'label' is not an option/],
      ['ext4', ['-L'], /-L needs a value/],
      ['ext4', ['-J', 'device=/dev/sdb'], /another device or file/],
      ['ext4', ['-jJdevice=/dev/sdb'], /'-jJdevice=\/dev\/sdb' is not accepted/],
      ['ext4', ['-F'], /'-F' is not accepted/],
      ['ext4', ['-t', 'ext2'], /'-t' is not accepted/],
      ['ext4', ['-d', '/etc'], /'-d' is not accepted/],
      ['ext4', ['--', '/dev/sdb'], /'--' is not an option/],
      ['xfs', ['-l', 'logdev=/dev/sdb,size=10m'], /another device or file/],
      ['xfs', ['-d', 'file,name=/tmp/x'], /another device or file/],
      ['xfs', ['-r', 'rtdev=/dev/sdc'], /another device or file/],
      ['xfs', ['-p', '/etc/protofile'], /'-p' is not accepted/],
    ];
    for (const [fsType, options, message] of refused) {
      assert.throws(
        () => validateMkfsOptions(fsType, options),
        (err) => isArborError(err, 'invalid-argument') && message.test(err.message),
        `${fsType} ${options.join(' ')}`,
      );
    }
    assert.throws(
      () => validateMkfsOptions('btrfs' as FilesystemType, []),
      (err) => isArborError(err, 'invalid-argument') && /'btrfs' is not supported; use one of ext4, xfs/.test(err.message),
    );
  });

  it('refuses mount flags that would inject options or change what mount does, and paths that are not absolute', async () => {
    validateMountFlags(['noatime', 'discard', 'commit=30', 'data=ordered']);
    for (const flag of ['noatime,exec', 'a b', '', 'bind', 'remount', 'X-mount.mkdir', '-o']) {
      assert.throws(
        () => validateMountFlags([flag]),
        (err) => isArborError(err, 'invalid-argument'),
        `flag '${flag}'`,
      );
    }
    const runner = new RecordingRunner();
    await assert.rejects(
      mountFilesystem('/dev/loop9', '/tmp/x', 'ext4', ['ro,suid'], false, runner),
      (err) => isArborError(err, 'invalid-argument') && err.message.includes(`'ro,suid'`),
    );
    await assert.rejects(mountFilesystem('/dev/loop9', '/tmp/x', 'ext4', ['rw'], true, runner), (err) => isArborError(err, 'invalid-argument'));
    await assert.rejects(mountFilesystem('loop9', '/tmp/x', 'ext4', [], false, runner), (err) => isArborError(err, 'invalid-argument'));
    await assert.rejects(formatFilesystem('-F', 'ext4', [], runner), (err) => isArborError(err, 'invalid-argument'));
    await assert.rejects(bindMount('/a/../etc', '/tmp/x', false, runner), (err) => isArborError(err, 'invalid-argument'));
    assert.deepEqual(runner.commands, [], 'nothing ran');
  });

  it('unmount succeeds when nothing is mounted and when the target does not exist', async () => {
    const temp = tempDir();
    try {
      await unmount(temp.dir);
      await unmount(path.join(temp.dir, 'never-made'));
      assert.equal(await isMounted(temp.dir), false);
    } finally {
      temp.cleanup();
    }
  });
});

/** Whether this process may resize a mounted ext4 (CAP_SYS_RESOURCE, bit 24 of CapEff). */
function hasCapSysResource(): boolean {
  const effective = /^CapEff:\s*([0-9a-f]+)$/m.exec(fs.readFileSync('/proc/self/status', 'utf8'))!;
  return (BigInt(`0x${effective[1]}`) & (1n << 24n)) !== 0n;
}
