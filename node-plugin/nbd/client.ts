import net from 'node:net';
import tls from 'node:tls';
import { RangeStatus } from '../../store/tree';
import { ByteQueue } from './byte-queue';
import {
  BASE_ALLOCATION,
  CLIENT_FIXED_NEWSTYLE,
  CLIENT_NO_ZEROES,
  CMD,
  CMD_FLAG,
  EXTENDED_REPLY_MAGIC,
  EXTENDED_REQUEST_MAGIC,
  IHAVEOPT,
  INFO,
  NBDMAGIC,
  OPT,
  REP,
  REPLY_FLAG_DONE,
  REPLY_MAGIC,
  REPLY_TYPE,
  REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STATE_HOLE,
  STATE_ZERO,
  STRUCTURED_REPLY_MAGIC,
} from './protocol';
import { readU64, writeU64 } from './replies';

export interface NbdClientOptions {
  socketPath?: string;
  host?: string;
  port?: number;
  exportName: string;
  /** Default true. */
  structuredReplies?: boolean;
  extendedHeaders?: boolean;
  /** Ask for base:allocation (default: when replies are structured). */
  baseAllocation?: boolean;
  /** Upgrade with STARTTLS using these options. */
  tls?: tls.ConnectionOptions;
}

/** An NBD error reply: `errno` is the protocol's error value. */
export class NbdError extends Error {
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
  }
}

/** An option the server refused during the handshake. */
export class NbdOptionError extends Error {
  constructor(
    readonly replyType: number,
    message: string,
  ) {
    super(message);
  }
}

interface Pending {
  resolve: (value: Buffer | RangeStatus[] | undefined) => void;
  reject: (err: Error) => void;
  type: number;
  offset: number;
  length: number;
  /** READ target, filled chunk by chunk. */
  data?: Buffer;
  ranges?: RangeStatus[];
  error?: NbdError;
}

/**
 * A small NBD client: fixed newstyle with NBD_OPT_GO, structured replies (or simple,
 * or extended headers), base:allocation, many requests in flight. Used by the CLI to
 * import and export through a running server, and by the tests to say things real
 * clients never do.
 */
export class NbdClient {
  sizeBytes = 0;
  transmissionFlags = 0;
  blockSizes = { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 };
  private structured = false;
  private extended = false;
  private nextCookie = 1;
  private readonly pending = new Map<number, Pending>();
  private failure?: Error;

  private constructor(
    private socket: net.Socket,
    private readonly input: ByteQueue,
  ) {}

  static async connect(options: NbdClientOptions): Promise<NbdClient> {
    const client = await NbdClient.open(options);
    try {
      await client.handshake(options);
    } catch (err) {
      client.socket.destroy();
      throw err;
    }
    void client.readReplies();
    return client;
  }

  /** The exports a server lists (NBD_OPT_LIST), then NBD_OPT_ABORT. `exportName` is not used. */
  static async list(options: Omit<NbdClientOptions, 'exportName'>): Promise<Array<{ name: string; description: string }>> {
    const client = await NbdClient.open(options);
    try {
      await client.greet(options);
      const exports = (await client.option(OPT.LIST, Buffer.alloc(0)))
        .filter((reply) => reply.type === REP.SERVER)
        .map(({ data }) => ({ name: data.toString('utf8', 4, 4 + data.readUInt32BE(0)), description: data.toString('utf8', 4 + data.readUInt32BE(0)) }));
      await client.option(OPT.ABORT, Buffer.alloc(0)).catch(() => []);
      return exports;
    } finally {
      client.socket.destroy();
    }
  }

  private static async open(options: Omit<NbdClientOptions, 'exportName'>): Promise<NbdClient> {
    const socket = options.socketPath ? net.connect(options.socketPath) : net.connect(options.port!, options.host ?? '127.0.0.1');
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    socket.setNoDelay(true);
    const client = new NbdClient(socket, new ByteQueue());
    client.listen(socket);
    return client;
  }

  /**
   * Negotiates an export for the kernel's NBD driver, which never handshakes itself:
   * simple replies, no meta context, as the kernel speaks. Returns the socket at the
   * start of the transmission phase, no longer read, for the kernel to take over.
   *
   * `open` must connect with the `onread` it is given: a socket reading into its own
   * buffer stops reading the moment it is paused, where net's usual reads would go on
   * filling the stream's buffer and steal replies meant for the kernel.
   */
  static async negotiateForKernel(
    open: (onread: net.OnReadOpts) => Promise<net.Socket>,
    exportName: string,
  ): Promise<{ socket: net.Socket; sizeBytes: number; transmissionFlags: number }> {
    const input = new ByteQueue();
    const socket = await open({ buffer: Buffer.allocUnsafe(4096), callback: (n: number, buffer: Buffer) => (input.push(buffer.subarray(0, n)), true) });
    const client = new NbdClient(socket, input);
    client.listen(socket);
    try {
      await client.handshake({ exportName, structuredReplies: false });
    } catch (err) {
      socket.destroy();
      throw err;
    }
    socket.pause();
    socket.removeAllListeners();
    // A socket the kernel holds may still report an error here (its peer gone): not ours to handle any more.
    socket.on('error', () => {});
    return { socket, sizeBytes: client.sizeBytes, transmissionFlags: client.transmissionFlags };
  }

