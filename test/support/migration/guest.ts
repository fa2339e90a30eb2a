/**
 * The migrating guest: Debian's kernel and an initramfs of busybox (static), the
 * virtio modules for its one disk, and an /init that writes stamped 4 KiB blocks to
 * /dev/vda for ever, O_DIRECT and fsync'd one by one, and reports each on the serial
 * console once it completed (stamp.ts has the formats).
 *
 * Nothing else: no 9p share (QEMU will not migrate a VM with one), no network, no
 * Node.js, so the guest boots in seconds under TCG and has little RAM to migrate.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { KernelFiles, moduleLoadOrder, NewcArchive } from '../test-node/initramfs';
import { findKernel, findStaticBusybox } from '../test-node/test-node';
import { assertRun, blockBytes, guestMarker } from './stamp';

/** virtio_blk and the virtio PCI transport are modules in Debian's kernel; their dependencies come first. */
const guestModules = ['virtio_pci', 'virtio_blk'];
const applets = ['sh', 'mount', 'insmod', 'cat', 'echo', 'sleep', 'dd', 'printf', 'poweroff'];

/** A guest ready to boot: the same for source and target, as a migration needs. */
export interface GuestImage {
  kernel: KernelFiles;
  initrd: string;
  blocks: number;
  run: string;
  /** The kernel command line: the console, and the writer's settings. */
  append: string;
}

/** Writes the initramfs to `dir` and picks a fresh run id (unless given). */
export function prepareGuest(options: { dir: string; blocks: number; run?: string }): GuestImage {
  if (!Number.isInteger(options.blocks) || options.blocks < 1) throw new Error(`blocks must be a positive integer, not ${options.blocks}`);
  const run = options.run ?? crypto.randomBytes(4).toString('hex');
  assertRun(run);
  const kernel = findKernel();
  const initrd = path.join(options.dir, 'migration-guest.cpio');
  fs.writeFileSync(initrd, buildGuestInitramfs(kernel, findStaticBusybox()));
  // loglevel=3: only the kernel's critical messages (a panic) reach the console, so
  // none lands in the middle of a line the harness reads.
  const append = `console=ttyS0 loglevel=3 panic=-1 arbor.blocks=${options.blocks} arbor.run=${run}`;
  return { kernel, initrd, blocks: options.blocks, run, append };
}

export function buildGuestInitramfs(kernel: KernelFiles, busybox: string): Buffer {
  const archive = new NewcArchive();
  for (const dir of ['bin', 'proc', 'sys', 'dev', 'modules']) archive.directory(dir);
  archive.file('bin/busybox', fs.readFileSync(busybox), 0o755);
  for (const applet of applets) archive.symlink(`bin/${applet}`, 'busybox');
  const order: string[] = [];
  for (const file of moduleLoadOrder(kernel, guestModules)) {
    const name = path.basename(file);
    archive.file(`modules/${name}`, fs.readFileSync(file), 0o644);
    order.push(name);
  }
  archive.file('modules/order', Buffer.from(order.join('\n') + '\n'), 0o644);
  archive.file('init', Buffer.from(initScript), 0o755);
  return archive.finish();
}

// The writer: one dd per block, so each write is its own O_DIRECT open, write and
// fsync (busybox dd maps its buffer, so it is page-aligned as O_DIRECT needs), and
// "arbor-write" is printed only after dd returned success. iflag=fullblock with
// conv=sync reads the whole stamp and pads it with zeros to the block.
const initScript = `#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read -r module; do
  insmod /modules/$module || echo "${guestMarker} insmod $module failed"
done < /modules/order
blocks=
run=
for word in $(cat /proc/cmdline); do
  case "$word" in
    arbor.blocks=*) blocks=\${word#arbor.blocks=} ;;
    arbor.run=*) run=\${word#arbor.run=} ;;
  esac
done
tries=0
while [ ! -b /dev/vda ] && [ $tries -lt 100 ]; do sleep 0.1; tries=$((tries + 1)); done
if [ ! -b /dev/vda ] || [ -z "$blocks" ] || [ -z "$run" ]; then
  echo "${guestMarker} cannot write: /dev/vda $([ -b /dev/vda ] && echo present || echo missing), blocks '$blocks', run '$run'"
  poweroff -f
fi
echo "${guestMarker} writing $blocks blocks of /dev/vda, run $run, at $(cat /proc/uptime)"
seq=0
while :; do
  seq=$((seq + 1))
  block=$((seq % blocks))
  if printf 'arbor-stamp %s %d %d\\n' "$run" "$seq" "$block" |
    dd of=/dev/vda bs=${blockBytes} count=1 seek="$block" iflag=fullblock oflag=direct conv=notrunc,sync,fsync status=none; then
    echo "arbor-write $seq $block"
  else
    echo "arbor-write-failed $seq $block $?"
    while :; do sleep 3600; done
  fi
done
`;
