/**
 * The snapshot stream `arbor snapshot send` writes and `receive` reads (version 1):
 *
 *   magic "ARBORSNP"  u32 version  u32 header length  header (JSON, UTF-8)
 *   records, in increasing offset order, none overlapping:
 *     u8 kind (1 data, 2 zero, 3 hole)  u64 offset  u64 length  [length bytes, data only]
 *   u8 0x7f (end)  u64 record count  u64 data bytes  32 bytes SHA-256 of everything before it
 *
 * Integers are big-endian. Data records hold at most maxDataRecordBytes. Zero ranges
 * read as zeros and are allocated; holes read as zeros and hold nothing (an
 * incremental stream's holes are where the base had data). What a full stream does
 * not name is a hole. The digest covers the header and every record, so a damaged
 * or altered stream is refused as a whole.
 */
import { createHash, Hash } from 'node:crypto';
import { ArborError } from '../../store/errors';

export const streamMagic = Buffer.from('ARBORSNP', 'latin1');
export const streamVersion = 1;
export const maxDataRecordBytes = 4 * 1024 * 1024;
const maxHeaderBytes = 64 * 1024;
const digestBytes = 32;

export interface StreamHeader {
  /** The sent snapshot: its volume's and its own name, its origin (the id it was first taken as), its size. */
  volume: string;
  snapshot: string;
  origin: string;
  sizeBytes: number;
  extentSizeBytes: number;
  createdAt: string;
  /** Set in an incremental stream: the snapshot it applies on. */
  base?: { name: string; origin: string };
  /** Bytes the records cover, for progress. */
  coveredBytes: number;
}

export type RecordKind = 'data' | 'zero' | 'hole';
export interface StreamRecord {
  kind: RecordKind;
  offset: number;
  length: number;
  /** Data records only. */
  data?: Buffer;
}

const kindCode: Record<RecordKind, number> = { data: 1, zero: 2, hole: 3 };
const codeKind = new Map<number, RecordKind>(Object.entries(kindCode).map(([k, v]) => [v, k as RecordKind]));
const endCode = 0x7f;

/** Writes a stream to `output`, waiting when it is full; hashes everything it writes. */
export class StreamWriter {
  private readonly hash = createHash('sha256');
  private records = 0;
  private dataBytes = 0;
  private lastEnd = 0;
  bytesWritten = 0;

  constructor(
    private readonly output: NodeJS.WritableStream,
    private readonly header: StreamHeader,
  ) {}

  async start(): Promise<void> {
    const json = Buffer.from(JSON.stringify(this.header), 'utf8');
    const fixed = Buffer.alloc(16);
    streamMagic.copy(fixed, 0);
    fixed.writeUInt32BE(streamVersion, 8);
    fixed.writeUInt32BE(json.length, 12);
    await this.emit(fixed);
    await this.emit(json);
  }

  async record(kind: RecordKind, offset: number, length: number, data?: Buffer): Promise<void> {
    if (offset < this.lastEnd || offset + length > this.header.sizeBytes || length <= 0) {
      throw new Error(`stream record ${kind} ${offset}+${length} out of order or out of range (after ${this.lastEnd})`);
    }
    if (kind === 'data' && (!data || data.length !== length || length > maxDataRecordBytes)) throw new Error('a data record needs its bytes');
    this.lastEnd = offset + length;
    const head = Buffer.alloc(17);
    head.writeUInt8(kindCode[kind], 0);
    head.writeBigUInt64BE(BigInt(offset), 1);
    head.writeBigUInt64BE(BigInt(length), 9);
    await this.emit(head);
    if (data) {
      await this.emit(data);
      this.dataBytes += length;
    }
    this.records++;
  }

  /** Writes the trailer. */
  async end(): Promise<{ records: number; dataBytes: number; streamBytes: number }> {
    const end = Buffer.alloc(17);
    end.writeUInt8(endCode, 0);
    end.writeBigUInt64BE(BigInt(this.records), 1);
    end.writeBigUInt64BE(BigInt(this.dataBytes), 9);
    await this.emit(end);
    const digest = this.hash.digest();
    await this.write(digest);
    return { records: this.records, dataBytes: this.dataBytes, streamBytes: this.bytesWritten };
  }

