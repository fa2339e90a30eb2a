import type { CapacityRange__Output } from '../csi/generated/csi/v1/CapacityRange';
import { parseFsType } from '../csi/capabilities';
import { invalid, outOfRange } from '../csi/errors';
import { parseSize, UnitError } from '../lib/units';
import { validateExtentSize } from '../store/geometry';
import { defaultExtentSizeBytes, maxVolumeSizeBytes, sectorSizeBytes } from '../store/limits';
import { isArborError } from '../store/errors';
import { QosLimits, parseQosParameters } from '../store/qos';

/** What a StorageClass may say, after validation. */
export interface ClassParameters {
  extentSizeBytes: number;
  fsType?: 'ext4' | 'xfs';
  /** Extra mkfs options, split on white space; the node checks them again. */
  mkfsOptions: string[];
  /** What the external-provisioner adds with --extra-create-metadata (PVC and PV names). */
  metadata: Record<string, string>;
}

/** Keys the CSI sidecars add to the parameters; accepted and kept as labels. */
const sidecarPrefix = 'csi.storage.k8s.io/';

/** StorageClass parameters: unknown keys are refused, naming the key. */
export function parseParameters(parameters: Record<string, string>): ClassParameters {
  const result: ClassParameters = { extentSizeBytes: defaultExtentSizeBytes, mkfsOptions: [], metadata: {} };
  for (const [key, value] of Object.entries(parameters)) {
    if (key.startsWith(sidecarPrefix)) {
      result.metadata[key] = value;
      continue;
    }
    switch (key) {
      case 'extentSize': {
        let bytes: number;
        try {
          bytes = parseSize(value, 'parameter extentSize');
        } catch (err) {
          throw invalid((err as UnitError).message);
        }
        try {
          validateExtentSize(bytes, 'parameter extentSize');
        } catch (err) {
          throw invalid((err as Error).message);
        }
        result.extentSizeBytes = bytes;
        break;
      }
      case 'fsType':
        result.fsType = parseFsType(value, 'parameter fsType');
        break;
      case 'mkfsOptions':
        result.mkfsOptions = splitOptions(value);
        break;
      default:
        throw invalid(`unknown StorageClass parameter ${JSON.stringify(key)}: Arbor takes extentSize, fsType and mkfsOptions`);
    }
  }
  return result;
}

/**
 * CSI mutable_parameters (a VolumeAttributesClass's parameters): the QoS limits
 * store/qos.ts parses, undefined when there are none. Malformed or unknown keys are
 * INVALID_ARGUMENT naming the key and the volume.
 */
export function parseMutableParameters(parameters: Record<string, string> | undefined, volume: string): QosLimits | undefined {
  if (!parameters || Object.keys(parameters).length === 0) return undefined;
  try {
    return parseQosParameters(parameters, (key) => key.startsWith(sidecarPrefix));
  } catch (err) {
    if (isArborError(err, 'invalid-argument')) throw invalid(`volume ${volume}: mutable_parameters: ${err.message}`);
    throw err;
  }
}

export function splitOptions(value: string): string[] {
  const options = value.split(/\s+/).filter((o) => o.length > 0);
  if (options.length > 0 && !options[0].startsWith('-')) throw invalid(`mkfsOptions ${JSON.stringify(value)} must be mkfs options, starting with '-'`);
  return options;
}

export const defaultVolumeSizeBytes = 1024 ** 3;

/** A 64-bit count from the wire (a decimal string), exact below 2^53, refused below 0. */
export function wireCount(value: string | number | undefined, what: string): number {
  const n = Number(value ?? 0);
  if (!Number.isFinite(n) || n < 0) throw invalid(`${what} must not be negative, got ${value}`);
  return n;
}

/**
 * The size to create, from the capacity range, the extent size and (for a clone)
 * the source's size: at least what is required and the source holds, rounded up to
 * whole extents, never past the limit.
 */
export function sizeFor(range: CapacityRange__Output | null, extentSizeBytes: number, sourceBytes = 0): number {
  const required = wireCount(range?.required_bytes, 'capacity_range.required_bytes');
  const limit = wireCount(range?.limit_bytes, 'capacity_range.limit_bytes');
  if (limit > 0 && required > limit) throw invalid(`capacity_range.required_bytes ${required} is more than limit_bytes ${limit}`);
  const roundUp = (n: number) => Math.ceil(n / extentSizeBytes) * extentSizeBytes;
  let size = roundUp(Math.max(required, sourceBytes, sectorSizeBytes));
  if (required === 0 && sourceBytes === 0) {
    size = roundUp(defaultVolumeSizeBytes);
    if (limit > 0 && size > limit) size = Math.floor(limit / extentSizeBytes) * extentSizeBytes;
  }
  if (limit > 0 && size > limit) {
    throw outOfRange(
      sourceBytes > limit
        ? `the source holds ${sourceBytes} bytes, more than limit_bytes ${limit}`
        : `${required} bytes rounded up to whole ${extentSizeBytes}-byte extents is ${size}, more than limit_bytes ${limit}`,
    );
  }
  if (size === 0) throw outOfRange(`limit_bytes ${limit} is smaller than one ${extentSizeBytes}-byte extent`);
  if (size > maxVolumeSizeBytes) throw outOfRange(`${size} bytes is more than the largest volume, ${maxVolumeSizeBytes} bytes`);
  return size;
}