  async read(offset: number, length: number, flags = 0): Promise<Buffer> {
    return (await this.request(CMD.READ, flags, offset, length)) as Buffer;
  }

  async write(offset: number, data: Buffer, flags = 0): Promise<void> {
    await this.request(CMD.WRITE, this.extended ? flags | CMD_FLAG.PAYLOAD_LEN : flags, offset, data.length, data);
  }

  async flush(): Promise<void> {
    await this.request(CMD.FLUSH, 0, 0, 0);
  }

  async trim(offset: number, length: number, flags = 0): Promise<void> {
    await this.request(CMD.TRIM, flags, offset, length);
  }

  async zero(offset: number, length: number, flags = 0): Promise<void> {
    await this.request(CMD.WRITE_ZEROES, flags, offset, length);
  }

  async cache(offset: number, length: number): Promise<void> {
    await this.request(CMD.CACHE, 0, offset, length);
  }

  async blockStatus(offset: number, length: number, flags = 0): Promise<RangeStatus[]> {
    return (await this.request(CMD.BLOCK_STATUS, flags, offset, length)) as RangeStatus[];
  }

  /** Any request, as raw numbers (tests use it to send what a good client would not). */
  request(type: number, flags: number, offset: number, length: number, payload?: Buffer): Promise<Buffer | RangeStatus[] | undefined> {
    if (this.failure) return Promise.reject(this.failure);
    const cookie = this.nextCookie++;
    const header = Buffer.alloc(this.extended ? 32 : 28);
    header.writeUInt32BE(this.extended ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC, 0);
    header.writeUInt16BE(flags, 4);
    header.writeUInt16BE(type, 6);
    header.writeUInt32BE(0, 8);
    header.writeUInt32BE(cookie, 12);
    writeU64(header, 16, offset);
    if (this.extended) writeU64(header, 24, length);
    else header.writeUInt32BE(length, 24);
    this.socket.write(payload ? Buffer.concat([header, payload]) : header);
    if (type === CMD.DISC) return Promise.resolve(undefined);
    return new Promise((resolve, reject) => {
      this.pending.set(cookie, { resolve, reject, type, offset, length, data: type === CMD.READ ? Buffer.alloc(length) : undefined });
    });
  }

  /** NBD_CMD_DISC, then waits for the server to close. */
  async disconnect(): Promise<void> {
    if (this.socket.destroyed) return;
    const closed = new Promise((resolve) => this.socket.once('close', resolve));
    void this.request(CMD.DISC, 0, 0, 0);
    this.socket.end();
    await closed;
  }

  destroy(): void {
    this.socket.destroy();
  }

  private listen(socket: net.Socket): void {
    socket.on('data', (data: Buffer) => this.input.push(data));
    socket.on('error', (err) => this.fail(err));
    socket.on('close', () => this.fail(new Error('the server closed the connection')));
  }

  private fail(err: Error): void {
    this.failure ??= err;
    this.input.end(err);
    for (const pending of this.pending.values()) pending.reject(err);
    this.pending.clear();
  }

  private async handshake(options: NbdClientOptions): Promise<void> {
    await this.greet(options);
    if (options.extendedHeaders) {
      await this.option(OPT.EXTENDED_HEADERS, Buffer.alloc(0));
      this.extended = true;
      this.structured = true;
    } else if (options.structuredReplies ?? true) {
      await this.option(OPT.STRUCTURED_REPLY, Buffer.alloc(0));
      this.structured = true;
    }
    const name = Buffer.from(options.exportName);
    if (this.structured && (options.baseAllocation ?? true)) {
      const query = Buffer.from(BASE_ALLOCATION);
      await this.option(OPT.SET_META_CONTEXT, Buffer.concat([u32(name.length), name, u32(1), u32(query.length), query]));
    }
    const replies = await this.option(OPT.GO, Buffer.concat([u32(name.length), name, u16(1), u16(INFO.BLOCK_SIZE)]));
    for (const { type, data } of replies) {
      if (type !== REP.INFO) continue;
      const info = data.readUInt16BE(0);
      if (info === INFO.EXPORT) {
        this.sizeBytes = readU64(data, 2);
        this.transmissionFlags = data.readUInt16BE(10);
      } else if (info === INFO.BLOCK_SIZE) {
        this.blockSizes = { minimum: data.readUInt32BE(2), preferred: data.readUInt32BE(6), maximum: data.readUInt32BE(10) };
      }
    }
  }

