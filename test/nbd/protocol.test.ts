import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { NbdClient, NbdError, NbdOptionError } from '../../node-plugin/nbd/client';
import { CLIENT_FIXED_NEWSTYLE, CMD, CMD_FLAG, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, NBDMAGIC, OPT, REP, TFLAG } from '../../node-plugin/nbd/protocol';
import { ArborServer, startServer } from '../support/arbor-server';
import { RawNbd, request, simpleReply, u16, u32 } from '../support/raw-nbd';
import { ok, run } from '../support/run';
import { tempDir } from '../support/tmp';

const MiB = 1024 * 1024;
const [EPERM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN] = [1, 22, 28, 75, 95, 108];

async function expectErrno(promise: Promise<unknown>, errno: number, what: string): Promise<void> {
  await assert.rejects(promise, (err) => err instanceof NbdError && err.errno === errno, what);
}

function infoRequest(name: string, infos: number[] = []): Buffer {
  const n = Buffer.from(name);
  return Buffer.concat([u32(n.length), n, u16(infos.length), ...infos.map(u16)]);
}

describe('NBD protocol: handshake and transmission edge cases', function () {
  this.timeout(120_000);
  let dir: { dir: string; cleanup: () => void };
  let server: ArborServer;
  let tlsPort = 0;

  before(async () => {
    dir = tempDir();
    await ok('openssl', [
      'req',
      '-x509',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-keyout',
      path.join(dir.dir, 'key.pem'),
      '-out',
      path.join(dir.dir, 'cert.pem'),
      '-days',
      '2',
      '-subj',
      '/CN=127.0.0.1',
      '-addext',
      'subjectAltName=IP:127.0.0.1',
    ]);
    server = await startServer(dir.dir, [
      '--nbd-listen',
      '127.0.0.1:0',
      '--tls-cert',
      path.join(dir.dir, 'cert.pem'),
      '--tls-key',
      path.join(dir.dir, 'key.pem'),
    ]);
    tlsPort = Number(/"port":(\d+)/.exec(server.log())![1]);
    await server.cliOk('volume', 'create', 'p', '--size', '64MiB', '--extent-size', '4KiB');
    await server.cliOk('snapshot', 'create', 'p@ro');
  });
  after(async () => {
    await server?.stop();
    dir.cleanup();
  });

  const connect = (options: Partial<Parameters<typeof NbdClient.connect>[0]> = {}) =>
    NbdClient.connect({ socketPath: server.nbdSocket, exportName: 'p', ...options });

  describe('handshake', () => {
    it('greets with NBDMAGIC, IHAVEOPT and fixed newstyle without zeroes', async () => {
      const raw = await RawNbd.connect(server.nbdSocket);
      const greeting = await raw.read(18);
      assert.equal(greeting.readBigUInt64BE(0), NBDMAGIC);
      assert.equal(greeting.readBigUInt64BE(8), IHAVEOPT);
      assert.equal(greeting.readUInt16BE(16), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
      raw.destroy();
    });

    it('drops a client that sets unknown flags', async () => {
      const raw = await RawNbd.connect(server.nbdSocket);
      await raw.greet(0x80);
      assert.ok(await raw.closesWithin(2000));
    });

    it('answers an unknown option with ERR_UNSUP and goes on', async () => {
      const raw = await RawNbd.connect(server.nbdSocket);
      await raw.greet();
      assert.deepEqual(
        (await raw.option(99, Buffer.from('whatever'))).map((r) => r.type),
        [REP.ERR_UNSUP],
      );
      assert.deepEqual(
        (await raw.option(OPT.LIST, Buffer.from('x'))).map((r) => r.type),
        [REP.ERR_INVALID],
        'LIST with data is invalid',
      );
      assert.deepEqual(
        (await raw.option(OPT.STRUCTURED_REPLY)).map((r) => r.type),
        [REP.ACK],
      );
      assert.deepEqual(
        (await raw.option(OPT.STRUCTURED_REPLY)).map((r) => r.type),
        [REP.ERR_INVALID],
        'twice is invalid',
      );
      const info = await raw.option(OPT.INFO, infoRequest('p', [3]));
      assert.deepEqual(
        info.map((r) => r.type),
        [REP.INFO, REP.INFO, REP.ACK],
      );
      const exportInfo = info[0].data;
      assert.equal(exportInfo.readBigUInt64BE(2), BigInt(64 * MiB));
      assert.ok(exportInfo.readUInt16BE(10) & TFLAG.SEND_DF, 'DF is advertised once replies are structured');
      assert.deepEqual(
        (await raw.option(OPT.GO, infoRequest('nope'))).map((r) => r.type),
        [REP.ERR_UNKNOWN],
      );
      assert.deepEqual(
        (await raw.option(OPT.GO, infoRequest('p'))).map((r) => r.type),
        [REP.INFO, REP.INFO, REP.ACK],
      );
      raw.send(request(CMD.DISC, 0, 1, 0, 0));
      assert.ok(await raw.closesWithin(2000), 'DISC closes');
    });

    it('refuses meta contexts before structured replies, and lists base:allocation after', async () => {
      const raw = await RawNbd.connect(server.nbdSocket);
      await raw.greet();
      const name = Buffer.from('p');
      const query = Buffer.from('base:allocation');
      const set = Buffer.concat([u32(name.length), name, u32(1), u32(query.length), query]);
      assert.deepEqual(
        (await raw.option(OPT.SET_META_CONTEXT, set)).map((r) => r.type),
        [REP.ERR_INVALID],
      );
      await raw.option(OPT.STRUCTURED_REPLY);
      const listed = await raw.option(OPT.LIST_META_CONTEXT, Buffer.concat([u32(name.length), name, u32(0)]));
      assert.deepEqual(
        listed.map((r) => r.type),
        [REP.META_CONTEXT, REP.ACK],
      );
      assert.equal(listed[0].data.toString('utf8', 4), 'base:allocation');
      const selected = await raw.option(
        OPT.SET_META_CONTEXT,
        Buffer.concat([u32(name.length), name, u32(2), u32(5), Buffer.from('qemu:'), u32(query.length), query]),
      );
      assert.deepEqual(
        selected.map((r) => r.type),
        [REP.META_CONTEXT, REP.ACK],
        'an unknown namespace is ignored',
      );
      assert.deepEqual(
        (await raw.option(OPT.SET_META_CONTEXT, Buffer.from([0, 0, 0, 9, 1]))).map((r) => r.type),
        [REP.ERR_INVALID],
        'a malformed request',
      );
      raw.destroy();
    });

    it('EXPORT_NAME: old clients get size and flags (with 124 zeros unless they said no), an unknown name is dropped', async () => {
      const raw = await RawNbd.connect(server.nbdSocket);
      await raw.greet(CLIENT_FIXED_NEWSTYLE);
      raw.sendOption(OPT.EXPORT_NAME, Buffer.from('p'));
      const reply = await raw.read(134);
      assert.equal(reply.readBigUInt64BE(0), BigInt(64 * MiB));
      assert.ok(reply.subarray(10).every((b) => b === 0));
      raw.send(request(CMD.WRITE, 0, 7, 0, 4));
      raw.send(Buffer.from('abcd'));
      assert.deepEqual(await simpleReply(raw), { error: 0, cookie: 7 });
      raw.destroy();
      const unknown = await RawNbd.connect(server.nbdSocket);
      await unknown.greet();
      unknown.sendOption(OPT.EXPORT_NAME, Buffer.from('no-such-export'));
      assert.ok(await unknown.closesWithin(2000));
    });

    it('an oversized option gets ERR_TOO_BIG and a hang-up; ABORT gets an ACK and a close', async () => {
      const big = await RawNbd.connect(server.nbdSocket);
      await big.greet();
      const header = Buffer.alloc(16);
      header.writeBigUInt64BE(IHAVEOPT, 0);
      header.writeUInt32BE(OPT.GO, 8);
      header.writeUInt32BE(0x7fffffff, 12);
      big.send(header);
      assert.equal((await big.optionReply()).type, REP.ERR_TOO_BIG);
      assert.ok(await big.closesWithin(2000));
      const abort = await RawNbd.connect(server.nbdSocket);
      await abort.greet();
      assert.deepEqual(
        (await abort.option(OPT.ABORT)).map((r) => r.type),
        [REP.ACK],
      );
      assert.ok(await abort.closesWithin(2000));
    });

    it('STARTTLS on the unix socket is refused by policy; the TCP listener requires TLS (FORCEDTLS)', async () => {
      const raw = await RawNbd.connect(server.nbdSocket);
      await raw.greet();
      assert.deepEqual(
        (await raw.option(OPT.STARTTLS)).map((r) => r.type),
        [REP.ERR_POLICY],
      );
      raw.destroy();
      await assert.rejects(
        NbdClient.connect({ host: '127.0.0.1', port: tlsPort, exportName: 'p' }),
        (err) => err instanceof NbdOptionError && err.replyType === REP.ERR_TLS_REQD,
      );
      const ca = fs.readFileSync(path.join(dir.dir, 'cert.pem'));
      const secure = await NbdClient.connect({ host: '127.0.0.1', port: tlsPort, exportName: 'p', tls: { ca, host: '127.0.0.1' } });
      await secure.write(MiB, Buffer.alloc(4096, 0x33));
      assert.equal((await secure.read(MiB, 4096))[4095], 0x33);
      await secure.disconnect();
    });

    it('nbdinfo connects over TLS with the server certificate', async () => {
      const certs = path.join(dir.dir, 'certs');
      fs.mkdirSync(certs, { recursive: true });
      fs.copyFileSync(path.join(dir.dir, 'cert.pem'), path.join(certs, 'ca-cert.pem'));
      const out = await run('nbdinfo', ['--size', `nbds://127.0.0.1:${tlsPort}/p?tls-certificates=${certs}`]);
      assert.equal(out.status, 0, out.stderr);
      assert.equal(out.stdout.trim(), String(64 * MiB));
    });

    it('extended headers: negotiated, they replace structured replies and carry 64-bit lengths', async () => {
      const raw = await RawNbd.connect(server.nbdSocket);
      await raw.greet();
      assert.deepEqual(
        (await raw.option(OPT.EXTENDED_HEADERS)).map((r) => r.type),
        [REP.ACK],
      );
      assert.deepEqual(
        (await raw.option(OPT.STRUCTURED_REPLY)).map((r) => r.type),
        [REP.ERR_EXT_HEADER_REQD],
      );
      raw.destroy();
      const client = await connect({ extendedHeaders: true });
      await client.write(3 * MiB + 5, Buffer.alloc(10000, 0x44));
      assert.ok((await client.read(3 * MiB, 20000)).subarray(5, 10005).every((b) => b === 0x44));
      const status = await client.blockStatus(0, 64 * MiB);
      assert.ok(status.some((r) => r.kind === 'data') && status.some((r) => r.kind === 'hole'));
      await expectErrno(client.request(CMD.WRITE, 0, 0, 4, Buffer.alloc(4)), EINVAL, 'a write without PAYLOAD_LEN');
      await expectErrno(client.request(CMD.READ, CMD_FLAG.PAYLOAD_LEN, 0, 4, Buffer.alloc(4)), EINVAL, 'a payload on a read');
      assert.equal((await client.read(3 * MiB + 5, 1))[0], 0x44, 'the connection carries on');
      await client.disconnect();
    });
  });

  describe('transmission', () => {
    it('every bad request gets the error the spec asks for, and the connection carries on', async () => {
      const client = await connect();
      const ro = await connect({ exportName: 'p@ro' });
      await expectErrno(client.read(64 * MiB - 10, 20), EINVAL, 'read past the end');
      await expectErrno(client.write(64 * MiB - 10, Buffer.alloc(20)), ENOSPC, 'write past the end');
      await expectErrno(client.zero(64 * MiB - 10, 20), ENOSPC, 'write-zeroes past the end');
      await expectErrno(client.trim(64 * MiB, 1), EINVAL, 'trim past the end');
      await expectErrno(client.blockStatus(64 * MiB, 1), EINVAL, 'block status past the end');
      await expectErrno(client.read(0, 0), EINVAL, 'length 0');
      await expectErrno(client.read(0, 33 * MiB), EOVERFLOW, 'a read over 32 MiB');
      await expectErrno(client.request(42, 0, 0, 1), EINVAL, 'an unknown command');
      await expectErrno(client.request(CMD.READ, 0x40, 0, 1), EINVAL, 'an unknown flag');
      await expectErrno(client.request(CMD.READ, CMD_FLAG.NO_HOLE, 0, 1), EINVAL, 'a flag of another command');
      await expectErrno(client.request(CMD.FLUSH, 0, 4096, 1), EINVAL, 'flush with an offset');
      await expectErrno(ro.write(0, Buffer.alloc(1)), EPERM, 'write to a snapshot');
      await expectErrno(ro.trim(0, 4096), EPERM, 'trim of a snapshot');
      await client.write(100, Buffer.from('data'));
      await expectErrno(client.zero(96, 8, CMD_FLAG.FAST_ZERO), ENOTSUP, 'a fast zero that needs a data write');
      assert.equal((await client.read(100, 4)).toString(), 'data', 'the refused fast zero changed nothing');
      await client.request(CMD.READ, CMD_FLAG.FUA, 0, 1);
      const plain = await connect({ baseAllocation: false });
      await expectErrno(plain.blockStatus(0, 4096), EINVAL, 'block status without a negotiated context');
      await plain.disconnect();
      const simple = await connect({ structuredReplies: false });
      await expectErrno(simple.request(CMD.READ, CMD_FLAG.DF, 0, 1), EINVAL, 'DF without structured replies');
      await simple.disconnect();
      await client.disconnect();
      await ro.disconnect();
    });

    it("writes pipelined in one burst, whole in the socket's chunks or split across them, done at once or not, each land once and right", async () => {
      const raw = await RawNbd.connect(server.nbdSocket);
      await raw.go('p');
      const base = 8 * MiB;
      const slot = 16 * 1024;
      const writes: { offset: number; data: Buffer; flags: number; errno: number }[] = [];
      const client = await connect();
      const expected = await client.read(base, 60 * slot);
      let seed = 1;
      const next = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31);
      for (let i = 0; i < 60; i++) {
        // Each its own range (pipelined writes that overlap may land in any order): within
        // one 4 KiB extent (done at once), across extents (the async path), FUA, and now
        // and then one past the end (refused, its payload skipped).
        const across = i % 5 === 1;
        const inner = across ? 4096 - 100 - (next() % 1000) : (next() % 3) * 4096 + (next() % 2048);
        const length = across ? 200 + (next() % 6000) : 1 + (next() % (4096 - (inner % 4096)));
        const offset = i % 13 === 6 ? 64 * MiB - 10 : base + i * slot + inner;
        const data = Buffer.alloc(length, (i % 250) + 1);
        writes.push({ offset, data, flags: i % 11 === 4 ? CMD_FLAG.FUA : 0, errno: offset + length > 64 * MiB ? ENOSPC : 0 });
      }
      const burst = Buffer.concat(writes.flatMap((w, i) => [request(CMD.WRITE, w.flags, 1000 + i, w.offset, w.data.length), w.data]));
      // Three sends: the cuts fall inside a header and inside a payload.
      const cuts = [0, 1000 + 17, Math.floor(burst.length / 2) + 3, burst.length];
      for (let c = 0; c + 1 < cuts.length; c++) {
        raw.send(burst.subarray(cuts[c], cuts[c + 1]));
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
      const replies = new Map<number, number>();
      for (let i = 0; i < writes.length; i++) {
        const reply = await simpleReply(raw);
        replies.set(reply.cookie, reply.error);
      }
      for (const [i, w] of writes.entries()) {
        assert.equal(replies.get(1000 + i), w.errno, `write ${i} (${w.data.length} bytes at ${w.offset}) answered once, with errno ${w.errno}`);
        if (!w.errno) w.data.copy(expected, w.offset - base);
      }
      raw.destroy();
      assert.ok((await client.read(base, expected.length)).equals(expected), 'every write landed where it was sent, and nothing else changed');
      await client.disconnect();
    });

    it('large writes, read from the socket straight into their buffers, land whole and right whatever cuts the stream, beside small and refused ones', async () => {
      // Payloads with 64 KiB or more still to come are read in place (directPayloadBytes):
      // cuts inside headers and payloads move where each read starts and ends.
      await server.cliOk('volume', 'create', 'large', '--size', '96MiB');
      const size = 96 * MiB;
      const slot = 2 * MiB;
      let seed = 7;
      const next = (n: number) => (seed = (seed * 1103515245 + 12345) % 2 ** 31) % n;
      const expected = Buffer.alloc(40 * slot);
      for (const round of [0, 1]) {
        const raw = await RawNbd.connect(server.nbdSocket);
        await raw.go('large');
        const writes: { offset: number; data: Buffer; errno: number }[] = [];
        for (let i = 0; i < 40; i++) {
          const kind = i % 8;
          // Mostly large (some just over the bound, some over the read buffer), now and then
          // small, and some large ones past the end: refused, their payloads still consumed.
          const length = kind === 3 ? 1 + next(9000) : kind === 5 ? 64 * 1024 + 1 + next(100) : 64 * 1024 + next(slot - 64 * 1024 - 4096);
          const offset = kind === 6 ? size - 4096 : i * slot + next(4096);
          const data = Buffer.alloc(length);
          for (let b = 0; b < length; b += 512) data.fill((i * 31 + b / 512 + round) % 251, b, Math.min(length, b + 512));
          writes.push({ offset, data, errno: offset + length > size ? ENOSPC : 0 });
        }
        const burst = Buffer.concat(writes.flatMap((w, i) => [request(CMD.WRITE, i % 7 === 2 ? CMD_FLAG.FUA : 0, 5000 + i, w.offset, w.data.length), w.data]));
        const cuts = [0, ...Array.from({ length: 30 }, () => next(burst.length)), burst.length].sort((a, b) => a - b);
        for (let c = 0; c + 1 < cuts.length; c++) {
          raw.send(burst.subarray(cuts[c], cuts[c + 1]));
          if (c % 3 === 0) await new Promise((resolve) => setTimeout(resolve, 5));
        }
        const replies = new Map<number, number>();
        for (let i = 0; i < writes.length; i++) {
          const reply = await simpleReply(raw);
          assert.ok(!replies.has(reply.cookie), `write ${reply.cookie - 5000} answered once`);
          replies.set(reply.cookie, reply.error);
        }
        for (const [i, w] of writes.entries()) {
          assert.equal(replies.get(5000 + i), w.errno, `write ${i} (${w.data.length} bytes at ${w.offset}): errno ${w.errno}`);
          if (!w.errno) w.data.copy(expected, w.offset);
        }
        raw.destroy();
      }
      const client = await connect({ exportName: 'large' });
      for (let s = 0; s < 40; s++) {
        const got = await client.read(s * slot, slot);
        assert.ok(got.equals(expected.subarray(s * slot, (s + 1) * slot)), `slot ${s} holds what the writes put there`);
      }
      await client.disconnect();
    });

    it('writes and reads pipelined with DISC in one send are all answered before the connection closes', async () => {
      const base = 12 * MiB;
      const slot = 16 * 1024;
      const seeded = await connect();
      await seeded.write(base + 40 * slot, Buffer.alloc(5 * slot, 0x5a));
      await seeded.disconnect();
      const raw = await RawNbd.connect(server.nbdSocket);
      await raw.go('p');
      const parts: Buffer[] = [];
      const writes = 20;
      for (let i = 0; i < writes; i++) {
        // Within one extent (answered at once), across extents (answered later), and FUA.
        const length = i % 3 === 1 ? 6000 : 1000;
        const offset = base + i * slot + (i % 3 === 1 ? 3000 : 100);
        parts.push(request(CMD.WRITE, i % 4 === 3 ? CMD_FLAG.FUA : 0, 2000 + i, offset, length), Buffer.alloc(length, i + 1));
      }
      for (let r = 0; r < 5; r++) parts.push(request(CMD.READ, 0, 3000 + r, base + (40 + r) * slot, 512));
      parts.push(request(CMD.DISC, 0, 1, 0, 0));
      raw.send(Buffer.concat(parts));
      const answered = new Set<number>();
      for (let n = 0; n < writes + 5; n++) {
        const reply = await simpleReply(raw);
        assert.equal(reply.error, 0, `request ${reply.cookie} succeeded`);
        if (reply.cookie >= 3000)
          assert.ok(
            (await raw.read(512)).every((b) => b === 0x5a),
            `read ${reply.cookie} has its bytes`,
          );
        answered.add(reply.cookie);
      }
      assert.equal(answered.size, writes + 5, 'each request answered once');
      assert.ok(await raw.closesWithin(2000), 'then DISC closes');
    });

    it('a write over 32 MiB is consumed and refused with EOVERFLOW, and the next request works', async () => {
      const client = await connect();
      await expectErrno(client.write(0, Buffer.alloc(33 * MiB, 1)), EOVERFLOW, 'oversized write');
      await client.write(0, Buffer.from('next'));
      assert.equal((await client.read(0, 4)).toString(), 'next');
      await client.disconnect();
    });

    it('a wrong request magic drops that connection only', async () => {
      const witness = await connect();
      const raw = await RawNbd.connect(server.nbdSocket);
      await raw.go('p');
      const bad = request(CMD.READ, 0, 1, 0, 1);
      bad.writeUInt32BE(0xdeadbeef, 0);
      raw.send(bad);
      assert.ok(await raw.closesWithin(2000));
      await witness.write(2 * MiB, Buffer.from('still here'));
      assert.equal((await witness.read(2 * MiB, 10)).toString(), 'still here');
      await witness.disconnect();
    });

    it('hundreds of requests in flight on several connections all complete with the right data', async () => {
      const clients = await Promise.all([connect(), connect(), connect({ structuredReplies: false })]);
      const work: Array<Promise<void>> = [];
      for (let i = 0; i < 600; i++) {
        const client = clients[i % clients.length];
        const offset = 8 * MiB + i * 8192;
        work.push(client.write(offset, Buffer.alloc(8192, i % 251)).then(async () => assert.equal((await client.read(offset + 100, 1))[0], i % 251)));
      }
      await Promise.all(work);
      for (const client of clients) await client.disconnect();
    });

    it('block status reports holes, data and allocated zeros, and REQ_ONE gives one descriptor', async () => {
      await server.cliOk('volume', 'create', 'bs', '--size', '16MiB', '--extent-size', '64KiB');
      const client = await connect({ exportName: 'bs' });
      await client.write(MiB, Buffer.alloc(MiB, 9));
      await client.zero(4 * MiB, MiB, CMD_FLAG.NO_HOLE);
      const all = await client.blockStatus(0, 16 * MiB);
      assert.deepEqual(
        all.map((r) => [r.offset / MiB, r.length / MiB, r.kind]),
        [
          [0, 1, 'hole'],
          [1, 1, 'data'],
          [2, 2, 'hole'],
          [4, 1, 'zero'],
          [5, 11, 'hole'],
        ],
      );
      const one = await client.blockStatus(MiB + 4096, 8 * MiB, CMD_FLAG.REQ_ONE);
      assert.deepEqual(
        one.map((r) => [r.length, r.kind]),
        [[MiB - 4096, 'data']],
      );
      const hole = await client.read(6 * MiB, 8 * MiB);
      assert.ok(
        hole.every((b) => b === 0),
        'a read over holes is answered with hole chunks that read as zeros',
      );
      await client.disconnect();
    });

    it('FLUSH on one connection makes writes completed on another durable (CAN_MULTI_CONN), even across SIGKILL', async () => {
      const d = tempDir();
      const victim = await startServer(d.dir);
      try {
        await victim.cliOk('volume', 'create', 'mc', '--size', '16MiB');
        const writer = await NbdClient.connect({ socketPath: victim.nbdSocket, exportName: 'mc' });
        const flusher = await NbdClient.connect({ socketPath: victim.nbdSocket, exportName: 'mc' });
        await writer.write(5 * MiB, Buffer.alloc(MiB, 0x5c));
        await flusher.flush();
        await victim.kill();
        writer.destroy();
        flusher.destroy();
        await victim.cliOk('volume', 'export', 'mc', path.join(d.dir, 'mc.raw'));
        const image = fs.readFileSync(path.join(d.dir, 'mc.raw'));
        assert.ok(
          image.subarray(5 * MiB, 6 * MiB).every((b) => b === 0x5c),
          'the write flushed from the other connection survived SIGKILL',
        );
      } finally {
        await victim.kill();
        d.cleanup();
      }
    });

    it('a client that stops reading replies is throttled: the server does not buffer without bound', async () => {
      const d = tempDir();
      const victim = await startServer(d.dir);
      try {
        await victim.cliOk('volume', 'create', 'bp', '--size', '1GiB');
        const raw = await RawNbd.connect(victim.nbdSocket);
        await raw.go('bp');
        const rssBefore = rss(victim.pid);
        // 1 GiB of 1 MiB reads, replies never read. The requests are queued without
        // waiting for 'drain': a throttled server stops reading requests too, so a
        // client waiting for its own socket to drain would wait forever.
        const header = request(CMD.READ, 0, 1, 0, MiB);
        const sent = 1024;
        for (let i = 0; i < sent; i++) {
          header.writeBigUInt64BE(BigInt(i * MiB), 16);
          raw.socket.write(Buffer.from(header));
        }
        await new Promise((resolve) => setTimeout(resolve, 1500));
        const grown = rss(victim.pid) - rssBefore;
        assert.ok(grown < 300 * MiB, `server memory grew by ${Math.round(grown / MiB)} MiB for ${sent} MiB of unread replies`);
        raw.destroy();
        const client = await NbdClient.connect({ socketPath: victim.nbdSocket, exportName: 'bp' });
        await client.write(0, Buffer.from('alive'));
        await client.disconnect();
      } finally {
        await victim.stop();
        d.cleanup();
      }
    });

    it('DISC: requests already sent are answered, then the server closes', async () => {
      const raw = await RawNbd.connect(server.nbdSocket);
      await raw.go('p');
      raw.send(Buffer.concat([request(CMD.WRITE, 0, 11, 7 * MiB, 3), Buffer.from('xyz'), request(CMD.FLUSH, 0, 12, 0, 0), request(CMD.DISC, 0, 13, 0, 0)]));
      const replies = [await simpleReply(raw), await simpleReply(raw)];
      assert.deepEqual(replies.map((r) => r.cookie).sort(), [11, 12]);
      assert.ok(await raw.closesWithin(2000));
      const check = await connect();
      assert.equal((await check.read(7 * MiB, 3)).toString(), 'xyz');
      await check.disconnect();
    });
  });

  describe('shutdown and restart', () => {
    it('SIGTERM: requests in flight finish, new ones get ESHUTDOWN, and after a restart every flushed byte is there', async () => {
      const d = tempDir();
      let victim = await startServer(d.dir);
      try {
        await victim.cliOk('volume', 'create', 'sd', '--size', '64MiB');
        const client = await NbdClient.connect({ socketPath: victim.nbdSocket, exportName: 'sd' });
        const writes = Array.from({ length: 32 }, (_, i) => client.write(i * MiB, Buffer.alloc(MiB, i + 1)));
        await Promise.all(writes);
        await client.flush();
        const stopping = victim.stop();
        await new Promise((resolve) => setTimeout(resolve, 300));
        await expectErrno(client.read(0, 1), ESHUTDOWN, 'a request after shutdown began');
        await client.disconnect();
        assert.equal(await stopping, 0, 'the server exits cleanly');
        assert.match(victim.log(), /"message":"stopped: every volume committed and the store closed"/);
        victim = await startServer(d.dir);
        const again = await NbdClient.connect({ socketPath: victim.nbdSocket, exportName: 'sd' });
        for (let i = 0; i < 32; i++) assert.equal((await again.read(i * MiB + 777, 1))[0], i + 1, `MiB ${i} survived the restart`);
        await again.disconnect();
      } finally {
        await victim.stop();
        d.cleanup();
      }
    });
  });
});

function rss(pid: number): number {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)![1]) * 1024;
}
