import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import { NbdClient } from '../../node-plugin/nbd/client';
import { CLIENT_FIXED_NEWSTYLE, CLIENT_NO_ZEROES, CMD, CMD_FLAG, IHAVEOPT, OPT } from '../../node-plugin/nbd/protocol';
import { serverForSuite } from '../support/arbor-server';
import { Random, seedFromEnv } from '../support/random';
import { request, u16, u32 } from '../support/raw-nbd';

/**
 * Fuzz: thousands of sessions of random bytes and of valid sessions mutated (bits
 * flipped, fields set to edge values, bytes cut, repeated or inserted) against a
 * real `arbor serve`. Meanwhile a witness connection keeps writing and checking its
 * own volume. At the end the server is alive, the witness data and a snapshot are
 * intact, and the server still stops cleanly. ARBOR_FUZZ_SEED replays a run.
 */
const sessions = Number(process.env.ARBOR_FUZZ_SESSIONS ?? 6000);
const seed = seedFromEnv('ARBOR_FUZZ_SEED');
const MiB = 1024 * 1024;
const volumeBytes = 16 * MiB;

function option(code: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(16);
  header.writeBigUInt64BE(IHAVEOPT, 0);
  header.writeUInt32BE(code, 8);
  header.writeUInt32BE(data.length, 12);
  return Buffer.concat([header, data]);
}

function named(name: string, rest: Buffer[]): Buffer {
  const n = Buffer.from(name);
  return Buffer.concat([u32(n.length), n, ...rest]);
}

/** A plausible session: a handshake some client could send, then requests. */
function validSession(rng: Random): Buffer {
  const parts: Buffer[] = [u32(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)];
  const exportName = rng.pick(['fuzz', 'fuzz', 'fuzz@snap', 'nope', '']);
  const extended = rng.chance(0.2);
  for (let i = rng.int(0, 3); i > 0; i--)
    parts.push(option(rng.pick([OPT.LIST, OPT.INFO, 99, OPT.STARTTLS]), rng.chance(0.5) ? named(exportName, [u16(0)]) : Buffer.alloc(0)));
  if (extended) parts.push(option(OPT.EXTENDED_HEADERS));
  else if (rng.chance(0.7)) parts.push(option(OPT.STRUCTURED_REPLY));
  if (rng.chance(0.6)) parts.push(option(OPT.SET_META_CONTEXT, named(exportName, [u32(1), u32(15), Buffer.from('base:allocation')])));
  if (rng.chance(0.15)) {
    parts.push(option(OPT.EXPORT_NAME, Buffer.from(exportName)));
  } else {
    parts.push(option(OPT.GO, named(exportName, [u16(1), u16(3)])));
  }
  for (let i = rng.int(0, 12); i > 0; i--) {
    const type = rng.pick([CMD.READ, CMD.WRITE, CMD.WRITE, CMD.FLUSH, CMD.TRIM, CMD.CACHE, CMD.WRITE_ZEROES, CMD.BLOCK_STATUS, CMD.DISC, 9]);
    const flags = rng.chance(0.8)
      ? 0
      : rng.pick([CMD_FLAG.FUA, CMD_FLAG.NO_HOLE, CMD_FLAG.DF, CMD_FLAG.REQ_ONE, CMD_FLAG.FAST_ZERO, CMD_FLAG.PAYLOAD_LEN, 0xffff]);
    const offset = rng.int(0, volumeBytes / 512) * 512;
    const length = rng.int(1, 64) * 512;
    if (extended) {
      const header = Buffer.alloc(32);
      header.writeUInt32BE(0x21e41c71, 0);
      header.writeUInt16BE(type === CMD.WRITE ? flags | CMD_FLAG.PAYLOAD_LEN : flags, 4);
      header.writeUInt16BE(type, 6);
      header.writeUInt32BE(i, 12);
      header.writeBigUInt64BE(BigInt(offset), 16);
      header.writeBigUInt64BE(BigInt(length), 24);
      parts.push(header);
    } else {
      parts.push(request(type, flags, i, offset, length));
    }
    if (type === CMD.WRITE) parts.push(rng.bytes(length));
  }
  return Buffer.concat(parts);
}

const edgeValues = [0, 1, 0x7f, 0x80, 0xff, 0x7fffffff, 0x80000000, 0xffffffff, volumeBytes, volumeBytes - 1, 32 * MiB + 1];

function mutate(rng: Random, data: Buffer): Buffer {
  let out = Buffer.from(data);
  for (let n = rng.int(1, 4); n > 0; n--) {
    if (out.length === 0) break;
    const at = rng.int(0, out.length - 1);
    switch (rng.int(0, 5)) {
      case 0:
        out[at] ^= 1 << rng.int(0, 7);
        break;
      case 1:
        out[at] = rng.int(0, 255);
        break;
      case 2:
        if (at + 4 <= out.length) out.writeUInt32BE(rng.pick(edgeValues) >>> 0, at);
        break;
      case 3:
        out = out.subarray(0, at);
        break;
      case 4:
        out = Buffer.concat([out.subarray(0, at), out.subarray(at, Math.min(out.length, at + rng.int(1, 64))), out.subarray(at)]);
        break;
      case 5:
        out = Buffer.concat([out.subarray(0, at), rng.bytes(rng.int(1, 32)), out.subarray(at)]);
        break;
    }
  }
  return out;
}

