import { BufferPool } from '../../lib/buffer-pool';
import { Log } from '../../lib/logger';
import { NbdCommandName, nbdTally } from '../../lib/metrics';
import { isArborError, isDiskFull } from '../../store/errors';
import { RangeStatus } from '../../store/tree';
import { NbdExport } from './export';
import { baseAllocationContextId, Negotiated } from './handshake';
import { directPayloadBytes, maxInFlightBytes, maxInFlightRequests, maxPayloadBytes, maxStatusDescriptors } from './limits';
import {
  CMD,
  CMD_FLAG,
  COMPACT_REQUEST_BYTES,
  EXTENDED_REQUEST_BYTES,
  EXTENDED_REQUEST_MAGIC,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
  REPLY_FLAG_DONE,
  REPLY_TYPE,
  REQUEST_MAGIC,
  SIMPLE_REPLY_BYTES,
  STATE_HOLE,
  STATE_ZERO,
} from './protocol';
import { Cookie, ReplyFormat, readU64, writeU64 } from './replies';

/** Where replies go: the connection batches them into one socket write per event-loop turn. */
export interface ReplySink {
  /** Queues a reply; `release` runs once the bytes are handed to the kernel. */
  send(data: Buffer, release?: () => void): void;
  /** Stop or restart reading requests (back-pressure). */
  pauseReading(): void;
  resumeReading(): void;
  /** Close after everything queued is written. */
  end(): void;
  /** Drop the connection now: the byte stream cannot be trusted any more. */
  destroy(reason: string): void;
}

interface Request {
  type: number;
  flags: number;
  cookie: Cookie;
  offset: number;
  length: number;
  /** WRITE payload (a pooled buffer at least `length` long). */
  payload?: Buffer;
  /** A READ whose reply data releases its in-flight charge once written. */
  replyHoldsCharge?: boolean;
}

/**
 * Commands and the flags each may carry. FUA is valid on every command (clients
 * send it on reads too); it means something only where data is written.
 */
const allowedFlags: Record<number, number> = {
  [CMD.READ]: CMD_FLAG.FUA | CMD_FLAG.DF,
  [CMD.WRITE]: CMD_FLAG.FUA | CMD_FLAG.PAYLOAD_LEN,
  [CMD.DISC]: CMD_FLAG.FUA,
  [CMD.FLUSH]: CMD_FLAG.FUA,
  [CMD.TRIM]: CMD_FLAG.FUA,
  [CMD.CACHE]: CMD_FLAG.FUA,
  [CMD.WRITE_ZEROES]: CMD_FLAG.FUA | CMD_FLAG.NO_HOLE | CMD_FLAG.FAST_ZERO,
  [CMD.BLOCK_STATUS]: CMD_FLAG.FUA | CMD_FLAG.REQ_ONE,
};

const pool = new BufferPool(256);

/** A WRITE whose payload is arriving; `keep`: its bytes are kept (not a payload refused and skipped). */
interface Receiving {
  request: Request;
  received: number;
  error: number;
  message: string;
  keep: boolean;
}

/**
 * The transmission phase of one connection: parses requests from the bytes the
 * socket delivers (headers in place, WRITE payloads written from the socket's
 * chunk when whole there and the export can write at once, else copied into pooled
 * buffers), runs them against the export with many in flight, and answers each as
 * it completes. Memory is bounded: past `maxInFlightRequests` or `maxInFlightBytes`
 * the connection stops reading until replies drain.
 */
/** Metric labels of the commands `run` serves. */
const commandNames: Partial<Record<number, NbdCommandName>> = {
  [CMD.READ]: 'read',
  [CMD.WRITE]: 'write',
  [CMD.FLUSH]: 'flush',
  [CMD.TRIM]: 'trim',
  [CMD.CACHE]: 'cache',
  [CMD.WRITE_ZEROES]: 'write_zeroes',
  [CMD.BLOCK_STATUS]: 'block_status',
};

