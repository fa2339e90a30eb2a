import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Attachment, AttachRequest } from '../../node-plugin/attach/attacher';
import { chooseAttacher, HostProbe } from '../../node-plugin/attach/index';
import { KernelAttacher } from '../../node-plugin/attach/kernel';
import { nbdUri, UserspaceAttacher } from '../../node-plugin/attach/userspace';
import { hostCommands } from '../../node-plugin/host/commands';
import { formatFilesystem, mountFilesystem, unmount } from '../../node-plugin/host/filesystem';
import { isArborError } from '../../store/errors';
import { serverForSuite, startServer } from '../support/arbor-server';
import { leftoversUnder, RecordingRunner, removeLeftoversUnder, workDirFor } from '../support/host';
import { have, ok } from '../support/run';
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
    return { socketPath: suite.server.nbdSocket, exportName, readOnly, workDir: workDirFor(suite.dir, name) };
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

    await assert.rejects(attacher.attach(request('snapped-ro', 'snapped@before', false)), (err) => isArborError(err, 'invalid-argument') && /only be attached read-only/.test(err.message));
    const ro = await attacher.attach(request('snapped-ro', 'snapped@before', true));
    try {
      assert.equal(ro.sizeBytes, 64 * MiB);
      assert.equal(fs.readFileSync(`/sys/block/${path.basename(ro.device)}/ro`, 'utf8').trim(), '1', 'the loop device is read-only');
      assert.ok(readDevice(ro.device, 0, 4096).equals(pattern(0x11)), 'the snapshot reads what was written before it');
      // The kernel refuses writes to a read-only block device with EPERM (blkdev_write_iter).
      assert.throws(() => writeDevice(ro.device, 0, pattern(0x22)), (err: NodeJS.ErrnoException) => err.code === 'EPERM', 'writing the device fails');
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
    const strayPid = await hostCommands.spawnDetached('nbdfuse', ['-P', path.join(req.workDir, 'nbdfuse.pid'), path.join(req.workDir, 'fuse', 'disk'), suite.server.uri('half')]);
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
      const attachment = await attacher.attach({ socketPath: server.nbdSocket, exportName: 'orphan', readOnly: false, workDir: workDirFor(suite.dir, 'orphan') });
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
      await assert.rejects(attacher.attach(request('twice', 'twice', true)), (err) => isArborError(err, 'failed-precondition') && /detach it before attaching read-only/.test(err.message));
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
    await assert.rejects(attacher.detach(attachment), (err) => isArborError(err, 'failed-precondition') && err.message.includes(`still mounted at ${mountPoint}`));
    assert.equal(await attacher.isHealthy(attachment), true, 'the refused detach changed nothing');
    await unmount(mountPoint);
    await attacher.detach(attachment);
    assertNothingLeft();
  });

  it('names the export in an nbd+unix URI with the socket path percent-encoded, as libnbd decodes it', () => {
    assert.equal(nbdUri({ exportName: 'vol-1@snap.2', socketPath: '/var/lib/kubelet/plugins/arbor csi+x/nbd.sock' }), 'nbd+unix:///vol-1@snap.2?socket=/var/lib/kubelet/plugins/arbor%20csi%2Bx/nbd.sock');
  });

  it('fails the attach of an export the server does not have, naming it, and leaves nothing', async () => {
    const started = Date.now();
    await assert.rejects(attacher.attach(request('missing', 'no-such-volume')), (err) => {
      assert.ok(isArborError(err, 'unavailable'));
      assert.equal(err.message, `export no-such-volume: nbdfuse exited without serving it from ${suite.server.nbdSocket} (does the server have that export? see 'arbor volume list' and 'arbor snapshot list')`);
      return true;
    });
    assert.ok(Date.now() - started < 5_000, 'at once, without waiting out the start timeout');
    assertNothingLeft();
  });
});

