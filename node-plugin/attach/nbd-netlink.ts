/**
 * The kernel's NBD driver, configured over its generic netlink family. Node.js has
 * no netlink socket, so each operation runs `arbor-nbd-netlink` (native/nbd-netlink.c,
 * built into dist/native by `npm ci` and `npm run build`); the connected sockets a
 * device is to use are handed to it as inherited file descriptors, and the kernel
 * keeps its own reference to each.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import { packagePath } from '../../lib/package-root';
import { ArborError } from '../../store/errors';

/** Built by native/build.sh into dist/native/. */
export const netlinkHelperPath = packagePath('dist', 'native', 'arbor-nbd-netlink');

/** One netlink request takes microseconds; this bounds a kernel that hangs in one. */
export const netlinkHelperTimeoutMs = 30_000;

export interface ConnectRequest {
  /** Connected sockets at the start of the transmission phase, no longer read by this process. */
  sockets: net.Socket[];
  sizeBytes: number;
  blockSizeBytes: number;
  /** The export's transmission flags (NBD_FLAG_*), as the server sent them, plus READ_ONLY for a read-only attach. */
  serverFlags: number;
  /** Seconds before a request the server has not answered fails; 0: never. The kernel's default when absent. */
  timeoutSeconds?: number;
  /** Seconds I/O waits for a new connection when every connection is dead; 0 or absent: it fails at once. */
  deadConnTimeoutSeconds?: number;
  /** Shown in /sys/block/nbdN/backend; a RECONFIGURE must name the same one. */
  identifier?: string;
}

export interface ReconfigureRequest {
  index: number;
  identifier?: string;
  /** Fresh connections, each replacing a dead one. */
  sockets?: net.Socket[];
  sizeBytes?: number;
  timeoutSeconds?: number;
  deadConnTimeoutSeconds?: number;
}

export interface DeviceStatus {
  index: number;
  /** The device has a configuration (it was connected and not yet disconnected); says nothing of its sockets. */
  connected: boolean;
}

/** The kernel (or the netlink socket) refused: `code` is the errno's name, e.g. EBUSY. */
export class NetlinkError extends ArborError {
  constructor(
    readonly errno: number,
    readonly errnoCode: string,
    message: string,
  ) {
    // ENODEV: no nbd module; EPERM/EACCES: not privileged enough. Both are the host's state, not ours.
    super(['ENODEV', 'EPERM', 'EACCES'].includes(errnoCode) ? 'failed-precondition' : errnoCode === 'EBUSY' ? 'busy' : 'internal', message);
    this.name = 'NetlinkError';
  }
}

/** Connects a new device (the kernel picks a free one, or makes one); returns its index: /dev/nbdINDEX. */
export async function connectDevice(request: ConnectRequest): Promise<number> {
  const args = [
    'connect',
    '--size', String(request.sizeBytes),
    '--block-size', String(request.blockSizeBytes),
    '--server-flags', String(request.serverFlags),
    ...optional('--timeout', request.timeoutSeconds),
    ...optional('--dead-conn-timeout', request.deadConnTimeoutSeconds),
    ...optional('--identifier', request.identifier),
  ]; // prettier-ignore
  const reply = await runHelper(args, request.sockets);
  return indexOf(reply);
}

export async function reconfigureDevice(request: ReconfigureRequest): Promise<void> {
  const args = [
    'reconfigure',
    '--index', String(request.index),
    ...optional('--identifier', request.identifier),
    ...optional('--size', request.sizeBytes),
    ...optional('--timeout', request.timeoutSeconds),
    ...optional('--dead-conn-timeout', request.deadConnTimeoutSeconds),
  ]; // prettier-ignore
  await runHelper(args, request.sockets ?? []);
}

export async function disconnectDevice(index: number): Promise<void> {
  await runHelper(['disconnect', '--index', String(index)], []);
}

export async function deviceStatus(index?: number): Promise<DeviceStatus[]> {
  const reply = await runHelper(['status', ...optional('--index', index)], []);
  if (!Array.isArray(reply.devices)) throw new ArborError('internal', `arbor-nbd-netlink status printed no device list: ${JSON.stringify(reply)}`);
  return reply.devices.map((device: unknown) => {
    const { index: i, connected } = device as { index: unknown; connected: unknown };
    if (typeof i !== 'number' || typeof connected !== 'boolean')
      throw new ArborError('internal', `arbor-nbd-netlink status printed a malformed device: ${JSON.stringify(device)}`);
    return { index: i, connected };
  });
}

export function helperBuilt(): boolean {
  try {
    fs.accessSync(netlinkHelperPath, fs.constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

function optional(option: string, value: number | string | undefined): string[] {
  return value === undefined ? [] : [option, String(value)];
}

function indexOf(reply: Record<string, unknown>): number {
  const index = reply.index;
  if (typeof index !== 'number' || !Number.isInteger(index) || index < 0)
    throw new ArborError('internal', `arbor-nbd-netlink printed no device index: ${JSON.stringify(reply)}`);
  return index;
}

/**
 * Runs the helper with `sockets` as its file descriptors 3, 4, ... and returns the
 * JSON object it printed; a refusal becomes a NetlinkError with the kernel's words.
 */
function runHelper(args: string[], sockets: net.Socket[]): Promise<Record<string, unknown>> {
  const fdArgs = sockets.flatMap((_, i) => ['--fd', String(3 + i)]);
  const argv = [...args, ...fdArgs];
  return new Promise((resolve, reject) => {
    const child = spawn(netlinkHelperPath, argv, { stdio: ['ignore', 'pipe', 'pipe', ...sockets] });
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk));
    child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk));
    const timer = setTimeout(() => child.kill('SIGKILL'), netlinkHelperTimeoutMs);
    child.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(
        err.code === 'ENOENT'
          ? new ArborError(
              'failed-precondition',
              `the kernel NBD helper ${netlinkHelperPath} is not built: install a C compiler (Debian: gcc, libc6-dev) and run 'npm run build'`,
            )
          : new ArborError('internal', `arbor-nbd-netlink could not start: ${err.message}`),
      );
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      const what = `arbor-nbd-netlink ${argv.join(' ')}`;
      if (signal) return reject(new ArborError('internal', `${what} was killed by ${signal} (no answer within ${netlinkHelperTimeoutMs} ms?)`));
      if (code === 2) return reject(new ArborError('internal', `${what}: bad command line (a bug in Arbor): ${stderr.trim()}`));
      let reply: Record<string, unknown>;
      try {
        reply = JSON.parse(stdout) as Record<string, unknown>;
      } catch {
        return reject(new ArborError('internal', `${what} exited ${code} without a JSON answer: ${stdout.trim()} ${stderr.trim()}`));
      }
      if (reply.ok === true && code === 0) return resolve(reply);
      reject(new NetlinkError(Number(reply.errno), String(reply.code), String(reply.message)));
    });
  });
}
