import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { AttachRequest } from '../../node-plugin/attach/attacher';
import { chooseAttacher, HostProbe } from '../../node-plugin/attach/index';
import { netlinkHelperPath } from '../../node-plugin/attach/nbd-netlink';
import { nbdUri, UserspaceAttacher } from '../../node-plugin/attach/userspace';
import { hostCommands } from '../../node-plugin/host/commands';
import { formatFilesystem, mountFilesystem, unmount } from '../../node-plugin/host/filesystem';
import { isArborError } from '../../store/errors';
import { serverForSuite, startServer } from '../support/arbor-server';
import { leftoversUnder, removeLeftoversUnder, workDirFor } from '../support/host';
import { ok } from '../support/run';
import { tempDir } from '../support/tmp';

const MiB = 1024 * 1024;

describe('attaching an export in userspace: nbdfuse and a loop device', function () {
  this.timeout(60_000);
  // Registered before the server's own `after`, so a failed test's leftovers go before the server stops.
  after(async () => {
    if (suite.dir) await removeLeftoversUnder(suite.dir);
  });
  const suite = serverForSuite();
  const attacher = new UserspaceAttacher(hostCommands);

  function request(name: string, exportName: string, readOnly = false): AttachRequest {
    return { socketPath: suite.server.nbdSocket, exportName, volumeId: `vol-${name}`, readOnly, workDir: workDirFor(suite.dir, name) };
  }

  function assertNothingLeft(): void {
    assert.deepEqual(leftoversUnder(suite.dir), { loopDevices: [], mounts: [], nbdfuse: [] }, 'no loop device, mount or nbdfuse is left behind');
  }

  it('gives a block device of the volume size whose writes reach the volume; attaching again returns it; detaching twice leaves nothing', async () => {
    await suite.server.cliOk('volume', 'create', 'plain', '--size', '256MiB');
    const req = request('plain', 'plain');
    const attachment = await attacher.attach(req);
    assert.equal(attachment.kind, 'userspace');
    assert.match(attachment.device, /^\/dev\/loop\d+$/);
    assert.equal(attachment.sizeBytes, 256 * MiB);
    assert.equal(Number((await ok('blockdev', ['--getsize64', attachment.device])).trim()), 256 * MiB);
    assert.equal(await attacher.isHealthy(attachment), true);
    assert.deepEqual(await attacher.attach(req), attachment, 'a second attach returns the live attachment');
    assert.equal(leftoversUnder(suite.dir).loopDevices.length, 1, 'and makes no second loop device');

    writeDevice(attachment.device, 100 * MiB, pattern(0x5a));
    const exported = path.join(suite.dir, 'plain.raw');
    await attacher.detach(attachment);
    await attacher.detach(attachment);
    assert.equal(await attacher.isHealthy(attachment), false);
    assertNothingLeft();
    await suite.server.cliOk('volume', 'export', 'plain', exported);
    assert.ok(readFileAt(exported, 100 * MiB, 4096).equals(pattern(0x5a)), 'what was written to the device is in the volume');
  });

  it('attaches a snapshot read-only: its device refuses writes and reads the snapshot', async () => {
    await suite.server.cliOk('volume', 'create', 'snapped', '--size', '64MiB');
    const rw = await attacher.attach(request('snapped', 'snapped'));
    writeDevice(rw.device, 0, pattern(0x11));
    await attacher.detach(rw);
    await suite.server.cliOk('snapshot', 'create', 'snapped@before');

    await assert.rejects(
      attacher.attach(request('snapped-ro', 'snapped@before', false)),
      (err) => isArborError(err, 'invalid-argument') && /only be attached read-only/.test(err.message),
    );
    const ro = await attacher.attach(request('snapped-ro', 'snapped@before', true));
    try {
      assert.equal(ro.sizeBytes, 64 * MiB);
      assert.equal(fs.readFileSync(`/sys/block/${path.basename(ro.device)}/ro`, 'utf8').trim(), '1', 'the loop device is read-only');
      assert.ok(readDevice(ro.device, 0, 4096).equals(pattern(0x11)), 'the snapshot reads what was written before it');
      // The kernel refuses writes to a read-only block device with EPERM (blkdev_write_iter).
      assert.throws(
        () => writeDevice(ro.device, 0, pattern(0x22)),
        (err: NodeJS.ErrnoException) => err.code === 'EPERM',
        'writing the device fails',
      );
      assert.ok(readDevice(ro.device, 0, 4096).equals(pattern(0x11)), 'and changed nothing');
    } finally {
      await attacher.detach(ro);
    }
    assertNothingLeft();
  });

  it('reports a dead nbdfuse as unhealthy, and attaching again clears the dead attachment and works', async () => {
    await suite.server.cliOk('volume', 'create', 'crashy', '--size', '64MiB');
    const req = request('crashy', 'crashy');
    const first = await attacher.attach(req);
    writeDevice(first.device, 0, pattern(0x33));
    process.kill(Number(first.details.nbdfusePid), 'SIGKILL');
    await waitFor(async () => !(await attacher.isHealthy(first)));

    const second = await attacher.attach(req);
    try {
      assert.notEqual(second.details.nbdfusePid, first.details.nbdfusePid, 'a new nbdfuse serves it');
      assert.equal(await attacher.isHealthy(second), true);
      assert.deepEqual(leftoversUnder(suite.dir).loopDevices, [second.device], 'the dead loop device is gone');
      assert.ok(readDevice(second.device, 0, 4096).equals(pattern(0x33)), 'the data written before the crash is there');
    } finally {
      await attacher.detach(second);
    }
    await attacher.detach(first);
    assertNothingLeft();
  });

  it('reports a loop device removed by hand as unhealthy, and attaching again works', async () => {
    await suite.server.cliOk('volume', 'create', 'unlooped', '--size', '64MiB');
    const req = request('unlooped', 'unlooped');
    const first = await attacher.attach(req);
    await ok('losetup', ['-d', first.device]);
    await waitFor(async () => !(await attacher.isHealthy(first)));
    const second = await attacher.attach(req);
    assert.equal(await attacher.isHealthy(second), true);
    await attacher.detach(second);
    assertNothingLeft();
  });

  it('clears a half-made attachment (nbdfuse running, no loop device: a crash before losetup) and attaches afresh', async () => {
    await suite.server.cliOk('volume', 'create', 'half', '--size', '64MiB');
    const req = request('half', 'half');
    fs.mkdirSync(path.join(req.workDir, 'fuse'));
    const strayPid = await hostCommands.spawnDetached('nbdfuse', [
      '-P',
      path.join(req.workDir, 'nbdfuse.pid'),
      path.join(req.workDir, 'fuse', 'disk'),
      suite.server.uri('half'),
    ]);
    await waitFor(async () => fs.existsSync(path.join(req.workDir, 'nbdfuse.pid')));
    const attachment = await attacher.attach(req);
    try {
      assert.equal(await attacher.isHealthy(attachment), true);
      assert.equal(leftoversUnder(suite.dir).nbdfuse.length, 1, `one nbdfuse serves the volume: ${leftoversUnder(suite.dir).nbdfuse.join('; ')}`);
      assert.equal(leftoversUnder(suite.dir).nbdfuse[0].split(' ')[0], String(attachment.details.nbdfusePid));
      assert.notEqual(attachment.details.nbdfusePid, strayPid, 'the stray nbdfuse was replaced');
    } finally {
      await attacher.detach(attachment);
    }
    assertNothingLeft();
  });

  it('reports an attachment whose server went away as unhealthy, and detaches it cleanly', async () => {
    const own = tempDir();
    const server = await startServer(own.dir);
    try {
      await server.cliOk('volume', 'create', 'orphan', '--size', '64MiB');
      const attachment = await attacher.attach({
        socketPath: server.nbdSocket,
        exportName: 'orphan',
        volumeId: 'vol-orphan',
        readOnly: false,
        workDir: workDirFor(suite.dir, 'orphan'),
      });
      assert.equal(await attacher.isHealthy(attachment), true);
      await server.kill();
      assert.equal(await attacher.isHealthy(attachment), false, 'nbdfuse still runs, but nothing answers it');
      await attacher.detach(attachment);
      assertNothingLeft();
    } finally {
      await server.kill();
      own.cleanup();
    }
  });

  it('refuses to attach a work directory that holds a live attachment made with other options', async () => {
    await suite.server.cliOk('volume', 'create', 'twice', '--size', '64MiB');
    const attachment = await attacher.attach(request('twice', 'twice'));
    try {
      await assert.rejects(
        attacher.attach(request('twice', 'twice', true)),
        (err) => isArborError(err, 'failed-precondition') && /detach it before attaching read-only/.test(err.message),
      );
    } finally {
      await attacher.detach(attachment);
    }
    assertNothingLeft();
  });

  it('refuses to detach a device that is still mounted, and detaches once it is unmounted', async () => {
    await suite.server.cliOk('volume', 'create', 'busy', '--size', '64MiB');
    const attachment = await attacher.attach(request('busy', 'busy'));
    const mountPoint = path.join(suite.dir, 'mnt', 'busy');
    await formatFilesystem(attachment.device, 'ext4', []);
    await mountFilesystem(attachment.device, mountPoint, 'ext4', [], false);
    await assert.rejects(
      attacher.detach(attachment),
      (err) => isArborError(err, 'failed-precondition') && err.message.includes(`still mounted at ${mountPoint}`),
    );
    assert.equal(await attacher.isHealthy(attachment), true, 'the refused detach changed nothing');
    await unmount(mountPoint);
    await attacher.detach(attachment);
    assertNothingLeft();
  });

  it('names the export in an nbd+unix URI with the socket path percent-encoded, as libnbd decodes it', () => {
    assert.equal(
      nbdUri({ exportName: 'vol-1@snap.2', socketPath: '/var/lib/kubelet/plugins/arbor csi+x/nbd.sock' }),
      'nbd+unix:///vol-1@snap.2?socket=/var/lib/kubelet/plugins/arbor%20csi%2Bx/nbd.sock',
    );
  });

  it('fails the attach of an export the server does not have, naming it, and leaves nothing', async () => {
    const started = Date.now();
    await assert.rejects(attacher.attach(request('missing', 'no-such-volume')), (err) => {
      assert.ok(isArborError(err, 'unavailable'));
      assert.equal(
        err.message,
        `export no-such-volume: nbdfuse exited without serving it from ${suite.server.nbdSocket} (does the server have that export? see 'arbor volume list' and 'arbor snapshot list')`,
      );
      return true;
    });
    assert.ok(Date.now() - started < 5_000, 'at once, without waiting out the start timeout');
    assertNothingLeft();
  });
});

