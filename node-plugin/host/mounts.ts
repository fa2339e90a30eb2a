/**
 * Mounts and block devices, read straight from /proc/self/mountinfo and sysfs rather
 * than through findmnt or losetup: both stat the paths they are given, which hangs or
 * fails with ENOTCONN on the FUSE mount of a dead nbdfuse, or on a filesystem whose
 * NBD connection is gone.
 */
import fs from 'node:fs';
import path from 'node:path';

const mountInfoFile = '/proc/self/mountinfo';
export const sysBlockDir = '/sys/block';

export interface MountInfoLine {
  /** The device number of the mounted filesystem, "MAJOR:MINOR". */
  majorMinor: string;
  /** The path inside that filesystem which is mounted (a bind mount of a file names the file). */
  root: string;
  mountPoint: string;
  fsType: string;
}

export function mountInfo(): MountInfoLine[] {
  // Spaces, tabs, newlines and backslashes in paths are written as octal escapes.
  const unescape = (field: string) => field.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)));
  return fs
    .readFileSync(mountInfoFile, 'utf8')
    .split('\n')
    .filter((line) => line !== '')
    .map((line) => {
      const fields = line.split(' ');
      const separator = fields.indexOf('-', 6);
      return { majorMinor: fields[2], root: unescape(fields[3]), mountPoint: unescape(fields[4]), fsType: fields[separator + 1] ?? '' };
    });
}

export function isMountPoint(dir: string): boolean {
  return mountInfo().some((line) => line.mountPoint === dir);
}

/** The kernel's name of a /dev/NAME block device when sysfs knows it, else undefined. */
export function blockDeviceName(device: string): string | undefined {
  const match = /^\/dev\/([a-z]+[0-9]+)$/.exec(device);
  return match && fs.existsSync(path.join(sysBlockDir, match[1])) ? match[1] : undefined;
}

/** A block device's size from sysfs, which counts 512-byte sectors whatever the block size; 0 when unknown. */
export function sysfsSizeBytes(name: string): number {
  try {
    return Number(fs.readFileSync(path.join(sysBlockDir, name, 'size'), 'utf8').trim()) * 512;
  } catch {
    return 0;
  }
}

/**
 * Where a block device is in use through a mount: filesystems mounted from it, and
 * its device node bound onto a file (how a Block volume is published).
 */
export function mountPointsOfDevice(device: string): string[] {
  const name = blockDeviceName(device);
  if (!name) return [];
  let majorMinor: string;
  try {
    majorMinor = fs.readFileSync(path.join(sysBlockDir, name, 'dev'), 'utf8').trim();
  } catch {
    return [];
  }
  return mountInfo()
    .filter((line) => line.majorMinor === majorMinor || (line.fsType === 'devtmpfs' && line.root === `/${name}`))
    .map((line) => line.mountPoint);
}
