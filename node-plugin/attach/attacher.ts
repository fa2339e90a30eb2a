/**
 * An attacher turns an NBD export into a block device on this host, in one of two
 * ways: the kernel's NBD driver (`kernel.ts`) or, where there is none, nbdfuse and a
 * loop device (`userspace.ts`). The node service chooses one (`index.ts`) and never
 * sees which.
 */
import fs from 'node:fs';
import path from 'node:path';
import { ArborError } from '../../store/errors';
import { nameProblem, parseRefText } from '../../store/names';

export interface AttachRequest {
  /** The NBD server's unix socket. */
  socketPath: string;
  /** Volume name, or NAME@SNAP for a snapshot. */
  exportName: string;
  /**
   * The volume's id. A kernel device carries it as its backend identifier, so it is
   * found again after a restart and never given another volume's connections.
   */
  volumeId: string;
  readOnly: boolean;
  /** A private directory for this volume on this node (exists, 0700); keep pid files, fuse mount points etc. in it. */
  workDir: string;
}

export interface Attachment {
  kind: 'kernel' | 'userspace';
  /** e.g. /dev/nbd3 or /dev/loop7 */
  device: string;
  /** The device's size when attached. */
  sizeBytes: number;
  /** JSON-serializable; the node service persists the whole Attachment to detach it after a plugin restart. */
  details: Record<string, string | number>;
}

export interface Attacher {
  readonly kind: 'kernel' | 'userspace';
  /** Idempotent: attaching again with the same request while the attachment is alive returns it. */
  attach(request: AttachRequest): Promise<Attachment>;
  /** Idempotent: detaching what is already gone succeeds; leaves no loop device, FUSE mount or helper process behind. */
  detach(attachment: Attachment): Promise<void>;
  /** False when the NBD connection behind the device is dead (e.g. the nbdfuse process died or the kernel nbd device lost its server). */
  isHealthy(attachment: Attachment): Promise<boolean>;
  /**
   * Only where attachments outlive the process (the kernel path): gives a device an
   * earlier process attached fresh connections to this one, in place. Undefined when
   * the device is gone. `lostSince`: when its server went away (ms since the epoch).
   */
  reattach?(attachment: Attachment, lostSince: number): Promise<Attachment | undefined>;
  /** Only where a connected device can change its size (the kernel path): resizes it in place. */
  resize?(attachment: Attachment, sizeBytes: number): Promise<Attachment>;
  /** The process is stopping: prepares its devices for the next process (the kernel path). */
  handOver?(): Promise<void>;
}

/** The kernel shows a backend identifier in sysfs followed by a newline: keep it one printable word. */
const maxVolumeIdBytes = 128;
const volumeIdPattern = new RegExp(`^[\\x21-\\x7e]{1,${maxVolumeIdBytes}}$`);

/**
 * Checks a request before anything runs. Names and paths end up in argv and in an
 * NBD URI, so they must be what they claim to be: absolute paths, a store name.
 */
export function validateAttachRequest(request: AttachRequest): void {
  const ref = parseRefText(request.exportName);
  const problem = typeof ref === 'string' ? ref : (nameProblem(ref.volume) ?? (ref.snapshot === undefined ? undefined : nameProblem(ref.snapshot)));
  if (problem) {
    throw new ArborError(
      'invalid-argument',
      `export name ${JSON.stringify(request.exportName)} is not a volume name or NAME@SNAP ('@' in a name written %40, '%' written %25): ${problem}`,
    );
  }
  if (request.exportName.includes('@') && !request.readOnly) {
    throw new ArborError('invalid-argument', `snapshot ${request.exportName} can only be attached read-only`);
  }
  if (!volumeIdPattern.test(request.volumeId)) {
    throw new ArborError(
      'invalid-argument',
      `export ${request.exportName}: volume id '${request.volumeId}' must be 1 to ${maxVolumeIdBytes} printable characters without spaces`,
    );
  }
  for (const [what, value] of [
    ['socket path', request.socketPath],
    ['work directory', request.workDir],
  ] as const) {
    if (!path.isAbsolute(value) || path.resolve(value) !== value || /[\0\n]/.test(value)) {
      throw new ArborError('invalid-argument', `export ${request.exportName}: the ${what} '${value}' must be an absolute, normalized path`);
    }
  }
  let stat: fs.Stats;
  try {
    stat = fs.statSync(request.workDir);
  } catch {
    throw new ArborError(
      'failed-precondition',
      `export ${request.exportName}: work directory ${request.workDir} does not exist; the node service creates it (mode 0700) before attaching`,
    );
  }
  if (!stat.isDirectory()) throw new ArborError('failed-precondition', `export ${request.exportName}: work directory ${request.workDir} is not a directory`);
}

export function accessOf(readOnly: boolean): 'read-only' | 'read-write' {
  return readOnly ? 'read-only' : 'read-write';
}

/** Reads a string that an attacher stored in `details`; a missing or mistyped one means the record is not ours. */
export function detailString(attachment: Attachment, key: string): string {
  const value = attachment.details[key];
  if (typeof value !== 'string')
    throw new ArborError(
      'invalid-argument',
      `attachment of ${attachment.device} has no '${key}' in its details; it was not made by the ${attachment.kind} attacher`,
    );
  return value;
}

export function detailNumber(attachment: Attachment, key: string): number {
  const value = attachment.details[key];
  if (typeof value !== 'number')
    throw new ArborError(
      'invalid-argument',
      `attachment of ${attachment.device} has no '${key}' in its details; it was not made by the ${attachment.kind} attacher`,
    );
  return value;
}

/**
 * Runs operations one at a time per key (a work directory, or the host's pool of nbd
 * devices): an attach and a detach of the same volume must not interleave, and two
 * attaches must not pick the same free device.
 */
export class OneAtATime {
  private tails = new Map<string, Promise<unknown>>();

  run<T>(key: string, operation: () => Promise<T>): Promise<T> {
    const previous = this.tails.get(key) ?? Promise.resolve();
    const result = previous.then(operation, operation);
    const tail = result.catch(() => undefined);
    this.tails.set(key, tail);
    void tail.then(() => {
      if (this.tails.get(key) === tail) this.tails.delete(key);
    });
    return result;
  }
}