describe('attaching an export with the kernel NBD driver (fake sysfs, recorded commands)', () => {
  const mib = 1024 * 1024;
  let root: { dir: string; cleanup: () => void };
  let sys: string;
  let dev: string;
  let proc: string;
  let nextPid: number;

  beforeEach(() => {
    root = tempDir('arbor-kernel-');
    sys = path.join(root.dir, 'sys', 'block');
    dev = path.join(root.dir, 'dev');
    proc = path.join(root.dir, 'proc');
    fs.mkdirSync(dev, { recursive: true });
    fs.mkdirSync(proc, { recursive: true });
    nextPid = 4000;
  });
  afterEach(() => root.cleanup());

  /** An nbd device as the kernel shows it: connected by `pid` (or not), with a size. */
  function device(name: string, state: { pid?: number; sizeBytes?: number } = {}): void {
    fs.mkdirSync(path.join(sys, name), { recursive: true });
    fs.writeFileSync(path.join(dev, name), '');
    setDevice(name, state);
  }

  function setDevice(name: string, state: { pid?: number; sizeBytes?: number }): void {
    fs.writeFileSync(path.join(sys, name, 'size'), `${(state.sizeBytes ?? 0) / 512}\n`);
    if (state.pid === undefined) fs.rmSync(path.join(sys, name, 'pid'), { force: true });
    else fs.writeFileSync(path.join(sys, name, 'pid'), `${state.pid}\n`);
  }

  function liveProcess(pid: number): void {
    fs.mkdirSync(path.join(proc, String(pid)), { recursive: true });
    fs.writeFileSync(path.join(proc, String(pid), 'stat'), `${pid} (nbd-client) S 1 ${pid} ${pid} 0 -1`);
  }

  /** Plays the kernel: `nbd-client -unix ...` connects the device (netlink: nbd-client exits), `-d` disconnects it. */
  function kernelRunner(): RecordingRunner {
    return new RecordingRunner((argv) => {
      const name = path.basename(argv[1] === '-d' ? argv[2] : argv[3]);
      if (argv[1] === '-d') setDevice(name, {});
      else setDevice(name, { pid: nextPid++, sizeBytes: 512 * mib });
    });
  }

  function request(exportName: string, readOnly = false, work = 'w'): AttachRequest {
    const workDir = path.join(root.dir, work);
    fs.mkdirSync(workDir, { recursive: true, mode: 0o700 });
    return { socketPath: '/run/arbor/nbd.sock', exportName, readOnly, workDir };
  }

  it('runs nbd-client with exact arguments on the lowest free device, skipping connected ones', async () => {
    device('nbd0', { pid: 77, sizeBytes: mib }); // connected
    device('nbd1', { sizeBytes: mib }); // connected through netlink, its nbd-client gone: still busy
    device('nbd10');
    device('nbd2');
    const runner = kernelRunner();
    const attacher = new KernelAttacher(runner, { sysBlockDir: sys, devDir: dev, procDir: proc });
    const attachment = await attacher.attach(request('vol-a'));
    assert.deepEqual(runner.commands, [
      ['nbd-client', '-unix', '/run/arbor/nbd.sock', path.join(dev, 'nbd2'), '-name', 'vol-a', '-block-size', '4096', '-connections', '4', '-timeout', '60'],
    ]);
    assert.equal(attachment.kind, 'kernel');
    assert.equal(attachment.device, path.join(dev, 'nbd2'));
    assert.equal(attachment.sizeBytes, 512 * mib);
    assert.equal(await attacher.isHealthy(attachment), true);
  });

  it('adds -readonly for a read-only attach', async () => {
    device('nbd0');
    const runner = kernelRunner();
    const attacher = new KernelAttacher(runner, { sysBlockDir: sys, devDir: dev, procDir: proc });
    await attacher.attach(request('vol-a@snap-1', true));
    assert.deepEqual(runner.commands, [
      ['nbd-client', '-unix', '/run/arbor/nbd.sock', path.join(dev, 'nbd0'), '-name', 'vol-a@snap-1', '-block-size', '4096', '-connections', '4', '-timeout', '60', '-readonly'],
    ]);
  });

  it('returns the live attachment when asked again, also from a new attacher (a plugin restart), and refuses other options', async () => {
    device('nbd0');
    device('nbd1');
    const runner = kernelRunner();
    const first = await new KernelAttacher(runner, { sysBlockDir: sys, devDir: dev, procDir: proc }).attach(request('vol-a'));
    const again = await new KernelAttacher(runner, { sysBlockDir: sys, devDir: dev, procDir: proc }).attach(request('vol-a'));
    assert.deepEqual(again, first);
    assert.equal(runner.commands.length, 1, 'nbd-client ran once');
    await assert.rejects(
      new KernelAttacher(runner, { sysBlockDir: sys, devDir: dev, procDir: proc }).attach(request('vol-a', true)),
      (err) => isArborError(err, 'failed-precondition') && err.message.includes(`holds vol-a (read-write) on ${path.join(dev, 'nbd0')}`),
    );
  });

  it('says clearly when every device is in use, and when there are none', async () => {
    device('nbd0', { pid: 70, sizeBytes: mib });
    device('nbd1', { pid: 71, sizeBytes: mib });
    const runner = kernelRunner();
    const attacher = new KernelAttacher(runner, { sysBlockDir: sys, devDir: dev, procDir: proc });
    await assert.rejects(attacher.attach(request('vol-a')), (err) => {
      assert.ok(isArborError(err, 'resource-exhausted'));
      assert.equal(err.message, 'export vol-a: all 2 nbd devices of this host are in use (nbd0 to nbd1); detach unused volumes, or reload the nbd module with more devices (modprobe nbd nbds_max=4)');
      return true;
    });
    fs.rmSync(sys, { recursive: true });
    fs.mkdirSync(sys, { recursive: true });
    await assert.rejects(attacher.attach(request('vol-a')), (err) => isArborError(err, 'failed-precondition') && err.message.endsWith('load the nbd kernel module (modprobe nbd)'));
    assert.deepEqual(runner.commands, [], 'nbd-client never ran');
  });

  it('detaches with nbd-client -d, and detaching again runs nothing', async () => {
    device('nbd0');
    const runner = kernelRunner();
    const attacher = new KernelAttacher(runner, { sysBlockDir: sys, devDir: dev, procDir: proc });
    const req = request('vol-a');
    const attachment = await attacher.attach(req);
    await attacher.detach(attachment);
    await attacher.detach(attachment);
    assert.deepEqual(runner.commands.slice(1), [['nbd-client', '-d', path.join(dev, 'nbd0')]]);
    assert.equal(fs.existsSync(path.join(req.workDir, 'kernel-attachment.json')), false, 'the record is gone');
    assert.equal(await attacher.isHealthy(attachment), false);
  });

  it('reads health from sysfs: alive while connected, dead once the device lost its connection or was reused', async () => {
    device('nbd0');
    const runner = kernelRunner();
    const attacher = new KernelAttacher(runner, { sysBlockDir: sys, devDir: dev, procDir: proc });
    const attachment: Attachment = await attacher.attach(request('vol-a'));
    const pid = Number(attachment.details.connectionPid);

    assert.equal(await attacher.isHealthy(attachment), true, 'connected through netlink: nbd-client gone, the size is there');
    liveProcess(pid);
    setDevice('nbd0', { pid, sizeBytes: 0 });
    assert.equal(await attacher.isHealthy(attachment), true, 'connected through the ioctl interface: the nbd-client serving it is alive');
    fs.rmSync(path.join(proc, String(pid)), { recursive: true });
    assert.equal(await attacher.isHealthy(attachment), false, 'its nbd-client died and the size is gone');
    setDevice('nbd0', {});
    assert.equal(await attacher.isHealthy(attachment), false, 'disconnected');
    setDevice('nbd0', { pid: 9999, sizeBytes: mib });
    assert.equal(await attacher.isHealthy(attachment), false, 'connected again, by another attach');
    await attacher.detach(attachment);
    assert.equal(runner.commands.filter((argv) => argv[1] === '-d').length, 0, "detach leaves another attachment's device alone");
  });

  it('attaches afresh when the recorded device lost its connection', async () => {
    device('nbd0');
    device('nbd1');
    const runner = kernelRunner();
    const attacher = new KernelAttacher(runner, { sysBlockDir: sys, devDir: dev, procDir: proc });
    const first = await attacher.attach(request('vol-a'));
    setDevice('nbd0', { pid: 9999, sizeBytes: mib }); // since disconnected and taken by someone else
    const second = await attacher.attach(request('vol-a'));
    assert.equal(second.device, path.join(dev, 'nbd1'));
    assert.notEqual(second.details.connectionPid, first.details.connectionPid);
    assert.equal(runner.commands.length, 2);
  });
});

