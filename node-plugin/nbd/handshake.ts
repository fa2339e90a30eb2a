import { Log } from '../../lib/logger';
import { isArborError } from '../../store/errors';
import { ExportClient, ExportProvider, NbdExport } from './export';
import { maxOptionBytes, maxOptionsPerHandshake, maxPayloadBytes, minimumBlockBytes } from './limits';
import {
  BASE_ALLOCATION,
  CLIENT_FIXED_NEWSTYLE,
  CLIENT_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  INFO,
  NBDMAGIC,
  OPT,
  REP,
  REPLY_MAGIC,
  TFLAG,
} from './protocol';

/** The context id the server gives base:allocation. */
export const baseAllocationContextId = 1;

/** Why a connection is closed during the handshake; never sent to the client. */
export class ProtocolError extends Error {}

export interface HandshakeIo {
  read(length: number): Promise<Buffer>;
  write(data: Buffer): void;
  /** Switches the connection to TLS after the ACK to STARTTLS; absent where TLS is not configured. */
  startTls?: () => Promise<void>;
}

export interface HandshakeOptions {
  exports: ExportProvider;
  /** Who is on the other end, for the exports to decide how to serve it. */
  client?: ExportClient;
  /** FORCEDTLS: every option but STARTTLS (and ABORT) is refused until TLS is up. */
  tlsRequired: boolean;
  log: Log;
}

export interface Negotiated {
  export: NbdExport;
  structuredReplies: boolean;
  extendedHeaders: boolean;
  /** base:allocation was selected with SET_META_CONTEXT. */
  baseAllocation: boolean;
}

interface State {
  structured: boolean;
  extended: boolean;
  tls: boolean;
  baseAllocation: boolean;
  /** The export SET_META_CONTEXT was answered for: GO must name the same one. */
  metaContextExport?: string;
}

/**
 * Transmission flags the server advertises for an export (each one true: it does
 * what it says). DF only means something with structured replies, so it is
 * advertised only once they are negotiated.
 */
export function transmissionFlags(exp: NbdExport, structured: boolean): number {
  let flags = TFLAG.HAS_FLAGS | TFLAG.SEND_FLUSH | TFLAG.SEND_FUA | TFLAG.CAN_MULTI_CONN | TFLAG.SEND_CACHE;
  if (structured) flags |= TFLAG.SEND_DF;
  if (exp.readOnly) flags |= TFLAG.READ_ONLY;
  else flags |= TFLAG.SEND_TRIM | TFLAG.SEND_WRITE_ZEROES | TFLAG.SEND_FAST_ZERO;
  return flags;
}

/**
 * The fixed newstyle handshake, server side. Resolves with the chosen export when
 * the client enters transmission, with undefined when it aborts; throws
 * ProtocolError when the connection must be dropped.
 */