/** Sends one session's bytes (in a few pieces), reads whatever comes back, and hangs up. */
function play(socketPath: string, bytes: Buffer, rng: Random): Promise<void> {
  return new Promise((resolve) => {
    const socket = net.connect(socketPath);
    socket.on('data', () => {});
    socket.on('error', () => {});
    socket.on('close', () => resolve());
    const pieces = rng.int(1, 3);
    const cut = Array.from({ length: pieces - 1 }, () => rng.int(0, bytes.length)).sort((a, b) => a - b);
    const chunks = [0, ...cut, bytes.length].slice(1).map((end, i, ends) => bytes.subarray(i === 0 ? 0 : ends[i - 1], end));
    socket.once(
      'connect',
      () =>
        void (async () => {
          for (const chunk of chunks) {
            if (socket.destroyed) break;
            socket.write(chunk);
            await new Promise((r) => setImmediate(r));
          }
          setTimeout(() => (rng.chance(0.5) ? socket.end() : socket.destroy()), rng.int(0, 20));
          setTimeout(() => socket.destroy(), 2000).unref();
        })(),
    );
  });
}

describe('NBD fuzz: random and mutated input never crashes the server or corrupts data', function () {
  this.timeout(600_000);
  const suite = serverForSuite();

  it(`survives ${sessions} fuzzed sessions (seed ${seed})`, async () => {
    const rng = new Random(seed);
    await suite.server.cliOk('volume', 'create', 'fuzz', '--size', '16MiB', '--extent-size', '4KiB');
    await suite.server.cliOk('volume', 'create', 'witness-volume', '--size', '16MiB');
    const setup = await NbdClient.connect({ socketPath: suite.server.nbdSocket, exportName: 'fuzz' });
    const frozen = rng.bytes(volumeBytes);
    await setup.write(0, frozen);
    await setup.disconnect();
    await suite.server.cliOk('snapshot', 'create', 'fuzz@snap');

    const witness = await NbdClient.connect({ socketPath: suite.server.nbdSocket, exportName: 'witness-volume' });
    const expected = Buffer.alloc(volumeBytes);
    let witnessRounds = 0;
    let fuzzing = true;
    const witnessLoop = (async () => {
      while (fuzzing) {
        const offset = rng.int(0, volumeBytes / 4096 - 16) * 4096;
        const data = rng.bytes(rng.int(1, 16) * 4096);
        await witness.write(offset, data);
        data.copy(expected, offset);
        const back = await witness.read(offset, data.length);
        assert.ok(back.equals(data), 'the witness reads back what it wrote while the fuzzer runs');
        witnessRounds++;
        await new Promise((r) => setTimeout(r, 5));
      }
    })();

    const corpus = Array.from({ length: 64 }, () => validSession(rng));
    const concurrency = 24;
    let next = 0;
    const kinds = { random: 0, mutated: 0, valid: 0 };
    await Promise.all(
      Array.from({ length: concurrency }, async () => {
        while (next < sessions) {
          next++;
          const roll = rng.next();
          let bytes: Buffer;
          if (roll < 0.15) {
            bytes = rng.bytes(rng.int(0, 2048));
            kinds.random++;
          } else if (roll < 0.85) {
            bytes = mutate(rng, rng.chance(0.5) ? rng.pick(corpus) : validSession(rng));
            kinds.mutated++;
          } else {
            bytes = validSession(rng);
            kinds.valid++;
          }
          await play(suite.server.nbdSocket, bytes, rng);
        }
      }),
    );
    fuzzing = false;
    await witnessLoop;

    assert.ok(fs.existsSync(`/proc/${suite.server.pid}`), 'the server is alive');
    assert.ok((await witness.read(0, volumeBytes)).equals(expected), 'the witness volume holds exactly what the witness wrote');
    await witness.disconnect();
    const check = await NbdClient.connect({ socketPath: suite.server.nbdSocket, exportName: 'fuzz@snap' });
    assert.ok((await check.read(0, volumeBytes)).equals(frozen), 'the snapshot is byte-identical to what it was');
    await check.disconnect();
    assert.doesNotMatch(suite.server.log(), /unexpected error|uncaught|"level":"error"/i, 'nothing went wrong inside the server');
    assert.equal(await suite.server.stop(), 0, 'and it still stops cleanly');
    console.log(`      seed ${seed}: ${JSON.stringify(kinds)}, witness rounds ${witnessRounds}`);
  });
});
