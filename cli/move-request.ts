import { Log } from '../lib/logger';
import { StoreExports } from '../node-plugin/store-exports';
import { ArborError } from '../store/errors';
import { StoreLocation } from '../store/open';
import { Store } from '../store/store';
import { MoveOptions, MoveReport, defaultMoveOptions, moveVolume } from './move';
import { localSession, openSession } from './session';

/** What `arbor volume move` asks of the server that holds the source (its admin socket's moveVolume). */
export interface MoveRequest {
  volume: string;
  destination: StoreLocation;
  /** An NBD socket on this host that serves the destination store (default: that of the server holding its data directory). */
  nbdSocket?: string;
  finalRoundBytes?: number;
  maxRounds?: number;
  maxPauseMs?: number;
}

/** Checks a move request's JSON before anything is done with it. */
export function parseMoveRequest(value: unknown): MoveRequest {
  const bad = (what: string): never => {
    throw new ArborError('invalid-argument', `malformed arguments for moveVolume: ${what}`);
  };
  if (typeof value !== 'object' || value === null) return bad('not an object');
  const r = value as Record<string, unknown>;
  if (typeof r.volume !== 'string') bad('no volume');
  const d = r.destination as Record<string, unknown> | undefined;
  if (typeof d !== 'object' || d === null || typeof d.dataDir !== 'string') bad('no destination data directory');
  for (const key of ['storeUrl', 'blobsUrl', 'cacheDir'] as const) if (d![key] !== undefined && typeof d![key] !== 'string') bad(`destination ${key}`);
  if (r.nbdSocket !== undefined && typeof r.nbdSocket !== 'string') bad('nbdSocket');
  for (const key of ['finalRoundBytes', 'maxRounds', 'maxPauseMs'] as const) {
    if (r[key] !== undefined && (typeof r[key] !== 'number' || !Number.isSafeInteger(r[key]) || r[key] < 0)) bad(key);
  }
  return value as MoveRequest;
}

/**
 * Runs a move from the store this process holds (a server's), switching the
 * volume's NBD connections here to the destination when the move is done.
 */
export async function moveFromHere(store: Store, exports: StoreExports, request: MoveRequest, log: Log): Promise<MoveReport> {
  const destination = await openSession(request.destination, log);
  try {
    return await moveVolume(
      { session: localSession(store, exports, async () => {}), exports },
      { session: destination, nbdSocket: request.nbdSocket ?? destination.nbdSocket },
      request.volume,
      moveOptions(request, log),
    );
  } finally {
    await destination.close();
  }
}

/** The request's tuning, defaults where it gives none. */
export function moveOptions(request: MoveRequest, log: Log): MoveOptions {
  return {
    finalRoundBytes: request.finalRoundBytes ?? defaultMoveOptions.finalRoundBytes,
    maxRounds: request.maxRounds ?? defaultMoveOptions.maxRounds,
    maxPauseMs: request.maxPauseMs ?? defaultMoveOptions.maxPauseMs,
    log,
  };
}
