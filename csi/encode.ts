/**
 * ListSnapshots' response encoded straight into one buffer, in place of protobufjs's
 * encoder. Paging through 90,000 snapshots, protobufjs spent more CPU than anything
 * else in the server (1.7 µs a snapshot: a message object made per snapshot by
 * `fromObject`, then an operation queued per field and replayed by `finish`); this
 * writes the same fields in one pass, about 0.3 µs a snapshot.
 *
 * It encodes what the controller gives (controller/messages.ts: sizes and times as
 * safe non-negative numbers); any other value the message type allows (an int64 as
 * a string or a Long, a negative one) is left to protobufjs, which the caller falls
 * back to when this returns undefined. Fields at their default (0, '', false, no
 * message) are left out, as proto3 encoders do; a decoder reads them as defaults.
 * The field numbers are csi.proto's; test/unit/csi-encode.test.ts decodes what this
 * writes with the proto and compares.
 */
import type { ListSnapshotsResponse } from './generated/csi/v1/ListSnapshotsResponse';
import type { Snapshot } from './generated/csi/v1/Snapshot';

/** What the first buffer holds per snapshot (ids of 21 characters take about 72 bytes); it grows by doubling. */
const bytesPerSnapshot = 96;

/** A protobuf key: field number and wire type, in one byte for fields 1 to 15. */
const varintField = (field: number) => (field << 3) | 0;
const bytesField = (field: number) => (field << 3) | 2;

// csi.proto: ListSnapshotsResponse { repeated Entry entries = 1; string next_token = 2; }, Entry { Snapshot snapshot = 1; }
const responseEntries = bytesField(1);
const responseNextToken = bytesField(2);
const entrySnapshot = bytesField(1);
// Snapshot { int64 size_bytes = 1; string snapshot_id = 2; string source_volume_id = 3;
//   google.protobuf.Timestamp creation_time = 4; bool ready_to_use = 5; string group_snapshot_id = 6; }
const snapshotSizeBytes = varintField(1);
const snapshotId = bytesField(2);
const snapshotSourceVolumeId = bytesField(3);
const snapshotCreationTime = bytesField(4);
const snapshotReadyToUse = varintField(5);
const snapshotGroupId = bytesField(6);
// google.protobuf.Timestamp { int64 seconds = 1; int32 nanos = 2; }
const timestampSeconds = varintField(1);
const timestampNanos = varintField(2);

/** A value this encoder leaves to protobufjs. */
class Unsupported extends Error {}

class Writer {
  pos = 0;

  constructor(public buf: Buffer) {}

  private reserve(bytes: number): void {
    if (this.pos + bytes <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.pos + bytes) size *= 2;
    const grown = Buffer.allocUnsafe(size);
    this.buf.copy(grown, 0, 0, this.pos);
    this.buf = grown;
  }

  byte(value: number): void {
    this.reserve(1);
    this.buf[this.pos++] = value;
  }

  /** A non-negative integer up to 2^53 - 1. */
  varint(value: number): void {
    if (!Number.isSafeInteger(value) || value < 0) throw new Unsupported();
    this.reserve(maxVarintBytes);
    this.pos = putVarint(this.buf, this.pos, value);
  }

  /** A string field, unless empty (the default). */
  string(key: number, value: string | undefined): void {
    if (value === undefined || value === '') return;
    if (typeof value !== 'string') throw new Unsupported();
    const length = value.length;
    if (length < 0x80 && this.ascii(key, value)) return;
    const bytes = Buffer.byteLength(value);
    this.reserve(1 + maxVarintBytes + bytes);
    this.buf[this.pos++] = key;
    this.pos = putVarint(this.buf, this.pos, bytes);
    this.pos += this.buf.write(value, this.pos, bytes, 'utf8');
  }

  /**
   * A short string written a character a byte, as long as each is ASCII (ids and
   * names are): a call into Buffer's UTF-8 encoder per string cost more than the
   * rest of a snapshot. Returns false, having written nothing, at the first other.
   */
  private ascii(key: number, value: string): boolean {
    const length = value.length;
    this.reserve(2 + length);
    const buf = this.buf;
    const start = this.pos;
    buf[start] = key;
    buf[start + 1] = length;
    for (let i = 0; i < length; i++) {
      const c = value.charCodeAt(i);
      if (c >= 0x80) return false;
      buf[start + 2 + i] = c;
    }
    this.pos = start + 2 + length;
    return true;
  }

