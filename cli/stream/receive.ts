import { Progress } from '../../lib/progress';
import { formatRef } from '../../store/names';
import { ReceivePlan } from '../../store/receive';
import { SnapshotRecord } from '../../store/records';
import { Image, Session } from '../session';
import { StreamHeader, StreamReader, StreamRecord } from './format';

/** Writes kept in flight: through NBD each is a round trip; records never overlap, so order does not matter. */
const writesInFlight = 8;

export interface ReceiveTarget {
  /** The volume to receive into (default: the sent snapshot's volume's name). */
  volume?: string;
  /** The name the snapshot gets here (default: its name in the stream). */
  snapshot?: string;
  force?: boolean;
}

export interface ReceiveSummary {
  snapshot: SnapshotRecord;
  header: StreamHeader;
  streamBytes: number;
}

/**
 * Applies a stream to a hidden staging volume the store prepares (a clone of the
 * base, for an incremental stream) and asks the store to make the snapshot appear
 * only once the trailer's digest matched. Anything wrong with the stream, or a
 * failure on the way, leaves no snapshot and the target volume as it was.
 */
export async function receiveSnapshot(
  session: Session,
  input: AsyncIterable<Buffer | string>,
  target: ReceiveTarget,
  progress: (header: StreamHeader) => Progress,
): Promise<ReceiveSummary> {
  const reader = await StreamReader.open(input);
  const header = reader.header;
  const plan: ReceivePlan = {
    volume: target.volume ?? header.volume,
    snapshot: target.snapshot ?? header.snapshot,
    origin: header.origin,
    sizeBytes: header.sizeBytes,
    extentSizeBytes: header.extentSizeBytes,
    createdAt: header.createdAt,
    ...(header.base ? { base: header.base } : {}),
    ...(target.force ? { force: true } : {}),
  };
  const staging = await session.api.beginReceive(plan);
  let image: Image | undefined;
  try {
    image = await session.openImage(formatRef(staging.name));
    const bar = progress(header);
    const writes = new InFlight(writesInFlight);
    for (;;) {
      const record = await reader.next();
      if (!record) break;
      await writes.add(apply(image, record).then(() => bar.advance(record.length)));
    }
    await writes.drain();
    await image.flush();
    const closing = image;
    image = undefined;
    await closing.close();
    const snapshot = await session.api.finishReceive(staging, plan);
    return { snapshot, header, streamBytes: reader.bytesRead };
  } catch (err) {
    if (image) await image.close().catch(() => {});
    await session.api.abortReceive(staging).catch(() => {});
    throw err;
  }
}

function apply(image: Image, record: StreamRecord): Promise<void> {
  switch (record.kind) {
    case 'data':
      return image.write(record.offset, record.data!, false);
    case 'zero':
      return image.zero(record.offset, record.length, { noHole: true, fua: false, fast: false });
    case 'hole':
      return image.trim(record.offset, record.length);
  }
}

/** At most `limit` promises pending; the first failure is thrown by the next add or by drain. */
class InFlight {
  private readonly pending = new Set<Promise<void>>();
  private failure?: unknown;

  constructor(private readonly limit: number) {}

  async add(work: Promise<void>): Promise<void> {
    const tracked = work.then(
      () => void this.pending.delete(tracked),
      (err) => {
        this.pending.delete(tracked);
        this.failure ??= err;
      },
    );
    this.pending.add(tracked);
    if (this.pending.size >= this.limit) await Promise.race(this.pending);
    if (this.failure) throw await this.settleAndFail();
  }

  async drain(): Promise<void> {
    await Promise.all(this.pending);
    if (this.failure) throw this.failure;
  }

  private async settleAndFail(): Promise<unknown> {
    await Promise.all(this.pending);
    return this.failure;
  }
}
