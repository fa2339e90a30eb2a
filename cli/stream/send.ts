import { Progress } from '../../lib/progress';
import { formatRef } from '../../store/names';
import { ArborError } from '../../store/errors';
import { snapshotOrigin } from '../../store/receive';
import { SnapshotRecord } from '../../store/records';
import { Session } from '../session';
import { RecordKind, StreamWriter, maxDataRecordBytes } from './format';

/** Block status is asked a window at a time so a huge range's map never sits in memory at once. */
const statusWindowBytes = 1024 * 1024 * 1024;
/** Reads kept in flight: through NBD each is a round trip, and the output is written in order. */
const readsInFlight = 4;

export interface SendSummary {
  records: number;
  dataBytes: number;
  streamBytes: number;
  coveredBytes: number;
}

/**
 * Writes `snapshot` as a stream (format.ts): the ranges it maps (a full stream), or
 * only the ranges that differ from `base` (an incremental one), found by the store's
 * tree diff, so the work follows what changed. Data that reads as zeros is sent as
 * a zero range.
 */
export async function sendSnapshot(
  session: Session,
  snapshot: SnapshotRecord,
  base: SnapshotRecord | undefined,
  output: NodeJS.WritableStream,
  progress: (covered: number) => Progress,
): Promise<SendSummary> {
  if (base && base.sizeBytes > snapshot.sizeBytes) {
    // The diff spans the larger size, past this snapshot's end; and a receiver only grows volumes.
    throw new ArborError(
      'failed-precondition',
      `snapshot ${snapshot.volumeName}@${snapshot.name} (${snapshot.sizeBytes} bytes) is smaller than its base ${base.volumeName}@${base.name} (${base.sizeBytes} bytes): volumes only grow; send from a base no larger, or send it in full`,
    );
  }
  const ranges = base ? await session.api.diffSnapshots({ id: base.id }, { id: snapshot.id }) : await session.api.snapshotAllocated({ id: snapshot.id });
  const coveredBytes = ranges.reduce((sum, r) => sum + r.length, 0);
  const bar = progress(coveredBytes);
  const writer = new StreamWriter(output, {
    volume: snapshot.volumeName,
    snapshot: snapshot.name,
    origin: snapshotOrigin(snapshot),
    sizeBytes: snapshot.sizeBytes,
    extentSizeBytes: snapshot.extentSizeBytes,
    createdAt: snapshot.createdAt,
    ...(base ? { base: { name: base.name, origin: snapshotOrigin(base) } } : {}),
    coveredBytes,
  });
  const image = await session.openImage(formatRef(snapshot.volumeName, snapshot.name));
  try {
    await writer.start();
    const runs = new RunWriter(writer);
    for (const range of ranges) {
      for (let window = range.offset; window < range.offset + range.length; window += statusWindowBytes) {
        const windowLength = Math.min(statusWindowBytes, range.offset + range.length - window);
        for (const status of await image.blockStatus(window, windowLength)) {
          if (status.kind === 'data') await sendData(image, status.offset, status.length, runs);
          else if (status.kind === 'zero' || base) await runs.add(status.kind, status.offset, status.length);
          // A full stream leaves holes unnamed: the receiver's new volume starts as one.
          bar.advance(status.length);
        }
      }
    }
    await runs.close();
    return { ...(await writer.end()), coveredBytes };
  } finally {
    await image.close();
  }
}

async function sendData(image: Awaited<ReturnType<Session['openImage']>>, offset: number, length: number, runs: RunWriter): Promise<void> {
  const pieces: Array<{ at: number; n: number; read: Promise<Buffer> }> = [];
  const readPiece = (at: number, n: number): Promise<Buffer> => {
    const buffer = Buffer.allocUnsafe(n);
    return image.readInto(at, buffer, 0, n).then(() => buffer);
  };
  let next = offset;
  const end = offset + length;
  const fill = (): void => {
    while (pieces.length < readsInFlight && next < end) {
      const n = Math.min(maxDataRecordBytes, end - next);
      pieces.push({ at: next, n, read: readPiece(next, n) });
      next += n;
    }
  };
  fill();
  try {
    while (pieces.length > 0) {
      const piece = pieces[0];
      const data = await piece.read;
      pieces.shift();
      fill();
      await runs.addData(piece.at, data);
    }
  } finally {
    // A failed write leaves reads in flight: let them settle before the image closes.
    await Promise.allSettled(pieces.map((p) => p.read));
  }
}

/**
 * Coalesces adjacent zero or hole ranges into one record each, and splits data
 * pieces that are zeros (whole extents of them) out as zero ranges.
 */
class RunWriter {
  private pending?: { kind: RecordKind; offset: number; length: number };

  constructor(private readonly writer: StreamWriter) {}

  async add(kind: RecordKind, offset: number, length: number): Promise<void> {
    if (this.pending && this.pending.kind === kind && this.pending.offset + this.pending.length === offset) {
      this.pending.length += length;
      return;
    }
    await this.close();
    this.pending = { kind, offset, length };
  }

  async addData(offset: number, data: Buffer): Promise<void> {
    if (isAllZero(data)) return this.add('zero', offset, data.length);
    await this.close();
    await this.writer.record('data', offset, data.length, data);
  }

  async close(): Promise<void> {
    if (!this.pending) return;
    const { kind, offset, length } = this.pending;
    this.pending = undefined;
    await this.writer.record(kind, offset, length);
  }
}

function isAllZero(buffer: Buffer): boolean {
  // Compare 8 bytes at a time where the buffer allows: this runs over every byte sent.
  const words = Math.floor(buffer.length / 8);
  const view = new BigUint64Array(buffer.buffer, buffer.byteOffset, buffer.byteOffset % 8 === 0 ? words : 0);
  for (let i = 0; i < view.length; i++) if (view[i] !== 0n) return false;
  for (let i = view.length * 8; i < buffer.length; i++) if (buffer[i] !== 0) return false;
  return true;
}
