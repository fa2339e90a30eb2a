/**
 * The kernel's nbd devices as sysfs shows them. A device configured over netlink has
 * a `pid` file while it holds a configuration and a `backend` file with the
 * identifier it was connected with: Arbor puts the volume's id there, so that is how a
 * device is known to be a volume's, whatever any record says.
 */
import fs from 'node:fs';
import path from 'node:path';
import { ArborError } from '../../store/errors';
import { sysBlockDir } from '../host/mounts';

/** nbdN of /dev/nbdN; anything else is not a device the kernel attacher made. */
export function nbdName(device: string): string {
  const name = path.basename(device);
  if (!/^nbd\d+$/.test(name) || device !== `/dev/${name}`)
    throw new ArborError('invalid-argument', `${device} is not an nbd device; this attachment was not made by the kernel attacher`);
  return name;
}

export function nbdIndex(device: string): number {
  return Number(nbdName(device).slice(3));
}

export function readSysfs(name: string, file: string): string | undefined {
  try {
    const value = fs.readFileSync(path.join(sysBlockDir, name, file), 'utf8').trim();
    return value === '' ? undefined : value;
  } catch {
    return undefined;
  }
}

/** The device holds a configuration (connected, not yet disconnected) made with this identifier. */
export function configuredFor(device: string, identifier: string): boolean {
  const name = nbdName(device);
  return readSysfs(name, 'pid') !== undefined && readSysfs(name, 'backend') === identifier;
}

/** Configured nbd devices whose backend identifier is `identifier`. */
export function devicesWithIdentifier(identifier: string): string[] {
  let names: string[];
  try {
    names = fs.readdirSync(sysBlockDir);
  } catch {
    return [];
  }
  return names
    .filter((name) => /^nbd\d+$/.test(name))
    .map((name) => `/dev/${name}`)
    .filter((device) => configuredFor(device, identifier));
}
