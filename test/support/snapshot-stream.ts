import crypto from 'node:crypto';
import { PassThrough, Writable } from 'node:stream';
import { localSession as cliLocalSession, Session } from '../../cli/session';
import { ReceiveSummary, receiveSnapshot, ReceiveTarget } from '../../cli/stream/receive';
import { SendSummary, sendSnapshot } from '../../cli/stream/send';
import { Progress } from '../../lib/progress';
import { StoreExports } from '../../node-plugin/store-exports';
import { openDataDir } from '../../store/embedded';
import { isHiddenVolume } from '../../store/receive';
import { decodeVolume, keys } from '../../store/records';
import { Store } from '../../store/store';

/**
 * Helpers for the send/receive tests: a CLI session on a store opened in this
 * process, sending to and receiving from memory, where each part of a stream
 * (format.ts) lies, and what a data directory holds.
 */

/** What `openSession` gives the CLI when it opens the store itself, on a store this process opened (and closes). */
export function localSession(store: Store): Session {
  return cliLocalSession(store, new StoreExports(store), async () => {});
}

const silentProgress = (): Progress => new Progress(new PassThrough(), 'test');

/** Sends a snapshot (incremental from `base` when given) into memory. */
export async function sendToBuffer(session: Session, snapshot: string, base?: string): Promise<{ stream: Buffer; summary: SendSummary }> {
  const chunks: Buffer[] = [];
  const output = new Writable({
    write(chunk: Buffer, _encoding, done) {
      chunks.push(Buffer.from(chunk));
      done();
    },
  });
  const record = await session.api.getSnapshot({ name: snapshot });
  const baseRecord = base === undefined ? undefined : await session.api.getSnapshot({ name: base });
  const summary = await sendSnapshot(session, record, baseRecord, output, silentProgress);
  return { stream: Buffer.concat(chunks), summary };
}

/** Hands `bytes` out in pieces of the sizes `pieceBytes` picks (so every reader boundary gets crossed). */
export async function* inPieces(bytes: Buffer, pieceBytes: () => number): AsyncGenerator<Buffer> {
  for (let at = 0; at < bytes.length;) {
    const n = Math.max(1, Math.min(bytes.length - at, pieceBytes()));
    yield bytes.subarray(at, at + n);
    at += n;
  }
}

export function receiveFromBuffer(session: Session, stream: Buffer, target: ReceiveTarget, pieceBytes: () => number): Promise<ReceiveSummary> {
  return receiveSnapshot(session, inPieces(stream, pieceBytes), target, silentProgress);
}

/** Where each part of a stream lies (byte offsets into it). */
export interface StreamLayout {
  headerAt: number;
  headerEnd: number;
  records: Array<{ at: number; kind: number; offset: number; length: number; payloadAt?: number }>;
  endAt: number;
  digestAt: number;
}

export function streamLayout(stream: Buffer): StreamLayout {
  const headerEnd = 16 + stream.readUInt32BE(12);
  const records: StreamLayout['records'] = [];
  let at = headerEnd;
  for (;;) {
    const kind = stream.readUInt8(at);
    if (kind === 0x7f) break;
    const offset = Number(stream.readBigUInt64BE(at + 1));
    const length = Number(stream.readBigUInt64BE(at + 9));
    if (kind === 1) {
      records.push({ at, kind, offset, length, payloadAt: at + 17 });
      at += 17 + length;
    } else {
      records.push({ at, kind, offset, length });
      at += 17;
    }
  }
  return { headerAt: 16, headerEnd, records, endAt: at, digestAt: at + 17 };
}

/** The stream's header, parsed. */
export function streamHeader(stream: Buffer): Record<string, unknown> {
  const layout = streamLayout(stream);
  return JSON.parse(stream.subarray(layout.headerAt, layout.headerEnd).toString('utf8')) as Record<string, unknown>;
}

export function sha256(bytes: Buffer): string {
  return crypto.createHash('sha256').update(bytes).digest('hex');
}

/** Everything a store shows and holds: volumes and snapshots (as `list --json` would), hidden volumes, and every image's digest. */
export interface StoreState {
  volumes: Array<{ id: string; name: string; sizeBytes: number }>;
  snapshots: Array<{ id: string; name: string; volume: string; sizeBytes: number }>;
  /** Names of the hidden staging volumes of receives, in the catalog. */
  hidden: string[];
  /** sha256 of each volume's and snapshot's bytes, by NAME or NAME@SNAP. */
  images: Record<string, string>;
}

/** Reads the state of a store opened in this process. */
export async function stateOf(store: Store): Promise<StoreState> {
  const volumes = await store.listVolumes();
  const snapshots = await store.listSnapshots();
  const all = (await store.ctx.catalog.list(keys.volumes)).map(decodeVolume);
  const images: Record<string, string> = {};
  for (const s of snapshots) {
    const reader = await store.openSnapshot({ id: s.id });
    images[`${s.volumeName}@${s.name}`] = sha256(await reader.read(0, s.sizeBytes));
  }
  for (const v of volumes) {
    // A counted use, let go at once: the store's own openVolume would pin the volume open, and a pinned volume is in use.
    const handle = await store.acquireVolume({ id: v.id });
    try {
      images[v.name] = sha256(await handle.volume.read(0, v.sizeBytes));
    } finally {
      await handle.release();
    }
  }
  return {
    volumes: volumes.map((v) => ({ id: v.id, name: v.name, sizeBytes: v.sizeBytes })),
    snapshots: snapshots.map((s) => ({ id: s.id, name: s.name, volume: s.volumeName, sizeBytes: s.sizeBytes })),
    hidden: all.filter(isHiddenVolume).map((v) => v.name),
    images,
  };
}

/** The state of a data directory no process holds: opened here for the reading, then closed. */
export async function stateOfDataDir(dataDir: string): Promise<StoreState> {
  const store = await openDataDir(dataDir);
  try {
    return await stateOf(store);
  } finally {
    await store.close();
  }
}
