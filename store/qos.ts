import { Catalog, KvEntry, WatchEvent } from './catalog/catalog';
import { Check, count, decode, invalid, optional, shape } from './decode';
import { ArborError } from './errors';
import { maxQosBurstSeconds, maxQosIops, defaultQosBurstSeconds } from './limits';
import { parseSize, UnitError, formatSize } from '../lib/units';

/**
 * A volume's I/O limits (quality of service). Every field absent: no limit. The NBD
 * server enforces them per volume, across all its connections, with a token bucket
 * (node-plugin/qos-throttle.ts); the store only keeps them and says when they change.
 *
 * They live in their own catalog key, `qos/<volume-id>`, not in the volume record:
 * the record is written only by its open Volume (or a catalog transaction while it
 * is detached), and a commit compares its revision, so a limit set from another
 * process would have to be routed to the owner and would race every commit. The QoS
 * key has one writer at a time by its own compare, any process may set it, and the
 * owner learns of it by watching `qos/` (and at once when set in the same process).
 */
export interface QosLimits {
  /** Requests per second (reads, writes, trims, write-zeroes). */
  maxIops?: number;
  /** Bytes per second read and written. */
  maxBandwidthBytes?: number;
  /** How far an idle volume may run ahead of its limits: the bucket holds this many seconds of each rate. */
  burstSeconds?: number;
}

/** The parameter keys (CSI mutable_parameters, a VolumeAttributesClass's parameters). */
export const qosParameterKeys = ['maxIops', 'maxBandwidth', 'burstSeconds'] as const;

const positive: Check<number> = (value, path) => {
  const n = typeof value === 'number' && Number.isFinite(value) && value > 0 ? value : invalid(path, 'a positive number', value);
  return n;
};

const qosShape = shape<QosLimits>({ maxIops: optional(count), maxBandwidthBytes: optional(count), burstSeconds: optional(positive) });

export const qosKey = (volumeId: string): string => `qos/${volumeId}`;
export const qosPrefix = 'qos/';

export function decodeQos(entry: KvEntry): QosLimits {
  return decode(entry, 'the QoS limits of a volume', qosShape);
}

export function isUnlimited(limits: QosLimits): boolean {
  return limits.maxIops === undefined && limits.maxBandwidthBytes === undefined;
}

/** The bucket's depth in seconds of each rate. */
export function burstSecondsOf(limits: QosLimits): number {
  return limits.burstSeconds ?? defaultQosBurstSeconds;
}

/**
 * Limits from parameters as a person or a VolumeAttributesClass writes them:
 * `maxIops: "1000"`, `maxBandwidth: "100MiB"` (per second; "/s" may follow),
 * `burstSeconds: "2"`. The value "unlimited" clears a limit. Unknown keys and
 * malformed values are refused (invalid-argument) naming the key. `accept` lets
 * the caller skip keys that are not QoS (the sidecars' own).
 */
export function parseQosParameters(parameters: Record<string, string>, accept: (key: string) => boolean = () => false): QosLimits {
  const limits: QosLimits = {};
  for (const [key, raw] of Object.entries(parameters)) {
    if (accept(key)) continue;
    const value = raw.trim();
    const refuse = (why: string) => new ArborError('invalid-argument', `parameter ${key} ${JSON.stringify(raw)} ${why}`);
    switch (key) {
      case 'maxIops': {
        if (value === 'unlimited') break;
        if (!/^\d+$/.test(value)) throw refuse('is not a whole number of requests per second (or "unlimited")');
        const n = Number(value);
        if (n < 1 || n > maxQosIops) throw refuse(`is out of range: from 1 to ${maxQosIops} requests per second`);
        limits.maxIops = n;
        break;
      }
      case 'maxBandwidth': {
        if (value === 'unlimited') break;
        let bytes: number;
        try {
          bytes = parseSize(value.replace(/\/s$/i, ''), `parameter ${key}`);
        } catch (err) {
          if (err instanceof UnitError) throw new ArborError('invalid-argument', `${err.message} per second (or "unlimited")`);
          throw err;
        }
        if (bytes < 1) throw refuse('must be at least 1 byte per second');
        limits.maxBandwidthBytes = bytes;
        break;
      }
      case 'burstSeconds': {
        const n = /^\d+(\.\d+)?$/.test(value) ? Number(value) : NaN;
        if (!(n > 0 && n <= maxQosBurstSeconds)) throw refuse(`is not a number of seconds above 0 and at most ${maxQosBurstSeconds}`);
        limits.burstSeconds = n;
        break;
      }
      default:
        throw new ArborError('invalid-argument', `unknown QoS parameter ${JSON.stringify(key)}: Arbor takes ${qosParameterKeys.join(', ')}`);
    }
  }
  return limits;
}