export class Transmission {
  private readonly format: ReplyFormat;
  private readonly headerBytes: number;
  private readonly magic: number;
  private readonly carry: Buffer;
  private carried = 0;
  private receiving?: Receiving;
  /** The payload space the socket was last given to read into, and the receiving it belongs to. */
  private spaceGiven?: { space: Buffer; receiving: Receiving };
  private inFlight = 0;
  private inFlightBytes = 0;
  private paused = false;
  /** Bytes received while paused: parsed when reading resumes. */
  private backlog?: Buffer;
  private disconnecting = false;
  private shuttingDown = false;
  /** No request after the one being received is parsed (see stopTakingRequests). */
  private draining = false;
  private readingStopped = false;
  private idleWaiters: Array<() => void> = [];

  constructor(
    private readonly exp: NbdExport,
    private readonly negotiated: Negotiated,
    private readonly sink: ReplySink,
    private readonly log: Log,
  ) {
    this.format = new ReplyFormat(negotiated.structuredReplies, negotiated.extendedHeaders);
    this.headerBytes = negotiated.extendedHeaders ? EXTENDED_REQUEST_BYTES : COMPACT_REQUEST_BYTES;
    this.magic = negotiated.extendedHeaders ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC;
    this.carry = Buffer.allocUnsafe(this.headerBytes);
  }

  get requestsInFlight(): number {
    return this.inFlight;
  }

  /** Consumes bytes [start, end) of `chunk`; the caller may reuse `chunk` afterwards. */
  receive(chunk: Buffer, start: number, end: number): void {
    if (this.backlog) {
      // Order matters: what arrived earlier is parsed first.
      this.backlog = Buffer.concat([this.backlog, chunk.subarray(start, end)]);
      return;
    }
    let at = start;
    while (at < end && !this.disconnecting) {
      if (this.draining && !this.receiving) {
        this.stopReading();
        return;
      }
      if (this.paused && !this.receiving) {
        // Over the in-flight bound: keep the rest (a copy: the caller reuses `chunk`).
        this.backlog = Buffer.from(chunk.subarray(at, end));
        return;
      }
      if (this.receiving) {
        at = this.receivePayload(chunk, at, end);
        continue;
      }
      if (this.carried > 0 || end - at < this.headerBytes) {
        const n = Math.min(this.headerBytes - this.carried, end - at);
        chunk.copy(this.carry, this.carried, at, at + n);
        this.carried += n;
        at += n;
        if (this.carried < this.headerBytes) return;
        this.carried = 0;
        this.header(this.carry, 0);
      } else {
        this.header(chunk, at);
        at += this.headerBytes;
      }
    }
  }

  /** Server shutdown: new requests get ESHUTDOWN; resolves when nothing is in flight. */
  async shutdown(): Promise<void> {
    this.shuttingDown = true;
    await this.idle();
  }

  /**
   * Stops taking requests without refusing any: the request whose payload is
   * arriving is received, nothing after it is parsed, and what runs finishes and is
   * answered. For the kernel's connections at a stop: a request this process never
   * read, the kernel sends again once the connection is gone (to the next process),
   * where ESHUTDOWN would have failed it. Resolves when nothing is in flight.
   */
  async stopTakingRequests(): Promise<void> {
    this.draining = true;
    this.backlog = undefined;
    if (!this.receiving) this.stopReading();
    await this.idle();
  }

  private stopReading(): void {
    if (this.readingStopped) return;
    this.readingStopped = true;
    this.carried = 0;
    this.sink.pauseReading();
  }

  /**
   * The connection is gone: bytes not parsed yet are dropped, the requests already
   * running finish, then the export is closed (letting go of the volume).
   */
  async connectionClosed(): Promise<void> {
    this.disconnecting = true;
    this.backlog = undefined;
    this.receiving = undefined;
    if (this.inFlight > 0) await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
    try {
      await this.exp.close?.();
    } catch (err) {
      this.log.error('closing the export after its connection ended failed', { export: this.exp.name, error: (err as Error).message });
    }
  }

