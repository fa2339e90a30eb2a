import type { VolumeCapability__Output } from './generated/csi/v1/VolumeCapability';
import { invalid } from './errors';

export const supportedFsTypes = ['ext4', 'xfs'] as const;

export function parseFsType(value: string, what: string): 'ext4' | 'xfs' {
  if (!(supportedFsTypes as readonly string[]).includes(value)) throw invalid(`${what} ${JSON.stringify(value)} is not supported: use ext4 or xfs`);
  return value as 'ext4' | 'xfs';
}

const modes = {
  SINGLE_NODE_WRITER: { multiNode: false, readOnly: false },
  SINGLE_NODE_READER_ONLY: { multiNode: false, readOnly: true },
  SINGLE_NODE_SINGLE_WRITER: { multiNode: false, readOnly: false },
  SINGLE_NODE_MULTI_WRITER: { multiNode: false, readOnly: false },
  MULTI_NODE_READER_ONLY: { multiNode: true, readOnly: true },
} as const;

export type AccessMode = keyof typeof modes;

export interface Capability {
  mode: AccessMode;
  multiNode: boolean;
  readOnly: boolean;
  access: 'block' | 'mount';
  fsType?: 'ext4' | 'xfs';
  mountFlags: string[];
}

/** A volume capability Arbor can serve, or INVALID_ARGUMENT saying why not. */
export function parseCapability(capability: VolumeCapability__Output | null | undefined, what = 'volume_capability'): Capability {
  if (!capability) throw invalid(`${what} is required`);
  const mode = capability.access_mode?.mode;
  if (!mode || mode === 'UNKNOWN') throw invalid(`${what}.access_mode is required`);
  if (!(mode in modes))
    throw invalid(`${what}: access mode ${mode} is not supported (a volume is written from one node; MULTI_NODE_READER_ONLY reads from many)`);
  const known = modes[mode as AccessMode];
  if (capability.access_type === 'block' || capability.block) {
    return { mode: mode as AccessMode, ...known, access: 'block', mountFlags: [] };
  }
  if (capability.access_type === 'mount' || capability.mount) {
    const mount = capability.mount!;
    const fsType = mount.fs_type ? parseFsType(mount.fs_type, `${what}.mount.fs_type`) : undefined;
    for (const flag of mount.mount_flags) {
      if (!/^[A-Za-z0-9_.=:/-]+$/.test(flag)) throw invalid(`${what}.mount.mount_flags: ${JSON.stringify(flag)} is not a mount option`);
    }
    return { mode: mode as AccessMode, ...known, access: 'mount', fsType, mountFlags: [...mount.mount_flags] };
  }
  throw invalid(`${what}.access_type is required: block or mount`);
}