/** Checks limits that did not come through parseQosParameters (the admin socket, tests). */
export function validateQos(limits: QosLimits, volume: string): QosLimits {
  const bad = (what: string) => new ArborError('invalid-argument', `volume ${volume}: ${what}`);
  if (limits.maxIops !== undefined && !(Number.isInteger(limits.maxIops) && limits.maxIops >= 1 && limits.maxIops <= maxQosIops))
    throw bad(`maxIops ${limits.maxIops} is not a whole number from 1 to ${maxQosIops}`);
  if (limits.maxBandwidthBytes !== undefined && !(Number.isSafeInteger(limits.maxBandwidthBytes) && limits.maxBandwidthBytes >= 1))
    throw bad(`maxBandwidthBytes ${limits.maxBandwidthBytes} is not a whole number of bytes per second`);
  if (limits.burstSeconds !== undefined && !(limits.burstSeconds > 0 && limits.burstSeconds <= maxQosBurstSeconds))
    throw bad(`burstSeconds ${limits.burstSeconds} is not above 0 and at most ${maxQosBurstSeconds}`);
  if (limits.burstSeconds !== undefined && isUnlimited(limits))
    throw bad(`burstSeconds ${limits.burstSeconds} without maxIops or maxBandwidth limits nothing; give a limit too`);
  // Only the known fields, so nothing else reaches the catalog.
  const kept: QosLimits = {};
  if (limits.maxIops !== undefined) kept.maxIops = limits.maxIops;
  if (limits.maxBandwidthBytes !== undefined) kept.maxBandwidthBytes = limits.maxBandwidthBytes;
  if (limits.burstSeconds !== undefined) kept.burstSeconds = limits.burstSeconds;
  return kept;
}

/** "1000 IOPS, 100 MiB/s, burst 0.1 s" or "unlimited". */
export function describeQos(limits: QosLimits): string {
  if (isUnlimited(limits)) return 'unlimited';
  const parts: string[] = [];
  if (limits.maxIops !== undefined) parts.push(`${limits.maxIops} IOPS`);
  if (limits.maxBandwidthBytes !== undefined) parts.push(`${formatSize(limits.maxBandwidthBytes)}/s`);
  parts.push(`burst ${burstSecondsOf(limits)} s`);
  return parts.join(', ');
}

type Listener = (limits: QosLimits) => void;

/**
 * The current limits of the volumes someone here follows (the NBD server, for each
 * volume it serves), kept up to date by one watch on `qos/`. A change is applied
 * only if it is newer (by catalog revision) than what is known, so the watch, a read
 * at follow time and a set made in this process can arrive in any order.
 */
export class QosFollower {
  private readonly followed = new Map<string, { limits: QosLimits; revision: number; listeners: Set<Listener>; reading: number }>();
  private stopWatch?: () => void;

  constructor(private readonly catalog: Catalog) {}

  /** Calls `listener` now with the volume's limits and again whenever they change; returns how to stop. */
  async follow(volumeId: string, listener: Listener): Promise<() => void> {
    this.stopWatch ??= this.catalog.watch(qosPrefix, (events) => this.onEvents(events));
    let entry = this.followed.get(volumeId);
    if (!entry) {
      // Kept from before the read, so a change the watch brings meanwhile is not lost.
      entry = { limits: {}, revision: 0, listeners: new Set(), reading: 0 };
      this.followed.set(volumeId, entry);
    }
    const followed = entry;
    const forget = () => {
      if (followed.listeners.size === 0 && followed.reading === 0 && this.followed.get(volumeId) === followed) this.followed.delete(volumeId);
    };
    followed.reading++;
    try {
      const stored = await this.catalog.get(qosKey(volumeId));
      if (stored) this.apply(volumeId, decodeQos(stored), stored.modRevision);
    } catch (err) {
      followed.reading--;
      forget();
      throw err;
    }
    followed.reading--;
    followed.listeners.add(listener);
    listener(followed.limits);
    return () => {
      followed.listeners.delete(listener);
      forget();
    };
  }

  /** Limits known to be committed at `revision` (a set made here, or the watch). */
  apply(volumeId: string, limits: QosLimits, revision: number): void {
    const entry = this.followed.get(volumeId);
    if (!entry || revision <= entry.revision) return;
    entry.limits = limits;
    entry.revision = revision;
    for (const listener of entry.listeners) listener(limits);
  }

  close(): void {
    this.stopWatch?.();
    this.stopWatch = undefined;
  }

  private onEvents(events: WatchEvent[]): void {
    for (const event of events) {
      const volumeId = event.key.slice(event.key.lastIndexOf(qosPrefix) + qosPrefix.length);
      if (event.type === 'delete') {
        this.apply(volumeId, {}, event.modRevision);
        continue;
      }
      try {
        this.apply(volumeId, decodeQos({ key: event.key, value: event.value ?? '', modRevision: event.modRevision }), event.modRevision);
      } catch {
        // A damaged record is refused where it is read (follow, volumeQos); the watch keeps the last good limits.
      }
    }
  }
}