  /**
   * Starts a message field: its key, and one byte kept for its length (enough for
   * every snapshot). Returns where its body starts, for `end`.
   */
  begin(key: number): number {
    this.reserve(2);
    this.buf[this.pos++] = key;
    this.buf[this.pos++] = 0;
    return this.pos;
  }

  /** Ends the message `begin` started: writes its length, moving a long body up to make room. */
  end(start: number): void {
    const length = this.pos - start;
    if (length < 0x80) {
      this.buf[start - 1] = length;
      return;
    }
    let extra = 0;
    for (let rest = Math.floor(length / 0x80); rest > 0; rest = Math.floor(rest / 0x80)) extra++;
    this.reserve(extra);
    this.buf.copy(this.buf, start + extra, start, this.pos);
    putVarint(this.buf, start - 1, length);
    this.pos += extra;
  }

  done(): Buffer {
    return this.buf.subarray(0, this.pos);
  }
}

/** Bytes of the longest varint `putVarint` writes (2^53 - 1 takes 8). */
const maxVarintBytes = 8;

/** Writes a safe non-negative integer 7 bits a byte; returns the position after it. */
function putVarint(buf: Buffer, pos: number, value: number): number {
  // Bit operators truncate to 32 bits: above that, arithmetic until the rest fits.
  while (value > 0xffffffff) {
    buf[pos++] = (value % 0x80) | 0x80;
    value = Math.floor(value / 0x80);
  }
  while (value >= 0x80) {
    buf[pos++] = (value & 0x7f) | 0x80;
    value >>>= 7;
  }
  buf[pos++] = value;
  return pos;
}

function writeSnapshot(w: Writer, s: Snapshot): void {
  if (typeof s.size_bytes !== 'number') throw new Unsupported();
  if (s.size_bytes !== 0) {
    w.byte(snapshotSizeBytes);
    w.varint(s.size_bytes);
  }
  w.string(snapshotId, s.snapshot_id);
  w.string(snapshotSourceVolumeId, s.source_volume_id);
  const time = s.creation_time;
  if (time) {
    const { seconds, nanos = 0 } = time;
    // int32 nanos: a negative one or one past 2^31 - 1 is protobufjs's to encode (or truncate).
    if (typeof seconds !== 'number' || typeof nanos !== 'number' || nanos > 0x7fffffff) throw new Unsupported();
    const start = w.begin(snapshotCreationTime);
    if (seconds !== 0) {
      w.byte(timestampSeconds);
      w.varint(seconds);
    }
    if (nanos !== 0) {
      w.byte(timestampNanos);
      w.varint(nanos);
    }
    w.end(start);
  }
  if (s.ready_to_use) {
    w.byte(snapshotReadyToUse);
    w.byte(1);
  }
  w.string(snapshotGroupId, s.group_snapshot_id);
}

/** The response as protobuf bytes, or undefined for a value only protobufjs encodes (see the top of this file). */
export function encodeListSnapshotsResponse(response: ListSnapshotsResponse): Buffer | undefined {
  try {
    const w = new Writer(Buffer.allocUnsafe(64 + bytesPerSnapshot * (response.entries?.length ?? 0)));
    for (const { snapshot } of response.entries ?? []) {
      const entry = w.begin(responseEntries);
      if (snapshot) {
        const start = w.begin(entrySnapshot);
        writeSnapshot(w, snapshot);
        w.end(start);
      }
      w.end(entry);
    }
    w.string(responseNextToken, response.next_token);
    return w.done();
  } catch (err) {
    if (err instanceof Unsupported) return undefined;
    throw err;
  }
}

/**
 * The methods whose responses are encoded here ("Service.Method"), each returning
 * undefined for a response it leaves to protobufjs.
 */
export const responseEncoders: Readonly<Record<string, (response: object) => Buffer | undefined>> = {
  'Controller.ListSnapshots': encodeListSnapshotsResponse,
};
