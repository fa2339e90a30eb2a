/**
 * Which attach path this host can use: the kernel's NBD driver when it is there
 * (faster: no FUSE round trip, no loop device), else nbdfuse and a loop device.
 */
import fs from 'node:fs';
import path from 'node:path';
import { ArborError } from '../../store/errors';
import { CommandRunner, hostCommands } from '../host/commands';
import { Attacher } from './attacher';
import { KernelAttacher, KernelAttacherOptions } from './kernel';
import { helperBuilt, netlinkHelperPath } from './nbd-netlink';
import { UserspaceAttacher } from './userspace';

export { Attacher, AttachRequest, Attachment } from './attacher';
export { KernelAttacher } from './kernel';
export { UserspaceAttacher } from './userspace';

/** What `chooseAttacher` asks of the host; tests pass a fake one. */
export interface HostProbe {
  pathExists(path: string): boolean;
  /** Whether Arbor's netlink helper for the kernel NBD driver was built (it needs a C compiler at install). */
  netlinkHelperBuilt(): boolean;
  /** Whether an executable of this name is on PATH. */
  commandInstalled(command: string): boolean;
  uid(): number;
}

export const realHostProbe: HostProbe = {
  pathExists: (file) => fs.existsSync(file),
  netlinkHelperBuilt: helperBuilt,
  commandInstalled: (command) =>
    (process.env.PATH ?? '')
      .split(':')
      .filter((dir) => dir !== '')
      .some((dir) => {
        try {
          fs.accessSync(path.join(dir, command), fs.constants.X_OK);
          return true;
        } catch {
          return false;
        }
      }),
  uid: () => process.getuid?.() ?? -1,
};

/** Each program the userspace path runs, with the Debian package that has it. */
const userspaceCommands = [
  ['nbdfuse', 'libnbd-bin'],
  ['losetup', 'mount'],
  ['fusermount3', 'fuse3'],
] as const;

export function chooseAttacher(probe: HostProbe = realHostProbe, runner: CommandRunner = hostCommands, kernelOptions: KernelAttacherOptions = {}): Attacher {
  const kernelLacks: string[] = [];
  if (!probe.pathExists('/dev/nbd0')) kernelLacks.push('/dev/nbd0 is missing (load the nbd kernel module: modprobe nbd)');
  if (!probe.netlinkHelperBuilt()) kernelLacks.push(`Arbor's netlink helper ${netlinkHelperPath} is not built (install gcc and libc6-dev, then npm run build)`);
  if (kernelLacks.length === 0) return new KernelAttacher(kernelOptions);

  const userspaceLacks: string[] = [];
  if (!probe.pathExists('/dev/fuse')) userspaceLacks.push('/dev/fuse is missing (load the fuse module; in a container, give it the host /dev/fuse)');
  if (!probe.pathExists('/dev/loop-control')) userspaceLacks.push('/dev/loop-control is missing (load the loop module; in a container, give it the host /dev)');
  for (const [command, debianPackage] of userspaceCommands) {
    if (!probe.commandInstalled(command)) userspaceLacks.push(`${command} is not installed (Debian package ${debianPackage})`);
  }
  const uid = probe.uid();
  if (uid !== 0) userspaceLacks.push(`the plugin runs as uid ${uid}, not root (losetup and mount need root)`);
  if (userspaceLacks.length === 0) return new UserspaceAttacher(runner);

  throw new ArborError(
    'failed-precondition',
    `this host has no usable way to attach NBD volumes. Kernel NBD: ${kernelLacks.join(', ')}. Userspace NBD (nbdfuse and a loop device): ${userspaceLacks.join(', ')}.`,
  );
}