  private async emit(bytes: Buffer): Promise<void> {
    this.hash.update(bytes);
    await this.write(bytes);
  }

  private async write(bytes: Buffer): Promise<void> {
    this.bytesWritten += bytes.length;
    if (!this.output.write(bytes)) await drained(this.output);
  }
}

function drained(output: NodeJS.WritableStream): Promise<void> {
  return new Promise((resolve, reject) => {
    const done = (err?: Error): void => {
      output.off('drain', onDrain);
      output.off('close', onClose);
      output.off('error', done);
      if (err) reject(err);
      else resolve();
    };
    const onDrain = (): void => done();
    const onClose = (): void => done(new Error('the output was closed before the stream ended'));
    output.on('drain', onDrain);
    output.on('close', onClose);
    output.on('error', done);
  });
}

/** A refusal of the stream: what is wrong with it, and where. */
export function streamError(message: string): ArborError {
  return new ArborError('invalid-argument', `not received: ${message}`);
}

/** Reads exact byte counts from a chunked input, hashing what it hands out. */
class ByteReader {
  private readonly iterator: AsyncIterator<Buffer | string>;
  private chunks: Buffer[] = [];
  private buffered = 0;
  private ended = false;
  /** Bytes handed out. */
  consumed = 0;
  /** Bytes taken from the input: once it ended, its length. */
  received = 0;

  constructor(
    input: AsyncIterable<Buffer | string>,
    readonly hash: Hash,
  ) {
    this.iterator = input[Symbol.asyncIterator]();
  }

  /** Exactly `n` bytes, or undefined when the input ends first. */
  async read(n: number, hashed = true): Promise<Buffer | undefined> {
    while (this.buffered < n && !this.ended) {
      const next = await this.iterator.next();
      if (next.done) this.ended = true;
      else {
        const chunk = typeof next.value === 'string' ? Buffer.from(next.value) : next.value;
        this.chunks.push(chunk);
        this.buffered += chunk.length;
        this.received += chunk.length;
      }
    }
    if (this.buffered < n) return undefined;
    const joined = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks, this.buffered);
    const out = joined.subarray(0, n);
    const rest = joined.subarray(n);
    this.chunks = rest.length ? [rest] : [];
    this.buffered = rest.length;
    this.consumed += n;
    if (hashed) this.hash.update(out);
    return out;
  }

  async atEnd(): Promise<boolean> {
    return (await this.read(1, false)) === undefined;
  }
}

/**
 * Reads a stream: its header at once, then its records one by one; the trailer's
 * counts and digest are checked when the records end. Every malformation is an
 * ArborError naming what is wrong and the byte offset where it was found.
 */
export class StreamReader {
  private readonly reader: ByteReader;
  private lastEnd = 0;
  private records = 0;
  private dataBytes = 0;

  private constructor(
    readonly header: StreamHeader,
    reader: ByteReader,
  ) {
    this.reader = reader;
  }

  static async open(input: AsyncIterable<Buffer | string>): Promise<StreamReader> {
    const reader = new ByteReader(input, createHash('sha256'));
    const fixed = await reader.read(16);
    if (!fixed) throw streamError(`the input ends after ${reader.received} bytes, before a stream header (empty or truncated)`);
    if (!fixed.subarray(0, 8).equals(streamMagic)) throw streamError('the input is not an Arbor snapshot stream (it does not start with ARBORSNP)');
    const version = fixed.readUInt32BE(8);
    if (version !== streamVersion) throw streamError(`the stream has version ${version}; this arbor reads version ${streamVersion}`);
    const headerLength = fixed.readUInt32BE(12);
    if (headerLength > maxHeaderBytes) throw streamError(`the stream header claims ${headerLength} bytes (at most ${maxHeaderBytes}): the stream is corrupted`);
    const json = await reader.read(headerLength);
    if (!json) throw streamError('the stream is truncated inside its header');
    return new StreamReader(parseHeader(json), reader);
  }