describe('choosing how this host attaches', () => {
  function probe(paths: string[], commands: string[], uid = 0): HostProbe {
    return { pathExists: (file) => paths.includes(file), commandInstalled: (command) => commands.includes(command), uid: () => uid };
  }
  const userspaceHost = { paths: ['/dev/fuse', '/dev/loop-control'], commands: ['nbdfuse', 'losetup', 'fusermount3'] };

  it('uses the kernel driver when /dev/nbd0 exists and nbd-client is installed', () => {
    assert.equal(chooseAttacher(probe(['/dev/nbd0', ...userspaceHost.paths], ['nbd-client', ...userspaceHost.commands])).kind, 'kernel');
  });

  it('falls back to userspace without the nbd module or without nbd-client', () => {
    assert.equal(chooseAttacher(probe(userspaceHost.paths, ['nbd-client', ...userspaceHost.commands])).kind, 'userspace');
    assert.equal(chooseAttacher(probe(['/dev/nbd0', ...userspaceHost.paths], userspaceHost.commands)).kind, 'userspace');
  });

  it('says exactly what a bare host lacks', () => {
    assert.throws(
      () => chooseAttacher(probe([], [], 1000)),
      (err) => {
        assert.ok(isArborError(err, 'failed-precondition'));
        assert.equal(
          err.message,
          'this host has no usable way to attach NBD volumes. ' +
            'Kernel NBD: /dev/nbd0 is missing (load the nbd kernel module: modprobe nbd), nbd-client is not installed (Debian package nbd-client). ' +
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
      () => chooseAttacher(probe(['/dev/loop-control'], ['nbd-client', 'nbdfuse', 'losetup', 'fusermount3'])),
      (err) => isArborError(err) && err.message === 'this host has no usable way to attach NBD volumes. Kernel NBD: /dev/nbd0 is missing (load the nbd kernel module: modprobe nbd). Userspace NBD (nbdfuse and a loop device): /dev/fuse is missing (load the fuse module; in a container, give it the host /dev/fuse).',
    );
  });

  it('probes this machine for real: the kernel driver only with /dev/nbd0 and nbd-client, else userspace', () => {
    const kernelNbd = fs.existsSync('/dev/nbd0') && have('nbd-client');
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
