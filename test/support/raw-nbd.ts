import net from 'node:net';
import { ByteQueue } from '../../node-plugin/nbd/byte-queue';
import { CLIENT_FIXED_NEWSTYLE, CLIENT_NO_ZEROES, IHAVEOPT, OPT, REP, REPLY_MAGIC } from '../../node-plugin/nbd/protocol';

/** A bare socket to the NBD server for sending what no real client would. */
export class RawNbd {
  private readonly input = new ByteQueue();
  readonly closed: Promise<void>;

  private constructor(readonly socket: net.Socket) {
    socket.on('data', (d: Buffer) => this.input.push(d));
    socket.on('error', () => {});
    this.closed = new Promise((resolve) => socket.once('close', () => (this.input.end(new Error('closed')), resolve())));
  }

  static async connect(socketPath: string): Promise<RawNbd> {
    const socket = net.connect(socketPath);
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    return new RawNbd(socket);
  }

  send(data: Buffer): void {
    if (!this.socket.destroyed) this.socket.write(data);
  }

  read(length: number, timeoutMs = 5000): Promise<Buffer> {
    return Promise.race([
      this.input.read(length),
      new Promise<Buffer>((_, reject) => setTimeout(() => reject(new Error(`no ${length} bytes within ${timeoutMs} ms`)), timeoutMs).unref()),
    ]);
  }

  /** Resolves true if the server closes the connection within the time. */
  async closesWithin(ms: number): Promise<boolean> {
    return Promise.race([this.closed.then(() => true), new Promise<boolean>((resolve) => setTimeout(() => resolve(false), ms).unref())]);
  }

  destroy(): void {
    this.socket.destroy();
  }

  /** Reads the greeting and answers with client flags. */
  async greet(clientFlags = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES): Promise<Buffer> {
    const greeting = await this.read(18);
    this.send(u32(clientFlags));
    return greeting;
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0)): void {
    const header = Buffer.alloc(16);
    header.writeBigUInt64BE(IHAVEOPT, 0);
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(data.length, 12);
    this.send(Buffer.concat([header, data]));
  }

  /** One option reply: its type and data. */
  async optionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const header = await this.read(20);
    if (header.readBigUInt64BE(0) !== REPLY_MAGIC) throw new Error('bad option reply magic');
    return { option: header.readUInt32BE(8), type: header.readUInt32BE(12), data: await this.read(header.readUInt32BE(16)) };
  }

  /** Sends an option and returns every reply up to and including the final one. */
  async option(option: number, data: Buffer = Buffer.alloc(0)): Promise<Array<{ type: number; data: Buffer }>> {
    this.sendOption(option, data);
    const replies = [];
    for (;;) {
      const reply = await this.optionReply();
      replies.push(reply);
      if (reply.type === REP.ACK || reply.type >= 0x80000000) return replies;
    }
  }

  /** A complete handshake with NBD_OPT_GO (and, if asked, structured replies and base:allocation). */
  async go(exportName: string, options: { structured?: boolean; extended?: boolean; baseAllocation?: boolean } = {}): Promise<void> {
    await this.greet();
    if (options.extended) await this.option(OPT.EXTENDED_HEADERS);
    else if (options.structured) await this.option(OPT.STRUCTURED_REPLY);
    const name = Buffer.from(exportName);
    if (options.baseAllocation) {
      const query = Buffer.from('base:allocation');
      await this.option(OPT.SET_META_CONTEXT, Buffer.concat([u32(name.length), name, u32(1), u32(query.length), query]));
    }
    const replies = await this.option(OPT.GO, Buffer.concat([u32(name.length), name, u16(0)]));
    if (replies[replies.length - 1].type !== REP.ACK) throw new Error(`GO ${exportName} refused`);
  }
}

export function u32(value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value >>> 0, 0);
  return b;
}

export function u16(value: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(value, 0);
  return b;
}

/** A compact request header. */
export function request(type: number, flags: number, cookie: number, offset: number, length: number): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(0x25609513, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(cookie, 12);
  b.writeBigUInt64BE(BigInt(offset), 16);
  b.writeUInt32BE(length >>> 0, 24);
  return b;
}

/** A simple reply: error and cookie. */
export async function simpleReply(raw: RawNbd): Promise<{ error: number; cookie: number }> {
  const reply = await raw.read(16);
  if (reply.readUInt32BE(0) !== 0x67446698) throw new Error(`not a simple reply: 0x${reply.readUInt32BE(0).toString(16)}`);
  return { error: reply.readUInt32BE(4), cookie: reply.readUInt32BE(12) };
}