export async function negotiate(io: HandshakeIo, options: HandshakeOptions): Promise<Negotiated | undefined> {
  const greeting = Buffer.alloc(18);
  greeting.writeBigUInt64BE(NBDMAGIC, 0);
  greeting.writeBigUInt64BE(IHAVEOPT, 8);
  greeting.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
  io.write(greeting);
  const clientFlags = (await io.read(4)).readUInt32BE(0);
  if ((clientFlags & ~(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)) !== 0) throw new ProtocolError(`unknown client flags 0x${clientFlags.toString(16)}`);
  const fixed = (clientFlags & CLIENT_FIXED_NEWSTYLE) !== 0;
  const noZeroes = (clientFlags & CLIENT_NO_ZEROES) !== 0;
  const state: State = { structured: false, extended: false, tls: false, baseAllocation: false };

  for (let count = 0; ; count++) {
    if (count >= maxOptionsPerHandshake) throw new ProtocolError(`more than ${maxOptionsPerHandshake} options`);
    const header = await io.read(16);
    if (header.readBigUInt64BE(0) !== IHAVEOPT) throw new ProtocolError('option without IHAVEOPT magic');
    const option = header.readUInt32BE(8);
    const length = header.readUInt32BE(12);
    if (length > maxOptionBytes) {
      // Too large to be honest; reading it would be a way to make us buffer without bound.
      if (fixed) reply(io, option, REP.ERR_TOO_BIG, Buffer.from(`option data of ${length} bytes is over the limit of ${maxOptionBytes}`));
      throw new ProtocolError(`option ${option} with ${length} bytes of data`);
    }
    const data = await io.read(length);
    const answer = (type: number, payload: Buffer = Buffer.alloc(0)) => reply(io, option, type, payload);
    const refuse = (type: number, message: string) => answer(type, Buffer.from(message));

    if (!fixed && option !== OPT.EXPORT_NAME) throw new ProtocolError('a client without fixed newstyle sent an option other than EXPORT_NAME');
    if (options.tlsRequired && !state.tls && option !== OPT.STARTTLS && option !== OPT.ABORT) {
      if (option === OPT.EXPORT_NAME) throw new ProtocolError('EXPORT_NAME before STARTTLS on a server that requires TLS');
      refuse(REP.ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first');
      continue;
    }

    switch (option) {
      case OPT.EXPORT_NAME: {
        const name = data.toString('utf8');
        const exp = await options.exports.open(name, options.client);
        if (!exp) throw new ProtocolError(`EXPORT_NAME for unknown export ${JSON.stringify(name)}`);
        const out = Buffer.alloc(noZeroes ? 10 : 134);
        out.writeBigUInt64BE(BigInt(exp.sizeBytes), 0);
        out.writeUInt16BE(transmissionFlags(exp, state.structured), 8);
        io.write(out);
        return { export: exp, structuredReplies: state.structured, extendedHeaders: state.extended, baseAllocation: false };
      }
      case OPT.ABORT:
        answer(REP.ACK);
        return undefined;
      case OPT.LIST: {
        if (length !== 0) {
          refuse(REP.ERR_INVALID, 'NBD_OPT_LIST takes no data');
          break;
        }
        for (const summary of await options.exports.list()) {
          const name = Buffer.from(summary.name);
          const payload = Buffer.alloc(4 + name.length);
          payload.writeUInt32BE(name.length, 0);
          name.copy(payload, 4);
          answer(REP.SERVER, Buffer.concat([payload, Buffer.from(summary.description)]));
        }
        answer(REP.ACK);
        break;
      }
      case OPT.STARTTLS:
        if (length !== 0) refuse(REP.ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
        else if (state.tls) refuse(REP.ERR_INVALID, 'TLS is already on');
        else if (!io.startTls) refuse(REP.ERR_POLICY, 'this listener does not offer TLS');
        else {
          answer(REP.ACK);
          await io.startTls();
          // Nothing negotiated in the clear survives the upgrade.
          Object.assign(state, { structured: false, extended: false, baseAllocation: false, metaContextExport: undefined, tls: true });
        }
        break;
      case OPT.STRUCTURED_REPLY:
        if (length !== 0) refuse(REP.ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        else if (state.extended) refuse(REP.ERR_EXT_HEADER_REQD, 'extended headers are already on, and they include structured replies');
        else if (state.structured) refuse(REP.ERR_INVALID, 'structured replies are already on');
        else {
          state.structured = true;
          answer(REP.ACK);
        }
        break;
      case OPT.EXTENDED_HEADERS:
        if (length !== 0) refuse(REP.ERR_INVALID, 'NBD_OPT_EXTENDED_HEADERS takes no data');
        else if (state.extended) refuse(REP.ERR_INVALID, 'extended headers are already on');
        else {
          state.extended = true;
          state.structured = true;
          answer(REP.ACK);
        }
        break;
      case OPT.LIST_META_CONTEXT:
      case OPT.SET_META_CONTEXT: {
        const set = option === OPT.SET_META_CONTEXT;
        // SET replaces what an earlier SET chose, even when it fails.
        if (set) {
          state.baseAllocation = false;
          state.metaContextExport = undefined;
        }
        if (!state.structured) {
          refuse(REP.ERR_INVALID, 'negotiate structured replies before meta contexts');
          break;
        }
        const request = parseMetaContextRequest(data);
        if (!request) {
          refuse(REP.ERR_INVALID, 'malformed meta context request');
          break;
        }
        if (!(await existsOrRefuse(options, request.exportName, refuse))) break;
        // base:allocation is the one context; a query selects it when it names it or
        // (listing only) asks for everything or the whole base: namespace.
        const selects = request.queries.some((q) => q === BASE_ALLOCATION || (!set && q === 'base:')) || (!set && request.queries.length === 0);
        if (set) {
          state.baseAllocation = selects;
          state.metaContextExport = request.exportName;
        }
        if (selects) {
          const name = Buffer.from(BASE_ALLOCATION);
          const payload = Buffer.alloc(4 + name.length);
          payload.writeUInt32BE(set ? baseAllocationContextId : 0, 0);
          name.copy(payload, 4);
          answer(REP.META_CONTEXT, payload);
        }
        answer(REP.ACK);
        break;
      }
      case OPT.INFO:
      case OPT.GO: {
        const request = parseInfoRequest(data);
        if (!request) {
          refuse(REP.ERR_INVALID, 'malformed NBD_OPT_INFO/GO request');
          break;
        }
        const exp = await openOrRefuse(options, request.exportName, refuse);
        if (!exp) break;
        const info = Buffer.alloc(12);
        info.writeUInt16BE(INFO.EXPORT, 0);
        info.writeBigUInt64BE(BigInt(exp.sizeBytes), 2);
        info.writeUInt16BE(transmissionFlags(exp, state.structured), 10);
        answer(REP.INFO, info);
        if (request.infos.includes(INFO.NAME)) answer(REP.INFO, Buffer.concat([u16(INFO.NAME), Buffer.from(exp.name)]));
        if (request.infos.includes(INFO.DESCRIPTION)) answer(REP.INFO, Buffer.concat([u16(INFO.DESCRIPTION), Buffer.from(exp.description)]));
        // Block sizes go out whether asked or not: clients that did not ask may ignore them.
        const sizes = Buffer.alloc(14);
        sizes.writeUInt16BE(INFO.BLOCK_SIZE, 0);
        sizes.writeUInt32BE(minimumBlockBytes, 2);
        sizes.writeUInt32BE(exp.preferredBlockBytes, 6);
        sizes.writeUInt32BE(maxPayloadBytes, 10);
        answer(REP.INFO, sizes);
        answer(REP.ACK);
        if (option === OPT.GO) {
          const baseAllocation = state.baseAllocation && state.metaContextExport === request.exportName;
          return { export: exp, structuredReplies: state.structured, extendedHeaders: state.extended, baseAllocation };
        }
        await exp.close?.();
        break;
      }
      default:
        refuse(REP.ERR_UNSUP, `option ${option} is not supported`);
    }
  }
}

/**
 * Opens an export for INFO, GO or a meta-context query, or refuses the option:
 * ERR_UNKNOWN when there is no such export, ERR_POLICY when it exists but cannot be
 * served here now (another node owns the volume).
 */
/** Whether the export exists, without opening it where the provider can tell (opening may attach a volume). */
async function existsOrRefuse(options: HandshakeOptions, name: string, refuse: (type: number, message: string) => void): Promise<boolean> {
  if (!options.exports.exists) {
    const probed = await openOrRefuse(options, name, refuse);
    await probed?.close?.();
    return probed !== undefined;
  }
  if (await options.exports.exists(name)) return true;
  refuse(REP.ERR_UNKNOWN, `no export named ${JSON.stringify(name)}; volumes are served as NAME, snapshots as NAME@SNAP`);
  return false;
}

async function openOrRefuse(options: HandshakeOptions, name: string, refuse: (type: number, message: string) => void): Promise<NbdExport | undefined> {
  let exp: NbdExport | undefined;
  try {
    exp = await options.exports.open(name, options.client);
  } catch (err) {
    if (!isArborError(err)) throw err;
    refuse(REP.ERR_POLICY, `${name}: ${err.message}`);
    return undefined;
  }
  if (!exp) refuse(REP.ERR_UNKNOWN, `no export named ${JSON.stringify(name)}; volumes are served as NAME, snapshots as NAME@SNAP`);
  return exp;
}

function reply(io: HandshakeIo, option: number, type: number, payload: Buffer): void {
  const header = Buffer.alloc(20);
  header.writeBigUInt64BE(REPLY_MAGIC, 0);
  header.writeUInt32BE(option, 8);
  header.writeUInt32BE(type, 12);
  header.writeUInt32BE(payload.length, 16);
  io.write(payload.length ? Buffer.concat([header, payload]) : header);
}

function u16(value: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(value, 0);
  return b;
}

/** INFO/GO data: u32 name length, name, u16 count, count × u16 info type. */
function parseInfoRequest(data: Buffer): { exportName: string; infos: number[] } | undefined {
  if (data.length < 6) return undefined;
  const nameLength = data.readUInt32BE(0);
  if (nameLength > data.length - 6) return undefined;
  const exportName = data.toString('utf8', 4, 4 + nameLength);
  const count = data.readUInt16BE(4 + nameLength);
  if (data.length !== 6 + nameLength + count * 2) return undefined;
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(data.readUInt16BE(6 + nameLength + i * 2));
  return { exportName, infos };
}

/** META_CONTEXT data: u32 name length, name, u32 count, count × (u32 length, query). */
function parseMetaContextRequest(data: Buffer): { exportName: string; queries: string[] } | undefined {
  if (data.length < 8) return undefined;
  const nameLength = data.readUInt32BE(0);
  if (nameLength > data.length - 8) return undefined;
  const exportName = data.toString('utf8', 4, 4 + nameLength);
  let at = 4 + nameLength;
  const count = data.readUInt32BE(at);
  at += 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (at + 4 > data.length) return undefined;
    const length = data.readUInt32BE(at);
    at += 4;
    if (length > data.length - at) return undefined;
    queries.push(data.toString('utf8', at, at + length));
    at += length;
  }
  return at === data.length ? { exportName, queries } : undefined;
}
