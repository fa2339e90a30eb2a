import type { VolumeCapability__Output } from './generated/csi/v1/VolumeCapability';
import { invalid } from './errors';

export const supportedFsTypes = ['ext4', 'xfs'] as const;

export function parseFsType(value: string, what: string): 'ext4' | 'xfs' {
  if (!(supportedFsTypes as readonly string[]).includes(value)) throw invalid(`${what} ${JSON.stringify(value)} is not supported: use ext4 or xfs`);
  return value as 'ext4' | 'xfs';
}

/**
 * The access modes Arbor serves, as the spec defines them (csi.proto, AccessMode.Mode):
 * `multiNode`, published to several nodes at once; `multiNodeWriter`, read-write on
 * several nodes at once (Block volumes only, see below); `readOnly`, never written.
 * MULTI_NODE_SINGLE_WRITER is left out: it asks the plugin to keep one writer among
 * readers of a changing volume, which no Kubernetes access mode maps to, and a
 * filesystem mounted read-only on one node while another writes it reads garbage.
 */
const modes = {
  SINGLE_NODE_WRITER: { multiNode: false, multiNodeWriter: false, readOnly: false },
  SINGLE_NODE_READER_ONLY: { multiNode: false, multiNodeWriter: false, readOnly: true },
  SINGLE_NODE_SINGLE_WRITER: { multiNode: false, multiNodeWriter: false, readOnly: false },
  SINGLE_NODE_MULTI_WRITER: { multiNode: false, multiNodeWriter: false, readOnly: false },
  MULTI_NODE_READER_ONLY: { multiNode: true, multiNodeWriter: false, readOnly: true },
  MULTI_NODE_MULTI_WRITER: { multiNode: true, multiNodeWriter: true, readOnly: false },
} as const;

export type AccessMode = keyof typeof modes;

export interface Capability {
  mode: AccessMode;
  multiNode: boolean;
  /** Read-write on several nodes at once: MULTI_NODE_MULTI_WRITER, only ever with `access: 'block'`. */
  multiNodeWriter: boolean;
  readOnly: boolean;
  access: 'block' | 'mount';
  fsType?: 'ext4' | 'xfs';
  mountFlags: string[];
}

/**
 * A volume capability Arbor can serve, or INVALID_ARGUMENT saying why not.
 * `volume` (a name or id), when known, starts the message so the CO's event names it.
 */
export function parseCapability(capability: VolumeCapability__Output | null | undefined, what = 'volume_capability', volume?: string): Capability {
  const refuse = (message: string) => invalid(volume ? `volume ${volume}: ${message}` : message);
  if (!capability) throw refuse(`${what} is required`);
  const mode = capability.access_mode?.mode;
  if (!mode || mode === 'UNKNOWN') throw refuse(`${what}.access_mode is required`);
  if (!(mode in modes)) {
    throw refuse(
      `${what}: access mode ${mode} is not supported: use SINGLE_NODE_WRITER (one node writes), MULTI_NODE_READER_ONLY (many nodes read) or, for a Block volume, MULTI_NODE_MULTI_WRITER`,
    );
  }
  const known = modes[mode as AccessMode];
  if (capability.access_type === 'block' || capability.block) {
    return { mode: mode as AccessMode, ...known, access: 'block', mountFlags: [] };
  }
  if (capability.access_type === 'mount' || capability.mount) {
    if (known.multiNodeWriter) {
      // The node would mount the same ext4 or xfs on every node it is published to:
      // each kernel caches and rewrites the filesystem's metadata as if it were alone.
      throw refuse(
        `${what}: access mode ${mode} is for Block volumes only: ext4 and xfs are not cluster filesystems, and two nodes mounting one would corrupt it; ask for a Block volume (volumeMode: Block, as KubeVirt live migration does) or a single-node access mode`,
      );
    }
    const mount = capability.mount!;
    const fsType = mount.fs_type ? parseFsType(mount.fs_type, `${volume ? `volume ${volume}: ` : ''}${what}.mount.fs_type`) : undefined;
    for (const flag of mount.mount_flags) {
      if (!/^[A-Za-z0-9_.=:/-]+$/.test(flag)) throw refuse(`${what}.mount.mount_flags: ${JSON.stringify(flag)} is not a mount option`);
    }
    return { mode: mode as AccessMode, ...known, access: 'mount', fsType, mountFlags: [...mount.mount_flags] };
  }
  throw refuse(`${what}.access_type is required: block or mount`);
}