  /** The greeting, and the upgrade to TLS where asked for. */
  private async greet(options: Omit<NbdClientOptions, 'exportName'>): Promise<void> {
    const greeting = await this.input.read(18);
    if (greeting.readBigUInt64BE(0) !== NBDMAGIC || greeting.readBigUInt64BE(8) !== IHAVEOPT) throw new Error('not an NBD newstyle server');
    this.socket.write(u32(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES));
    if (options.tls) {
      await this.option(OPT.STARTTLS, Buffer.alloc(0));
      this.socket.removeAllListeners('data');
      this.socket.removeAllListeners('close');
      this.socket.removeAllListeners('error');
      const secure = tls.connect({ ...options.tls, socket: this.socket });
      await new Promise<void>((resolve, reject) => {
        secure.once('secureConnect', resolve);
        secure.once('error', reject);
      });
      this.socket = secure;
      this.listen(secure);
    }
  }

  /** Sends an option and collects its replies up to the ACK; an error reply throws. */
  private async option(option: number, data: Buffer): Promise<Array<{ type: number; data: Buffer }>> {
    const header = Buffer.alloc(16);
    header.writeBigUInt64BE(IHAVEOPT, 0);
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(data.length, 12);
    this.socket.write(Buffer.concat([header, data]));
    const replies: Array<{ type: number; data: Buffer }> = [];
    for (;;) {
      const reply = await this.input.read(20);
      if (reply.readBigUInt64BE(0) !== REPLY_MAGIC) throw new Error('bad option reply magic');
      const type = reply.readUInt32BE(12);
      const payload = await this.input.read(reply.readUInt32BE(16));
      if (type === REP.ACK) return replies;
      if (type >= 0x80000000) throw new NbdOptionError(type, `option ${option} refused (0x${type.toString(16)}): ${payload.toString()}`);
      replies.push({ type, data: payload });
    }
  }

  private async readReplies(): Promise<void> {
    try {
      for (;;) {
        const magic = (await this.input.read(4)).readUInt32BE(0);
        if (magic === SIMPLE_REPLY_MAGIC) await this.simpleReply();
        else if (magic === STRUCTURED_REPLY_MAGIC || magic === EXTENDED_REPLY_MAGIC) await this.chunk(magic === EXTENDED_REPLY_MAGIC);
        else throw new Error(`bad reply magic 0x${magic.toString(16)}`);
      }
    } catch (err) {
      this.fail(err as Error);
    }
  }

  private take(cookie: number): Pending {
    const pending = this.pending.get(cookie);
    if (!pending) throw new Error(`a reply for unknown cookie ${cookie}`);
    return pending;
  }

  private async simpleReply(): Promise<void> {
    const rest = await this.input.read(12);
    const error = rest.readUInt32BE(0);
    const cookie = rest.readUInt32BE(8);
    const pending = this.take(cookie);
    this.pending.delete(cookie);
    if (error) return pending.reject(new NbdError(error, `error ${error}`));
    if (pending.type === CMD.READ) (await this.input.read(pending.length)).copy(pending.data!);
    pending.resolve(pending.data);
  }

  private async chunk(extended: boolean): Promise<void> {
    const rest = await this.input.read(extended ? 28 : 16);
    const flags = rest.readUInt16BE(0);
    const type = rest.readUInt16BE(2);
    const cookie = rest.readUInt32BE(8);
    const length = extended ? readU64(rest, 20) : rest.readUInt32BE(12);
    const payload = await this.input.read(length);
    const pending = this.take(cookie);
    switch (type) {
      case REPLY_TYPE.NONE:
        break;
      case REPLY_TYPE.OFFSET_DATA: {
        const offset = readU64(payload, 0);
        payload.copy(pending.data!, offset - pending.offset, 8);
        break;
      }
      case REPLY_TYPE.OFFSET_HOLE: {
        const offset = readU64(payload, 0);
        pending.data!.fill(0, offset - pending.offset, offset - pending.offset + payload.readUInt32BE(8));
        break;
      }
      case REPLY_TYPE.BLOCK_STATUS:
      case REPLY_TYPE.BLOCK_STATUS_EXT: {
        const wide = type === REPLY_TYPE.BLOCK_STATUS_EXT;
        const ranges: RangeStatus[] = [];
        let at = pending.offset;
        for (let p = wide ? 8 : 4; p < payload.length; p += wide ? 16 : 8) {
          const len = wide ? readU64(payload, p) : payload.readUInt32BE(p);
          const state = wide ? readU64(payload, p + 8) : payload.readUInt32BE(p + 4);
          ranges.push({ offset: at, length: len, kind: state & STATE_HOLE ? 'hole' : state & STATE_ZERO ? 'zero' : 'data' });
          at += len;
        }
        pending.ranges = ranges;
        break;
      }
      case REPLY_TYPE.ERROR:
      case REPLY_TYPE.ERROR_OFFSET: {
        const error = payload.readUInt32BE(0);
        const message = payload.toString('utf8', 6, 6 + payload.readUInt16BE(4));
        pending.error ??= new NbdError(error, message);
        break;
      }
      default:
        throw new Error(`unknown reply chunk type ${type}`);
    }
    if (flags & REPLY_FLAG_DONE) {
      this.pending.delete(cookie);
      if (pending.error) pending.reject(pending.error);
      else pending.resolve(pending.type === CMD.READ ? pending.data : pending.ranges);
    }
  }
}

function u32(value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value, 0);
  return b;
}

function u16(value: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(value, 0);
  return b;
}