  /** The next record, or undefined after the trailer was read and checked. */
  async next(): Promise<StreamRecord | undefined> {
    const at = this.reader.consumed;
    const head = await this.reader.read(17);
    if (!head) throw this.truncated();
    const code = head.readUInt8(0);
    if (code === endCode) {
      await this.checkTrailer(head);
      return undefined;
    }
    const kind = codeKind.get(code);
    if (!kind) throw streamError(`unknown record kind ${code} at byte ${at}: the stream is corrupted`);
    const offset = Number(head.readBigUInt64BE(1));
    const length = Number(head.readBigUInt64BE(9));
    if (length <= 0 || offset < this.lastEnd || offset + length > this.header.sizeBytes) {
      throw streamError(
        `the ${kind} record at byte ${at} (${offset}+${length}) is out of order or past the snapshot's ${this.header.sizeBytes} bytes: the stream is corrupted`,
      );
    }
    if (kind === 'data' && length > maxDataRecordBytes) {
      throw streamError(`the data record at byte ${at} claims ${length} bytes (at most ${maxDataRecordBytes}): the stream is corrupted`);
    }
    this.lastEnd = offset + length;
    this.records++;
    if (kind !== 'data') return { kind, offset, length };
    const data = await this.reader.read(length);
    if (!data) throw this.truncated();
    this.dataBytes += length;
    return { kind, offset, length, data };
  }

  get bytesRead(): number {
    return this.reader.consumed;
  }

  private truncated(): ArborError {
    // Called once the input ended: what it held, not what was handed out (a part of a record was not).
    return streamError(`the stream is truncated: it ends after ${this.reader.received} bytes, before its trailer (${this.records} records read)`);
  }

  private async checkTrailer(end: Buffer): Promise<void> {
    const records = Number(end.readBigUInt64BE(1));
    const dataBytes = Number(end.readBigUInt64BE(9));
    const expected = this.reader.hash.copy().digest();
    const digest = await this.reader.read(digestBytes, false);
    if (!digest) throw this.truncated();
    if (!digest.equals(expected)) {
      throw streamError('the stream is corrupted: its SHA-256 digest does not match its contents (altered or damaged in transit)');
    }
    if (records !== this.records || dataBytes !== this.dataBytes) {
      throw streamError(`the trailer counts ${records} records and ${dataBytes} data bytes, the stream held ${this.records} and ${this.dataBytes}`);
    }
    const streamEnd = this.reader.consumed;
    if (!(await this.reader.atEnd())) throw streamError(`bytes follow the end of the stream at byte ${streamEnd}; send one stream per receive`);
  }
}

function parseHeader(json: Buffer): StreamHeader {
  let h: Record<string, unknown>;
  try {
    h = JSON.parse(json.toString('utf8')) as Record<string, unknown>;
  } catch {
    throw streamError('the stream header is not JSON: the stream is corrupted');
  }
  const str = (key: string): string => {
    if (typeof h[key] !== 'string' || !h[key]) throw streamError(`the stream header has no ${key}`);
    return h[key];
  };
  const count = (key: string): number => {
    const v = h[key];
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw streamError(`the stream header's ${key} is not a byte count`);
    return v;
  };
  const base = h.base as Record<string, unknown> | undefined;
  if (base !== undefined && (typeof base !== 'object' || base === null || typeof base.name !== 'string' || typeof base.origin !== 'string')) {
    throw streamError("the stream header's base is not {name, origin}");
  }
  return {
    volume: str('volume'),
    snapshot: str('snapshot'),
    origin: str('origin'),
    sizeBytes: count('sizeBytes'),
    extentSizeBytes: count('extentSizeBytes'),
    createdAt: str('createdAt'),
    coveredBytes: count('coveredBytes'),
    ...(base ? { base: { name: base.name as string, origin: base.origin as string } } : {}),
  };
}