  idle(): Promise<void> {
    if (this.inFlight === 0 && !this.receiving && !this.backlog) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private header(buf: Buffer, at: number): void {
    if (buf.readUInt32BE(at) !== this.magic) {
      this.disconnecting = true;
      this.sink.destroy(`request magic 0x${buf.readUInt32BE(at).toString(16)} is wrong; the stream is out of step`);
      return;
    }
    const flags = buf.readUInt16BE(at + 4);
    const type = buf.readUInt16BE(at + 6);
    const cookie = { hi: buf.readUInt32BE(at + 8), lo: buf.readUInt32BE(at + 12) };
    const offset = readU64(buf, at + 16);
    const length = this.negotiated.extendedHeaders ? readU64(buf, at + 24) : buf.readUInt32BE(at + 24);
    const request: Request = { type, flags, cookie, offset, length };

    if (this.negotiated.extendedHeaders && type !== CMD.WRITE && (flags & CMD_FLAG.PAYLOAD_LEN) !== 0) {
      // A payload on a command that takes none: consume it, then refuse the command.
      if (length > maxPayloadBytes) {
        this.disconnecting = true;
        this.sink.destroy(`a ${length}-byte payload on command ${type}`);
        return;
      }
      this.receiving = { request, received: 0, error: NBD_EINVAL, message: `command ${type} takes no payload`, keep: false };
      if (length === 0) this.payloadComplete();
      return;
    }
    if (type === CMD.WRITE) {
      let [error, message] = this.check(request);
      if (!error && this.negotiated.extendedHeaders && (flags & CMD_FLAG.PAYLOAD_LEN) === 0) {
        [error, message] = [NBD_EINVAL, 'with extended headers a write must carry NBD_CMD_FLAG_PAYLOAD_LEN'];
      }
      if (length > maxPayloadBytes) {
        // Too big to hold: answer after skipping the payload without keeping it.
        this.receiving = {
          request,
          received: 0,
          error: NBD_EOVERFLOW,
          message: `write of ${length} bytes is over the ${maxPayloadBytes}-byte maximum`,
          keep: false,
        };
      } else {
        // The payload's buffer is taken when its first bytes are kept (receivePayload).
        this.receiving = { request, received: 0, error, message, keep: true };
        this.charge(length);
      }
      if (length === 0) this.payloadComplete();
      return;
    }
    if (type === CMD.DISC) {
      this.disconnecting = true;
      void this.disconnect();
      return;
    }
    const [error, message] = this.check(request);
    if (error) {
      this.replyError(request, error, message);
      return;
    }
    if (type === CMD.READ) {
      this.charge(length);
      if (this.readNow(request)) return;
    } else {
      this.charge(0);
    }
    void this.run(request);
  }

  /**
   * Where the socket may read its next bytes instead of its shared buffer: the rest
   * of the WRITE payload being received, once enough is still to come that reading
   * it in place beats copying it (`directPayloadBytes`); else undefined. The read
   * that fills it ends at the payload's end, so no byte of the next request lands there.
   */
  payloadSpace(): Buffer | undefined {
    const receiving = this.receiving;
    if (!receiving || !receiving.keep || receiving.error || this.backlog || this.disconnecting) return undefined;
    const { request } = receiving;
    if (request.length - receiving.received < directPayloadBytes) return undefined;
    request.payload ??= pool.take(request.length);
    this.spaceGiven = { space: request.payload.subarray(receiving.received, request.length), receiving };
    return this.spaceGiven.space;
  }

  /** The socket read `n` bytes into `space`, which `payloadSpace` gave. */
  payloadRead(space: Buffer, n: number): void {
    const given = this.spaceGiven;
    this.spaceGiven = undefined;
    // The connection closed meanwhile: those bytes belong to no request any more.
    if (this.disconnecting) return;
    if (!given || given.space !== space || given.receiving !== this.receiving || n > space.length) {
      this.disconnecting = true;
      this.sink.destroy('internal error: the socket read into a payload buffer no request is receiving');
      return;
    }
    given.receiving.received += n;
    if (given.receiving.received === given.receiving.request.length) this.payloadComplete();
  }

  private receivePayload(chunk: Buffer, at: number, end: number): number {
    const receiving = this.receiving!;
    const { request } = receiving;
    if (receiving.keep && receiving.received === 0 && !receiving.error && end - at >= request.length) {
      // The whole payload is in this chunk: a write done at once takes it from here,
      // with no copy into a buffer of its own (the chunk is reused only after we return).
      this.receiving = undefined;
      if (this.writeNow(request, chunk.subarray(at, at + request.length))) return at + request.length;
      this.receiving = receiving;
    }
    if (receiving.keep && !request.payload) request.payload = pool.take(Math.max(request.length, 1));
    const n = Math.min(request.length - receiving.received, end - at);
    if (request.payload) chunk.copy(request.payload, receiving.received, at, at + n);
    receiving.received += n;
    if (receiving.received === request.length) this.payloadComplete();
    return at + n;
  }

  private payloadComplete(): void {
    const { request, error, message, keep } = this.receiving!;
    this.receiving = undefined;
    if (error) {
      // A payload kept was charged when its header came (a skipped one was not).
      if (keep) this.uncharge(request.length, request.payload);
      this.replyError(request, error, message);
      this.settle();
      return;
    }
    if (this.writeNow(request, request.payload!.subarray(0, request.length))) return;
    void this.run(request);
  }

  /**
   * A READ answered in one piece from an export that can read at once: the reply is
   * queued before this returns, with no promise on the way. False (nothing done) for
   * the async path: an export that cannot, or a structured read large enough to be
   * split around holes.
   */
  private readNow(request: Request): boolean {
    if (!this.exp.readIntoNow) return false;
    const { offset, length, cookie } = request;
    const structured = this.format.structured;
    if (structured && (request.flags & CMD_FLAG.DF) === 0 && length > this.exp.preferredBlockBytes) return false;
    const headerBytes = structured ? this.format.chunkHeaderBytes + 8 : SIMPLE_REPLY_BYTES;
    const out = pool.take(headerBytes + length);
    try {
      if (!this.exp.readIntoNow(offset, out, headerBytes, length)) {
        pool.give(out);
        return false;
      }
    } catch (err) {
      pool.give(out);
      this.failed(request, err);
      this.uncharge(length);
      this.settle();
      return true;
    }
    if (structured) {
      const at = this.format.writeChunkHeader(out, 0, REPLY_FLAG_DONE, REPLY_TYPE.OFFSET_DATA, cookie, offset, 8 + length);
      writeU64(out, at, offset);
    } else {
      this.format.writeSimple(out, 0, 0, cookie);
    }
    // The bytes stay charged until the reply has left.
    this.sink.send(out.subarray(0, headerBytes + length), () => {
      pool.give(out);
      this.uncharge(length);
      this.settle();
    });
    nbdTally.done.read++;
    nbdTally.readBytes += length;
    return true;
  }

  /**
   * A WRITE without FUA done at once where the export can (see readNow), from `data`:
   * its payload, or the bytes still in the socket's chunk. False (nothing done) for
   * the async path.
   */
  private writeNow(request: Request, data: Buffer): boolean {
    if (!this.exp.writeNow || (request.flags & CMD_FLAG.FUA) !== 0) return false;
    const { length, payload } = request;
    try {
      if (!this.exp.writeNow(request.offset, data)) return false;
      this.reply(request, 0, '');
      nbdTally.done.write++;
      nbdTally.writtenBytes += length;
    } catch (err) {
      this.failed(request, err);
    }
    this.uncharge(length, payload);
    this.settle();
    return true;
  }

  /** The error a request gets before it runs (0: none). */
  private check(request: Request): [number, string] {
    const { type, flags, offset, length } = request;
    const allowed = allowedFlags[type];
    if (allowed === undefined) return [NBD_EINVAL, `unknown command ${type}`];
    if (this.shuttingDown) return [NBD_ESHUTDOWN, 'the server is shutting down; disconnect and reconnect'];
    let valid = allowed;
    if (!this.format.structured) valid &= ~CMD_FLAG.DF;
    if (!this.negotiated.extendedHeaders) valid &= ~CMD_FLAG.PAYLOAD_LEN;
    if ((flags & ~valid) !== 0) return [NBD_EINVAL, `flags 0x${flags.toString(16)} are not valid for command ${type}`];
    const writes = type === CMD.WRITE || type === CMD.TRIM || type === CMD.WRITE_ZEROES;
    if (writes && this.exp.readOnly) return [NBD_EPERM, `export ${this.exp.name} is read-only`];
    if (type === CMD.FLUSH) return length === 0 && offset === 0 ? [0, ''] : [NBD_EINVAL, 'flush takes offset 0 and length 0'];
    if (type === CMD.BLOCK_STATUS && !this.negotiated.baseAllocation) return [NBD_EINVAL, 'no meta context was negotiated for block status'];
    if ((type === CMD.READ || type === CMD.WRITE) && length > maxPayloadBytes)
      return [NBD_EOVERFLOW, `${length} bytes is over the ${maxPayloadBytes}-byte maximum`];
    if (length === 0) return [NBD_EINVAL, 'a request of length 0'];
    if (offset + length > this.exp.sizeBytes) {
      // The spec's choice: writing past the end is "no space", anything else is invalid.
      const noSpace = type === CMD.WRITE || type === CMD.WRITE_ZEROES;
      return [noSpace ? NBD_ENOSPC : NBD_EINVAL, `${length} bytes at ${offset} end past the export's ${this.exp.sizeBytes} bytes`];
    }
    return [0, ''];
  }

  private async run(request: Request): Promise<void> {
    const { type, flags, offset, length } = request;
    const command = commandNames[type] ?? 'read';
    try {
      switch (type) {
        case CMD.READ:
          // The bytes stay charged until the reply has left (see read()).
          await this.read(request);
          nbdTally.done.read++;
          nbdTally.readBytes += length;
          return;
        case CMD.WRITE:
          await this.exp.write(offset, request.payload!.subarray(0, length), (flags & CMD_FLAG.FUA) !== 0);
          break;
        case CMD.FLUSH:
          await this.exp.flush();
          break;
        case CMD.TRIM:
          await this.exp.trim(offset, length);
          if (flags & CMD_FLAG.FUA) await this.exp.flush();
          break;
        case CMD.WRITE_ZEROES:
          await this.exp.zero(offset, length, {
            noHole: (flags & CMD_FLAG.NO_HOLE) !== 0,
            fua: (flags & CMD_FLAG.FUA) !== 0,
            fast: (flags & CMD_FLAG.FAST_ZERO) !== 0,
          });
          break;
        case CMD.CACHE:
          await this.exp.cache(offset, length);
          break;
        case CMD.BLOCK_STATUS:
          await this.blockStatus(request);
          nbdTally.done[command]++;
          return;
      }
      this.reply(request, 0, '');
      nbdTally.done[command]++;
      if (type === CMD.WRITE) nbdTally.writtenBytes += length;
    } catch (err) {
      this.failed(request, err);
    } finally {
      if (type !== CMD.READ || !request.replyHoldsCharge) this.uncharge(type === CMD.READ || type === CMD.WRITE ? length : 0, request.payload);
      this.settle();
    }
  }

  private async read(request: Request): Promise<void> {
    const { offset, length, cookie } = request;
    if (!this.format.structured) {
      const out = pool.take(SIMPLE_REPLY_BYTES + length);
      try {
        await this.exp.readInto(offset, out, SIMPLE_REPLY_BYTES, length);
      } catch (err) {
        pool.give(out);
        throw err;
      }
      this.format.writeSimple(out, 0, 0, cookie);
      request.replyHoldsCharge = true;
      this.sink.send(out.subarray(0, SIMPLE_REPLY_BYTES + length), () => {
        pool.give(out);
        this.uncharge(length);
        this.settle();
      });
      return;
    }
    // Large reads tell holes apart so the client is not sent zeros; small ones (or DF) go as one chunk.
    const ranges: RangeStatus[] =
      (request.flags & CMD_FLAG.DF) === 0 && length > this.exp.preferredBlockBytes
        ? await this.exp.blockStatus(offset, length)
        : [{ offset, length, kind: 'data' }];
    if (ranges.length === 1 && ranges[0].kind !== 'data') {
      this.sink.send(this.holeChunk(cookie, request.offset, offset, length, true));
      return;
    }
    for (let i = 0; i < ranges.length; i++) {
      const range = ranges[i];
      const last = i === ranges.length - 1;
      if (range.kind !== 'data') {
        this.sink.send(this.holeChunk(cookie, request.offset, range.offset, range.length, last));
        continue;
      }
      const headerBytes = this.format.chunkHeaderBytes + 8;
      const out = pool.take(headerBytes + range.length);
      try {
        await this.exp.readInto(range.offset, out, headerBytes, range.length);
      } catch (err) {
        pool.give(out);
        if (i === 0) throw err;
        // Chunks already went out: the error must carry its offset and end the reply.
        this.sink.send(this.errorOffsetChunk(cookie, request.offset, range.offset, errnoFor(err, CMD.READ)));
        return;
      }
      const at = this.format.writeChunkHeader(out, 0, last ? REPLY_FLAG_DONE : 0, REPLY_TYPE.OFFSET_DATA, cookie, request.offset, 8 + range.length);
      writeU64(out, at, range.offset);
      this.sink.send(out.subarray(0, headerBytes + range.length), () => pool.give(out));
      if (last) {
        // The reply's bytes stay charged until this last chunk has left.
        request.replyHoldsCharge = true;
        this.sink.send(Buffer.alloc(0), () => {
          this.uncharge(length);
          this.settle();
        });
      }
    }
  }

  private holeChunk(cookie: Cookie, requestOffset: number, offset: number, length: number, last: boolean): Buffer {
    const out = Buffer.allocUnsafe(this.format.chunkHeaderBytes + 12);
    const at = this.format.writeChunkHeader(out, 0, last ? REPLY_FLAG_DONE : 0, REPLY_TYPE.OFFSET_HOLE, cookie, requestOffset, 12);
    writeU64(out, at, offset);
    out.writeUInt32BE(length, at + 8);
    return out;
  }

  private errorOffsetChunk(cookie: Cookie, requestOffset: number, offset: number, [error, message]: [number, string]): Buffer {
    const text = Buffer.from(message.slice(0, 4096));
    const payload = 6 + text.length + 8;
    const out = Buffer.allocUnsafe(this.format.chunkHeaderBytes + payload);
    const at = this.format.writeChunkHeader(out, 0, REPLY_FLAG_DONE, REPLY_TYPE.ERROR_OFFSET, cookie, requestOffset, payload);
    out.writeUInt32BE(error, at);
    out.writeUInt16BE(text.length, at + 4);
    text.copy(out, at + 6);
    writeU64(out, at + 6 + text.length, offset);
    return out;
  }

  private async blockStatus(request: Request): Promise<void> {
    const { offset, length, cookie, flags } = request;
    let ranges = await this.exp.blockStatus(offset, length);
    if (flags & CMD_FLAG.REQ_ONE) ranges = ranges.slice(0, 1);
    else ranges = ranges.slice(0, maxStatusDescriptors);
    const extended = this.format.extended;
    const descriptorBytes = extended ? 16 : 8;
    const payload = (extended ? 8 : 4) + ranges.length * descriptorBytes;
    const out = Buffer.allocUnsafe(this.format.chunkHeaderBytes + payload);
    let at = this.format.writeChunkHeader(out, 0, REPLY_FLAG_DONE, extended ? REPLY_TYPE.BLOCK_STATUS_EXT : REPLY_TYPE.BLOCK_STATUS, cookie, offset, payload);
    out.writeUInt32BE(baseAllocationContextId, at);
    at += 4;
    if (extended) {
      out.writeUInt32BE(ranges.length, at);
      at += 4;
    }
    for (const range of ranges) {
      const state = range.kind === 'hole' ? STATE_HOLE | STATE_ZERO : range.kind === 'zero' ? STATE_ZERO : 0;
      if (extended) {
        writeU64(out, at, range.length);
        writeU64(out, at + 8, state);
      } else {
        out.writeUInt32BE(range.length, at);
        out.writeUInt32BE(state, at + 4);
      }
      at += descriptorBytes;
    }
    this.sink.send(out);
  }

  /** A request that failed: counted, logged when the store failed (EIO), answered with its error. */
  private failed(request: Request, err: unknown): void {
    const { type, offset, length } = request;
    const [error, message] = errnoFor(err, type);
    if (error === NBD_EIO || isDiskFull(err))
      this.log.error('request failed', { export: this.exp.name, command: type, offset, length, error: (err as Error).message });
    this.replyError(request, error, message);
  }

  /** An error answer, counted by command (an unknown command counts as a read). */
  private replyError(request: Request, error: number, message: string): void {
    nbdTally.failed[commandNames[request.type] ?? 'read']++;
    this.reply(request, error, message);
  }

  private reply(request: Request, error: number, message: string): void {
    this.sink.send(this.format.done(request.cookie, request.offset, error, message));
  }

  private charge(bytes: number): void {
    this.inFlight++;
    this.inFlightBytes += bytes;
    if (!this.paused && (this.inFlight >= maxInFlightRequests || this.inFlightBytes >= maxInFlightBytes)) {
      this.paused = true;
      this.sink.pauseReading();
    }
  }

  private uncharge(bytes: number, payload?: Buffer): void {
    this.inFlight--;
    this.inFlightBytes -= bytes;
    if (payload) pool.give(payload);
    if (this.paused && !this.disconnecting && this.inFlight < maxInFlightRequests / 2 && this.inFlightBytes < maxInFlightBytes / 2) {
      this.paused = false;
      const backlog = this.backlog;
      this.backlog = undefined;
      if (backlog) this.receive(backlog, 0, backlog.length);
      if (!this.paused) this.sink.resumeReading();
    }
  }

  private settle(): void {
    if (this.inFlight === 0 && !this.receiving && !this.backlog) for (const wake of this.idleWaiters.splice(0)) wake();
  }

  /** DISC: finish what is in flight, make it durable, then close. */
  private async disconnect(): Promise<void> {
    await this.idle();
    if (!this.exp.readOnly) {
      try {
        await this.exp.flush();
      } catch (err) {
        this.log.error('flush at disconnect failed', { export: this.exp.name, error: (err as Error).message });
      }
    }
    this.sink.end();
  }
}

/** The NBD error for a failure of the store (or anything else: EIO). */
export function errnoFor(err: unknown, type: number): [number, string] {
  if (isDiskFull(err)) {
    return [NBD_ENOSPC, `the node's disk under the store is full (${(err as NodeJS.ErrnoException).code}): free space there or move volumes to another node`];
  }
  if (!isArborError(err)) return [NBD_EIO, 'internal error'];
  const e = err;
  switch (e.code) {
    case 'out-of-range':
      return [type === CMD.WRITE || type === CMD.WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL, e.message];
    case 'invalid-argument':
      return [NBD_EINVAL, e.message];
    case 'read-only':
      return [NBD_EPERM, e.message];
    case 'resource-exhausted':
      // The store refuses writes while its disk is full (store/space-reserve.ts).
      return [type === CMD.WRITE || type === CMD.WRITE_ZEROES ? NBD_ENOSPC : NBD_EIO, e.message];
    case 'unsupported':
      return [NBD_ENOTSUP, e.message];
    case 'unavailable':
    case 'not-found':
      return [NBD_ESHUTDOWN, e.message];
    default:
      return [NBD_EIO, e.message];
  }
}