describe('choosing how this host attaches', () => {
  function probe(paths: string[], commands: string[], uid = 0, helper = true): HostProbe {
    return {
      pathExists: (file) => paths.includes(file),
      netlinkHelperBuilt: () => helper,
      commandInstalled: (command) => commands.includes(command),
      uid: () => uid,
    };
  }
  const userspaceHost = { paths: ['/dev/fuse', '/dev/loop-control'], commands: ['nbdfuse', 'losetup', 'fusermount3'] };

  it('uses the kernel driver when /dev/nbd0 exists and the netlink helper is built', () => {
    assert.equal(chooseAttacher(probe(['/dev/nbd0', ...userspaceHost.paths], userspaceHost.commands)).kind, 'kernel');
  });

  it('falls back to userspace without the nbd module or without the netlink helper', () => {
    assert.equal(chooseAttacher(probe(userspaceHost.paths, userspaceHost.commands)).kind, 'userspace');
    assert.equal(chooseAttacher(probe(['/dev/nbd0', ...userspaceHost.paths], userspaceHost.commands, 0, false)).kind, 'userspace');
  });

  it('says exactly what a bare host lacks', () => {
    assert.throws(
      () => chooseAttacher(probe([], [], 1000, false)),
      (err) => {
        assert.ok(isArborError(err, 'failed-precondition'));
        assert.equal(
          err.message,
          'this host has no usable way to attach NBD volumes. ' +
            `Kernel NBD: /dev/nbd0 is missing (load the nbd kernel module: modprobe nbd), Arbor's netlink helper ${netlinkHelperPath} is not built (install gcc and libc6-dev, then npm run build). ` +
            'Userspace NBD (nbdfuse and a loop device): /dev/fuse is missing (load the fuse module; in a container, give it the host /dev/fuse), ' +
            '/dev/loop-control is missing (load the loop module; in a container, give it the host /dev), ' +
            'nbdfuse is not installed (Debian package libnbd-bin), losetup is not installed (Debian package mount), ' +
            'fusermount3 is not installed (Debian package fuse3), the plugin runs as uid 1000, not root (losetup and mount need root).',
        );
        return true;
      },
    );
  });

  it('names only what is missing on an almost-ready host', () => {
    assert.throws(
      () => chooseAttacher(probe(['/dev/loop-control'], ['nbdfuse', 'losetup', 'fusermount3'])),
      (err) =>
        isArborError(err) &&
        err.message ===
          'this host has no usable way to attach NBD volumes. Kernel NBD: /dev/nbd0 is missing (load the nbd kernel module: modprobe nbd). Userspace NBD (nbdfuse and a loop device): /dev/fuse is missing (load the fuse module; in a container, give it the host /dev/fuse).',
    );
  });

  it('probes this machine for real: the kernel driver only with /dev/nbd0 and the netlink helper, else userspace', () => {
    const kernelNbd = fs.existsSync('/dev/nbd0') && fs.existsSync(netlinkHelperPath);
    assert.equal(chooseAttacher().kind, kernelNbd ? 'kernel' : 'userspace');
  });
});

function pattern(byte: number): Buffer {
  const buffer = Buffer.alloc(4096, byte);
  buffer.write('arbor', 0);
  return buffer;
}

function writeDevice(device: string, offset: number, data: Buffer): void {
  const fd = fs.openSync(device, 'r+');
  try {
    fs.writeSync(fd, data, 0, data.length, offset);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function readDevice(device: string, offset: number, length: number): Buffer {
  return readFileAt(device, offset, length);
}

function readFileAt(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const buffer = Buffer.alloc(length);
    fs.readSync(fd, buffer, 0, length, offset);
    return buffer;
  } finally {
    fs.closeSync(fd);
  }
}

async function waitFor(condition: () => Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}
