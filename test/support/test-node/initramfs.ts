/**
 * The test node's initramfs, built for each boot from what the host has installed:
 * busybox (static), the kernel modules the tests need (in the order modprobe would
 * load them), and an /init that mounts the host's root read-only over 9p, gives it a
 * writable /tmp and /run, and starts the agent chrooted into it.
 *
 * Written as a newc cpio archive here: it is a few headers, and no cpio program is
 * then needed on the host.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

/** What the guest loads: virtio and 9p to reach the host, the console port for the agent, and what the tests exercise. */
export const guestModules = ['virtio_pci', '9pnet_virtio', '9p', 'virtio_console', 'nbd', 'ext4', 'xfs', 'loop'];

export interface KernelFiles {
  version: string;
  vmlinuz: string;
  modulesDir: string;
}

export interface InitramfsOptions {
  kernel: KernelFiles;
  busybox: string;
  /** The agent script, an absolute path on the host (and so in the guest). */
  agentScript: string;
  /** Host paths hidden in the guest by its own /tmp and /run tmpfs that must stay visible (the repository, when it is under /tmp). */
  keepVisible: string[];
}

/** Where the guest marks its progress on the console, for a boot that fails to say why. */
export const consoleMarker = 'arbor-test-node:';

export function buildInitramfs(options: InitramfsOptions): Buffer {
  const archive = new NewcArchive();
  for (const dir of ['bin', 'proc', 'sys', 'dev', 'host', 'orig', 'modules']) archive.directory(dir);
  archive.file('bin/busybox', fs.readFileSync(options.busybox), 0o755);
  for (const applet of ['sh', 'mount', 'insmod', 'mkdir', 'chroot', 'poweroff', 'cat', 'echo', 'ip', 'hostname']) archive.symlink(`bin/${applet}`, 'busybox');
  const order: string[] = [];
  for (const file of moduleLoadOrder(options.kernel)) {
    const name = path.basename(file);
    archive.file(`modules/${name}`, fs.readFileSync(file), 0o644);
    order.push(name);
  }
  archive.file('modules/order', Buffer.from(order.join('\n') + '\n'), 0o644);
  archive.file('init', Buffer.from(initScript(options)), 0o755);
  return archive.finish();
}

/** Every module file to insmod, dependencies first, each once: what `modprobe --show-depends` prints (nothing for one built in). */
export function moduleLoadOrder(kernel: KernelFiles, modules: readonly string[] = guestModules): string[] {
  const files: string[] = [];
  for (const module of modules) {
    const plan = execFileSync('modprobe', ['-S', kernel.version, '--show-depends', module], { encoding: 'utf8' });
    for (const line of plan.split('\n')) {
      const match = /^insmod (\S+)/.exec(line);
      if (match && !files.includes(match[1])) files.push(match[1]);
    }
  }
  return files;
}

function shellQuote(value: string): string {
  return `'${value.replace(/'/g, `'\\''`)}'`;
}

function initScript(options: InitramfsOptions): string {
  const say = (text: string) => `echo "${consoleMarker} ${text}"`;
  const keep = options.keepVisible.map(
    (dir) => `mkdir -p /host${shellQuote(dir)} && mount --bind /orig${shellQuote(dir)} /host${shellQuote(dir)} || ${say(`cannot keep ${dir} visible`)}`,
  );
  return `#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
ip link set lo up
hostname arbor-test-node
${say('init started at $(cat /proc/uptime)')}
while read -r module; do
  insmod /modules/$module 2>/dev/null || ${say('insmod $module failed')}
done < /modules/order
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /host; then
  ${say("cannot mount the host's root over 9p")}
  poweroff -f
fi
# /orig keeps a view of the host's /tmp and /run before the guest's own hide them.
mount --bind /host /orig
mount -t tmpfs -o mode=1777,size=75% tmp /host/tmp
mount -t tmpfs -o mode=755 run /host/run
for dir in proc sys dev; do mount --bind /$dir /host/$dir; done
mkdir -p /dev/shm && mount -t tmpfs -o mode=1777 shm /dev/shm
${keep.join('\n')}
${say('starting the agent at $(cat /proc/uptime)')}
chroot /host /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp LANG=C.UTF-8 node ${shellQuote(options.agentScript)}
${say('the agent exited with status $?')}
poweroff -f
`;
}

/** The "new" (SVR4, no CRC) cpio format the kernel unpacks: a 110-byte ASCII header per entry, 4-byte aligned. */
export class NewcArchive {
  private readonly parts: Buffer[] = [];
  private inode = 1;

  directory(name: string): void {
    this.entry(name, 0o040755, Buffer.alloc(0));
  }

  file(name: string, data: Buffer, mode: number): void {
    this.entry(name, 0o100000 | mode, data);
  }

  symlink(name: string, target: string): void {
    this.entry(name, 0o120777, Buffer.from(target));
  }

  finish(): Buffer {
    this.entry('TRAILER!!!', 0, Buffer.alloc(0));
    return Buffer.concat(this.parts);
  }

  private entry(name: string, mode: number, data: Buffer): void {
    const nameBytes = Buffer.from(name + '\0');
    const fields = [this.inode++, mode, 0, 0, mode & 0o040000 ? 2 : 1, 0, data.length, 0, 0, 0, 0, nameBytes.length, 0];
    const header = Buffer.from('070701' + fields.map((value) => value.toString(16).padStart(8, '0')).join(''), 'ascii');
    this.parts.push(header, nameBytes, padding(header.length + nameBytes.length), data, padding(data.length));
  }
}

function padding(length: number): Buffer {
  return Buffer.alloc((4 - (length % 4)) % 4);
}
