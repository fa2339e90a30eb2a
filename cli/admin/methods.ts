import { ArborError } from '../../store/errors';
import { StoreApi, StoreMethod } from '../../store/api';
import { Store } from '../../store/store';

export type { StoreApi };

/**
 * What the admin socket offers: the store's management calls, each with a check of
 * its JSON arguments so a malformed request is refused before it reaches the store.
 */
type Check = (value: unknown) => boolean;

const str: Check = (v) => typeof v === 'string';
const num: Check = (v) => typeof v === 'number' && Number.isFinite(v);
const ref: Check = (v) => isObject(v) && Object.keys(v).length === 1 && (str((v as Record<string, unknown>).name) || str((v as Record<string, unknown>).id));
const optional =
  (check: Check): Check =>
  (v) =>
    v === undefined || v === null || check(v);
const bool: Check = (v) => typeof v === 'boolean';
/** A snapshot by id, store-wide name, or { volume, name }. */
const snapshotRef: Check = (v) =>
  ref(v) || (isObject(v) && Object.keys(v).length === 2 && ref((v as Record<string, unknown>).volume) && str((v as Record<string, unknown>).name));
const snapshotScope: Check = (v) => v === 'volume' || v === 'store';
const stringMap: Check = (v) => isObject(v) && Object.values(v).every(str);
const sizeOptions: Check = (v) =>
  isObject(v) &&
  num((v as Record<string, unknown>).sizeBytes) &&
  optional(num)((v as Record<string, unknown>).extentSizeBytes) &&
  optional(stringMap)((v as Record<string, unknown>).labels);
const cloneSource: Check = (v) =>
  isObject(v) && Object.keys(v).length === 1 && (ref((v as Record<string, unknown>).volume) || ref((v as Record<string, unknown>).snapshot));
const cloneOptions: Check = (v) =>
  isObject(v) && optional(stringMap)((v as Record<string, unknown>).labels) && optional(bool)((v as Record<string, unknown>).exclusive);
const findSnapshotOptions: Check = (v) => isObject(v) && optional(bool)((v as Record<string, unknown>).mayBeStale);
const publishOptions: Check = (v) => isObject(v) && bool((v as Record<string, unknown>).readOnly) && bool((v as Record<string, unknown>).multiNode);
const staging: Check = (v) => isObject(v) && Object.keys(v).length === 2 && str((v as Record<string, unknown>).id) && str((v as Record<string, unknown>).name);
const receivePlan: Check = (v) => {
  if (!isObject(v)) return false;
  const p = v as Record<string, unknown>;
  const base = p.base as Record<string, unknown> | undefined;
  return (
    str(p.volume) &&
    str(p.snapshot) &&
    str(p.origin) &&
    num(p.sizeBytes) &&
    num(p.extentSizeBytes) &&
    optional(bool)(p.force) &&
    optional(str)(p.createdAt) &&
    (base === undefined || (isObject(base) && str(base.name) && str(base.origin)))
  );
};
const qosLimits: Check = (v) =>
  isObject(v) &&
  Object.keys(v).every((key) => key === 'maxIops' || key === 'maxBandwidthBytes' || key === 'burstSeconds') &&
  Object.values(v).every((n) => n === undefined || num(n));
/** { after?, limit? } and, for snapshots, { volumeId? }: the store checks their values and names the field. */
const pageOptions =
  (...extra: string[]): Check =>
  (v) =>
    isObject(v) && Object.keys(v).every((key) => key === 'after' || key === 'limit' || extra.includes(key));
const refs: Check = (v) => Array.isArray(v) && v.every(ref);

function isObject(v: unknown): v is object {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

export const adminMethods = {
  createVolume: [str, sizeOptions],
  listVolumes: [],
  volumesPage: [optional(pageOptions())],
  getVolume: [ref],
  findVolume: [ref],
  volumeUsage: [ref],
  volumeQos: [ref],
  setVolumeQos: [ref, qosLimits],
  cloneVolume: [str, cloneSource, optional(cloneOptions)],
  resizeVolume: [ref, num],
  deleteVolume: [ref],
  createSnapshot: [ref, str, optional(snapshotScope)],
  listSnapshots: [optional(ref)],
  snapshotsPage: [optional(pageOptions('volumeId'))],
  getSnapshot: [snapshotRef],
  findSnapshot: [snapshotRef, optional(findSnapshotOptions)],
  deleteSnapshot: [snapshotRef],
  diffSnapshots: [ref, ref],
  snapshotAllocated: [ref],
  beginReceive: [receivePlan],
  finishReceive: [staging, receivePlan],
  abortReceive: [staging],
  collectGarbage: [],
  createGroupSnapshot: [str, refs],
  findGroupSnapshot: [ref],
  listGroupSnapshots: [],
  deleteGroupSnapshot: [ref],
  publications: [str],
  publishVolume: [str, str, publishOptions],
  unpublishVolume: [str, optional(str)],
  availableBytes: [],
  healthy: [],
  registerNode: [
    str,
    (v) =>
      isObject(v) &&
      Object.keys(v).every((key) => key === 'topology' || key === 'nbdAddress') &&
      stringMap((v as Record<string, unknown>).topology) &&
      optional(str)((v as Record<string, unknown>).nbdAddress),
  ],
  findNode: [str],
} satisfies Record<StoreMethod, Check[]>;

export type AdminMethod = keyof typeof adminMethods;

/** Runs a request against the store after checking its method and arguments. */
export async function dispatch(store: Store, method: unknown, args: unknown): Promise<unknown> {
  if (typeof method !== 'string' || !Object.prototype.hasOwnProperty.call(adminMethods, method)) {
    throw new ArborError('invalid-argument', `unknown admin method ${JSON.stringify(method)}`);
  }
  const checks: Check[] = adminMethods[method as AdminMethod];
  if (!Array.isArray(args) || args.length > checks.length || !checks.every((check, i) => check(args[i]))) {
    throw new ArborError('invalid-argument', `malformed arguments for ${method}`);
  }
  const call = store[method as AdminMethod] as (...a: unknown[]) => Promise<unknown>;
  return call.apply(
    store,
    args.map((a) => (a === null ? undefined : a)),
  );
}
