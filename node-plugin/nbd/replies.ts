import {
  EXTENDED_REPLY_BYTES,
  EXTENDED_REPLY_MAGIC,
  REPLY_FLAG_DONE,
  REPLY_TYPE,
  SIMPLE_REPLY_BYTES,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_BYTES,
  STRUCTURED_REPLY_MAGIC,
} from './protocol';

/** The 8-byte cookie (handle) of a request, kept as two numbers to avoid a Buffer per request. */
export interface Cookie {
  hi: number;
  lo: number;
}

/** Reply framing for what the connection negotiated: simple, structured or extended. */
export class ReplyFormat {
  constructor(
    readonly structured: boolean,
    readonly extended: boolean,
  ) {}

  /** Bytes of a chunk header (structured or extended). */
  get chunkHeaderBytes(): number {
    return this.extended ? EXTENDED_REPLY_BYTES : STRUCTURED_REPLY_BYTES;
  }

  writeSimple(target: Buffer, at: number, error: number, cookie: Cookie): number {
    target.writeUInt32BE(SIMPLE_REPLY_MAGIC, at);
    target.writeUInt32BE(error, at + 4);
    target.writeUInt32BE(cookie.hi, at + 8);
    target.writeUInt32BE(cookie.lo, at + 12);
    return SIMPLE_REPLY_BYTES;
  }

  /** Writes a chunk header; `offset` is the request's offset (used by extended headers only). */
  writeChunkHeader(target: Buffer, at: number, flags: number, type: number, cookie: Cookie, offset: number, length: number): number {
    if (this.extended) {
      target.writeUInt32BE(EXTENDED_REPLY_MAGIC, at);
      target.writeUInt16BE(flags, at + 4);
      target.writeUInt16BE(type, at + 6);
      target.writeUInt32BE(cookie.hi, at + 8);
      target.writeUInt32BE(cookie.lo, at + 12);
      writeU64(target, at + 16, offset);
      writeU64(target, at + 24, length);
      return EXTENDED_REPLY_BYTES;
    }
    target.writeUInt32BE(STRUCTURED_REPLY_MAGIC, at);
    target.writeUInt16BE(flags, at + 4);
    target.writeUInt16BE(type, at + 6);
    target.writeUInt32BE(cookie.hi, at + 8);
    target.writeUInt32BE(cookie.lo, at + 12);
    target.writeUInt32BE(length, at + 16);
    return STRUCTURED_REPLY_BYTES;
  }

  /** A reply with no data: success or an error, in the negotiated form. */
  done(cookie: Cookie, offset: number, error: number, message: string): Buffer {
    if (!this.structured) {
      const out = Buffer.allocUnsafe(SIMPLE_REPLY_BYTES);
      this.writeSimple(out, 0, error, cookie);
      return out;
    }
    if (error === 0) {
      const out = Buffer.allocUnsafe(this.chunkHeaderBytes);
      this.writeChunkHeader(out, 0, REPLY_FLAG_DONE, REPLY_TYPE.NONE, cookie, offset, 0);
      return out;
    }
    return this.errorChunk(cookie, offset, error, message, true);
  }

  /** An ERROR chunk: u32 error, u16 message length, message (at most 4096 bytes, as the spec suggests). */
  errorChunk(cookie: Cookie, offset: number, error: number, message: string, last: boolean): Buffer {
    const text = Buffer.from(message.slice(0, 4096));
    const payload = 6 + text.length;
    const out = Buffer.allocUnsafe(this.chunkHeaderBytes + payload);
    const at = this.writeChunkHeader(out, 0, last ? REPLY_FLAG_DONE : 0, REPLY_TYPE.ERROR, cookie, offset, payload);
    out.writeUInt32BE(error, at);
    out.writeUInt16BE(text.length, at + 4);
    text.copy(out, at + 6);
    return out;
  }
}

export function writeU64(target: Buffer, at: number, value: number): void {
  target.writeUInt32BE(Math.floor(value / 2 ** 32), at);
  target.writeUInt32BE(value >>> 0, at + 4);
}

export function readU64(source: Buffer, at: number): number {
  return source.readUInt32BE(at) * 2 ** 32 + source.readUInt32BE(at + 4);
}
