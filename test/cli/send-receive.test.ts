import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { NbdClient } from '../../node-plugin/nbd/client';
import { openDataDir } from '../../store/embedded';
import { ArborServer, cliPath, startServer } from '../support/arbor-server';
import { Random } from '../support/random';
import { run, RunResult } from '../support/run';
import { localSession, sendToBuffer, sha256, stateOfDataDir, StoreState, streamLayout } from '../support/snapshot-stream';
import { memoryTempDir } from '../support/tmp';

const KiB = 1024;
const MiB = 1024 * KiB;

/** `arbor --data-dir DIR ARGS`, with `input` on its standard input. */
function arbor(dataDir: string, args: string[], input?: Buffer): Promise<RunResult> {
  return run(process.execPath, [cliPath, '--data-dir', dataDir, ...args], { input });
}

async function arborOk(dataDir: string, args: string[], input?: Buffer): Promise<string> {
  const result = await arbor(dataDir, args, input);
  assert.equal(result.status, 0, `arbor ${args.join(' ')} failed: ${result.stderr}`);
  return result.stdout;
}

/** `send ... | receive ...` between two arbor processes, through a pipe. */
async function pipeThrough(sendArgs: string[], receiveArgs: string[]): Promise<{ send: RunResult; receive: RunResult }> {
  const collect = (child: ReturnType<typeof spawn>, streams: Array<'stdout' | 'stderr'>) => {
    const out: Record<string, string> = { stdout: '', stderr: '' };
    for (const name of streams) child[name]!.on('data', (d: Buffer) => (out[name] += d.toString()));
    return new Promise<RunResult>((resolve) => child.on('close', (status) => resolve({ status, stdout: out.stdout, stderr: out.stderr })));
  };
  const sender = spawn(process.execPath, [cliPath, ...sendArgs], { stdio: ['ignore', 'pipe', 'pipe'] });
  const receiver = spawn(process.execPath, [cliPath, ...receiveArgs], { stdio: ['pipe', 'pipe', 'pipe'] });
  receiver.stdin.on('error', () => {}); // EPIPE when the receive fails early
  sender.stdout.pipe(receiver.stdin);
  const [send, receive] = await Promise.all([collect(sender, ['stderr']), collect(receiver, ['stdout', 'stderr'])]);
  return { send, receive };
}

/**
 * Starts `arbor ARGS` reading a stream from a pipe fed 256 KiB at a time (each piece
 * handed to the pipe only once the last was taken), and SIGKILLs it once it has
 * taken `fraction` of the stream: its records up to there were read and applied.
 */
async function killMidway(args: string[], stream: Buffer, fraction: number): Promise<void> {
  const child = spawn(process.execPath, [cliPath, ...args], { stdio: ['pipe', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  child.stdin.on('error', () => {}); // EPIPE once it is killed
  const exited = new Promise<NodeJS.Signals | null>((resolve) => child.once('exit', (_code, signal) => resolve(signal)));
  const stop = Math.floor(stream.length * fraction);
  for (let at = 0; at < stop; at += 256 * KiB) {
    await new Promise<void>((resolve, reject) =>
      child.stdin.write(stream.subarray(at, Math.min(at + 256 * KiB, stop)), (err) => (err ? reject(err) : resolve())),
    );
    assert.equal(child.exitCode, null, `the receive ended before it was killed: ${stderr}`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
  child.kill('SIGKILL');
  assert.equal(await exited, 'SIGKILL', `the receive was killed midway (${stderr})`);
}

describe('arbor snapshot send and receive', function () {
  this.timeout(120_000);
  let temp: { dir: string; cleanup: () => void };
  /** The source store (held by no process between tests) and the digests of its snapshots. */
  let source: string;
  const sent: Record<string, string> = {};
  /** Streams from the source: v@s1 in full, v@s1 -> v@s2 and v@s2 -> v@s3 incremental. */
  const streams: Record<'full1' | 'inc12' | 'inc23', Buffer> = {} as never;
  const file = (name: string) => path.join(temp.dir, name);
  const dataDir = (name: string) => path.join(temp.dir, name);

  before(async () => {
    temp = memoryTempDir();
    source = dataDir('source');
    const store = await openDataDir(source);
    try {
      const random = new Random(14);
      await store.createVolume('v', { sizeBytes: 8 * MiB });
      const v = await store.openVolume({ name: 'v' });
      await v.write(0, random.bytes(6 * MiB));
      await v.writeZeroes(MiB, MiB, { noHole: true, fua: false, fast: false });
      await store.createSnapshot({ name: 'v' }, 's1');
      await v.write(2 * MiB + 4321, random.bytes(MiB));
      await v.trim(5 * MiB, 512 * KiB);
      await store.createSnapshot({ name: 'v' }, 's2');
      await v.write(7 * MiB, random.bytes(256 * KiB));
      await v.write(100, random.bytes(1000));
      await store.createSnapshot({ name: 'v' }, 's3');
      const session = localSession(store);
      streams.full1 = (await sendToBuffer(session, 's1')).stream;
      streams.inc12 = (await sendToBuffer(session, 's2', 's1')).stream;
      streams.inc23 = (await sendToBuffer(session, 's3', 's2')).stream;
    } finally {
      await store.close();
    }
    Object.assign(sent, (await stateOfDataDir(source)).images);
    for (const [name, stream] of Object.entries(streams)) fs.writeFileSync(file(name), stream);
  });
  after(() => temp.cleanup());

  describe('between two data directories', () => {
    let b = '';
    before(() => (b = dataDir('b')));

    it('the CLI writes the same stream to a file as the send code does in memory, and a full stream makes the volume and its snapshot', async () => {
      assert.match(
        await arborOk(source, ['snapshot', 'send', 'v@s1', '-o', file('cli-full1')]),
        /^sent v@s1: \d+ records, 5 MiB of data, [\d.]+ MiB in all to /,
      );
      const fromCli = fs.readFileSync(file('cli-full1'));
      assert.ok(fromCli.subarray(0, 16).equals(streams.full1.subarray(0, 16)));
      assert.equal(fromCli.length, streams.full1.length);
      assert.match(await arborOk(b, ['snapshot', 'receive', 'v', '-i', file('full1')]), /^received v@s1 \(snap-[0-9a-f]+\): 8 MiB, full, [\d.]+ MiB read\n$/);
      const state = await stateOfDataDir(b);
      assert.equal(state.images['v@s1'], sent['v@s1']);
      assert.equal(state.images.v, sent['v@s1'], 'the volume reads as its received snapshot');
      assert.deepEqual(state.hidden, []);
    });

    it('an incremental stream through a pipe from send to receive carries only what changed and reproduces the snapshot', async () => {
      const { send, receive } = await pipeThrough(
        ['--data-dir', source, 'snapshot', 'send', 'v@s2', '--from', 'v@s1'],
        ['--data-dir', b, 'snapshot', 'receive', 'v'],
      );
      assert.equal(send.status, 0, send.stderr);
      assert.match(send.stderr, /^sent changes of v@s2 since @s1: \d+ records, 1.\d+ MiB of data/);
      assert.equal(receive.status, 0, receive.stderr);
      assert.match(receive.stdout, /^received v@s2 \(snap-[0-9a-f]+\): 8 MiB, incremental from @s1, 1.\d+ MiB read\n$/);
      const state = await stateOfDataDir(b);
      assert.equal(state.images['v@s2'], sent['v@s2']);
      assert.equal(state.images['v@s1'], sent['v@s1']);
      assert.equal(state.images.v, sent['v@s2']);
      assert.deepEqual(
        state.snapshots.map((s) => s.name),
        ['s1', 's2'],
      );
    });

    /** Receives `stream` into `into` expecting a refusal that matches `message`, and checks nothing there changed. */
    const refused = async (into: string, stream: Buffer, message: RegExp, args: string[] = []): Promise<StoreState> => {
      const before = await stateOfDataDir(into);
      // From a file: a receive refused before the stream's end stops reading its standard input.
      fs.writeFileSync(file('refused'), stream);
      const result = await arbor(into, ['snapshot', 'receive', 'v', '-i', file('refused'), ...args]);
      assert.equal(result.status, 1, `the receive was refused: ${result.stdout}${result.stderr}`);
      assert.match(result.stderr, message);
      assert.deepEqual(await stateOfDataDir(into), before, `nothing changed after: ${result.stderr}`);
      return before;
    };
    const flipped = (stream: Buffer, at: number) => {
      const copy = Buffer.from(stream);
      copy[at] ^= 1;
      return copy;
    };

    it('a corrupted stream is refused naming what is wrong, and changes nothing', async () => {
      const stream = streams.inc23;
      const layout = streamLayout(stream);
      const data = layout.records.find((r) => r.kind === 1)!;
      const createdAt = stream.indexOf('"createdAt":"', layout.headerAt) + 13;
      const digest = /^arbor: not received: the stream is corrupted: its SHA-256 digest does not match its contents \(altered or damaged in transit\)\n$/;
      await refused(b, flipped(stream, data.payloadAt! + Math.floor(data.length / 2)), digest);
      await refused(b, flipped(stream, createdAt + 3), digest);
      await refused(b, flipped(stream, layout.digestAt + 31), digest);
      await refused(b, flipped(stream, layout.headerAt), /^arbor: not received: the stream header is not JSON: the stream is corrupted\n$/);
      await refused(b, flipped(stream, 0), /^arbor: not received: the input is not an Arbor snapshot stream \(it does not start with ARBORSNP\)\n$/);
      const kind = Buffer.from(stream);
      kind[data.at] = 9;
      await refused(b, kind, new RegExp(`^arbor: not received: unknown record kind 9 at byte ${data.at}: the stream is corrupted\\n$`));
    });

    it('a stream of an unknown version, or with bytes after its end, is refused', async () => {
      const v2 = Buffer.from(streams.inc23);
      v2.writeUInt32BE(2, 8);
      await refused(b, v2, /^arbor: not received: the stream has version 2; this arbor reads version 1\n$/);
      for (const garbage of [Buffer.from([0]), Buffer.alloc(100, 7), streams.inc23]) {
        await refused(
          b,
          Buffer.concat([streams.inc23, garbage]),
          new RegExp(`^arbor: not received: bytes follow the end of the stream at byte ${streams.inc23.length}; send one stream per receive\\n$`),
        );
      }
    });

    it('a truncated stream is refused wherever it was cut, and changes nothing', async () => {
      const stream = streams.inc23;
      const layout = streamLayout(stream);
      const data = layout.records.find((r) => r.kind === 1)!;
      const cuts: Array<[string, number, RegExp]> = [
        ['empty', 0, /^arbor: not received: the input ends after 0 bytes, before a stream header \(empty or truncated\)\n$/],
        ['inside the magic', 5, /^arbor: not received: the input ends after 5 bytes, before a stream header \(empty or truncated\)\n$/],
        ['inside the header', layout.headerAt + 10, /^arbor: not received: the stream is truncated inside its header\n$/],
        ['inside a record head', data.at + 8, truncated(data.at + 8)],
        ['inside a data payload', data.payloadAt! + 1000, truncated(data.payloadAt! + 1000)],
        ['before the end record', layout.endAt, truncated(layout.endAt)],
        ['just before the digest', layout.digestAt, truncated(layout.digestAt)],
        ['one byte short', stream.length - 1, truncated(stream.length - 1)],
      ];
      for (const [where, cut, message] of cuts) {
        fs.writeFileSync(file('cut'), stream.subarray(0, cut));
        const before = await stateOfDataDir(b);
        const result = await arbor(b, ['snapshot', 'receive', 'v', '-i', file('cut')]);
        assert.equal(result.status, 1, `cut ${where}: ${result.stdout}`);
        assert.match(result.stderr, message, `cut ${where}`);
        assert.deepEqual(await stateOfDataDir(b), before, `cut ${where}: nothing changed`);
      }
      function truncated(at: number): RegExp {
        return new RegExp(`^arbor: not received: the stream is truncated: it ends after ${at} bytes, before its trailer \\(\\d+ records read\\)\\n$`);
      }
    });

    it('an incremental stream is refused by a store without its base, and by one whose snapshot of that name is another', async () => {
      const empty = dataDir('empty');
      await refused(empty, streams.inc23, /^arbor: volume v does not exist; this stream is incremental from @s2: receive the full stream first\n$/);

      const onlyS1 = dataDir('only-s1');
      await arborOk(onlyS1, ['snapshot', 'receive', 'v', '-i', file('full1')]);
      const origin = (await stateOfDataDir(b)).snapshots.find((s) => s.name === 's2')!;
      assert.ok(origin);
      await refused(
        onlyS1,
        streams.inc23,
        /^arbor: the stream's base s2 \(origin snap-[0-9a-f]+\) is not a snapshot of volume v here; receive it first, or send from a snapshot both stores share\n$/,
      );

      // A store of its own whose v@s2 holds other data: same names, another snapshot.
      const other = dataDir('other');
      const store = await openDataDir(other);
      try {
        await store.createVolume('v', { sizeBytes: 8 * MiB });
        await (await store.openVolume({ name: 'v' })).write(0, new Random(2).bytes(MiB));
        await store.createSnapshot({ name: 'v' }, 's2');
      } finally {
        await store.close();
      }
      const here = (await stateOfDataDir(other)).snapshots[0].id;
      await refused(
        other,
        streams.inc23,
        new RegExp(
          `^arbor: the stream's base s2 is not the snapshot v@s2 here \\(origin snap-[0-9a-f]+, here ${here}\\): they hold different data; send from a snapshot both stores share\\n$`,
        ),
      );
    });

    it('a replayed stream is refused: the same incremental twice, the same full twice; into another volume it is a new snapshot of that volume', async () => {
      await refused(b, streams.inc12, /^arbor: snapshot v@s2 was already received \(this stream was applied before\); nothing changed\n$/);
      await refused(b, streams.full1, /^arbor: snapshot v@s1 was already received \(this stream was applied before\); nothing changed\n$/);
      // Snapshot names are per volume: w@s1 and v@s1 both exist.
      const result = await arbor(b, ['snapshot', 'receive', 'w', '-i', file('full1')]);
      assert.equal(result.status, 0, result.stderr);
      await refused(b, streams.full1, /^arbor: snapshot v@s1 was already received \(this stream was applied before\); nothing changed\n$/);
      const again = await arbor(b, ['snapshot', 'receive', 'w', '-i', file('full1')]);
      assert.equal(again.status, 1);
      assert.match(again.stderr, /^arbor: snapshot w@s1 was already received/);
      assert.equal((await arbor(b, ['snapshot', 'rm', 'w@s1'])).status, 0);
      assert.equal((await arbor(b, ['volume', 'rm', 'w'])).status, 0);
    });

    it('a volume written after the base refuses the stream; --force receives it and discards those writes', async () => {
      const store = await openDataDir(b);
      try {
        const handle = await store.acquireVolume({ name: 'v' });
        await handle.volume.write(3 * MiB, Buffer.alloc(64 * KiB, 0xaa));
        await handle.release();
      } finally {
        await store.close();
      }
      const before = await refused(
        b,
        streams.inc23,
        /^arbor: volume v was written after @s2; receiving would discard those writes: snapshot them first, or receive with --force to discard them\n$/,
      );
      assert.notEqual(before.images.v, sent['v@s2'], 'the volume holds the writes made after s2');
      assert.match(await arborOk(b, ['snapshot', 'receive', 'v', '--force'], streams.inc23), /^received v@s3 .*, incremental from @s2/);
      const state = await stateOfDataDir(b);
      assert.equal(state.images['v@s3'], sent['v@s3']);
      assert.equal(state.images.v, sent['v@s3'], 'the writes after s2 are gone');
      assert.deepEqual(state.hidden, []);
    });
  });

  describe('SIGKILL of receive leaves no snapshot, and a new receive of the same stream succeeds', () => {
    /** A 40 MiB volume sent in full (k1) and then 24 MiB of it changed (k2). */
    const big: { full: Buffer; inc: Buffer; images: Record<string, string> } = {} as never;
    before(async () => {
      const dir = dataDir('big-source');
      const store = await openDataDir(dir);
      try {
        const random = new Random(1414);
        await store.createVolume('k', { sizeBytes: 48 * MiB });
        const k = await store.openVolume({ name: 'k' });
        await k.write(0, random.bytes(40 * MiB));
        await store.createSnapshot({ name: 'k' }, 'k1');
        await k.write(8 * MiB, random.bytes(24 * MiB));
        await store.createSnapshot({ name: 'k' }, 'k2');
        const session = localSession(store);
        big.full = (await sendToBuffer(session, 'k1')).stream;
        big.inc = (await sendToBuffer(session, 'k2', 'k1')).stream;
      } finally {
        await store.close();
      }
      big.images = (await stateOfDataDir(dir)).images;
      fs.writeFileSync(file('big-full'), big.full);
      fs.writeFileSync(file('big-inc'), big.inc);
    });

    it('with the store opened by the CLI', async () => {
      const into = dataDir('killed');
      await arborOk(into, ['volume', 'list']);
      await killMidway(['--data-dir', into, 'snapshot', 'receive', 'k'], big.full, 0.6);
      let state = await stateOfDataDir(into);
      assert.deepEqual([state.volumes, state.snapshots], [[], []], 'no volume and no snapshot after the killed full receive');
      assert.equal(state.hidden.length, 1, 'the killed receive had made its staging volume');
      await arborOk(into, ['snapshot', 'receive', 'k', '-i', file('big-full')]);
      state = await stateOfDataDir(into);
      assert.deepEqual(state.hidden, [], 'the new receive removed the abandoned staging volume');
      assert.equal(state.images['k@k1'], big.images['k@k1']);

      await killMidway(['--data-dir', into, 'snapshot', 'receive', 'k'], big.inc, 0.6);
      state = await stateOfDataDir(into);
      assert.deepEqual(
        state.snapshots.map((s) => s.name),
        ['k1'],
        'no snapshot after the killed incremental receive',
      );
      assert.equal(state.images.k, big.images['k@k1'], 'the target volume is unchanged');
      assert.equal(state.hidden.length, 1);
      await arborOk(into, ['snapshot', 'receive', 'k', '-i', file('big-inc')]);
      state = await stateOfDataDir(into);
      assert.deepEqual(state.hidden, []);
      assert.equal(state.images['k@k2'], big.images['k@k2']);
      assert.equal(state.images.k, big.images['k@k2']);
    });

    it('through a running arbor serve (its admin and NBD sockets)', async () => {
      const server = await startServer(dataDir('killed-serve'));
      try {
        const exported = async (name: string) => {
          await server.cliOk('volume', 'export', name, file('exported'));
          return sha256(fs.readFileSync(file('exported')));
        };
        await killMidway(['--data-dir', server.dataDir, 'snapshot', 'receive', 'k'], big.full, 0.6);
        assert.equal((await server.cliOk('volume', 'list', '--json')).trim(), '[]');
        assert.equal((await server.cliOk('snapshot', 'list', '--json')).trim(), '[]');
        await server.cliOk('snapshot', 'receive', 'k', '-i', file('big-full'));
        assert.equal(await exported('k@k1'), big.images['k@k1']);

        await killMidway(['--data-dir', server.dataDir, 'snapshot', 'receive', 'k'], big.inc, 0.6);
        assert.deepEqual(
          JSON.parse(await server.cliOk('snapshot', 'list', '--json')).map((s: { name: string }) => s.name),
          ['k1'],
        );
        // Read through the server's NBD socket: the server keeps k open afterwards, which must not stop the next receive.
        assert.equal(await exported('k'), big.images['k@k1'], 'the target volume is unchanged');
        await server.cliOk('snapshot', 'receive', 'k', '-i', file('big-inc'));
        assert.equal(await exported('k@k2'), big.images['k@k2']);
        assert.equal(await exported('k'), big.images['k@k2']);
      } finally {
        assert.equal(await server.stop(), 0, 'arbor serve stops cleanly');
      }
      const state = await stateOfDataDir(server.dataDir);
      assert.deepEqual(state.hidden, [], 'the new receives removed the abandoned staging volumes');
      assert.equal(state.images['k@k1'], big.images['k@k1']);
      assert.equal(state.images['k@k2'], big.images['k@k2']);
    });
  });

  describe('through a running arbor serve on each side', () => {
    let a: ArborServer;
    let b: ArborServer;
    let images: Record<string, string>;
    before(async () => {
      // The source's volume is written here before its server starts (each CLI command costs a process start).
      const sourceDir = path.join(dataDir('serve-a'), 'data');
      const store = await openDataDir(sourceDir);
      try {
        const random = new Random(4);
        await store.createVolume('t', { sizeBytes: 16 * MiB, extentSizeBytes: 4 * KiB });
        const t = await store.openVolume({ name: 't' });
        const image = random.bytes(10 * MiB);
        image.fill(0, 3 * MiB, 5 * MiB);
        await t.write(0, image);
        await t.trim(3 * MiB, 2 * MiB);
        await store.createSnapshot({ name: 't' }, 't1');
        await t.write(0, random.bytes(3 * MiB + 512));
        await store.resizeVolume({ name: 't' }, 20 * MiB);
        await store.createSnapshot({ name: 't' }, 't2');
        await t.write(0, image.subarray(0, 3 * MiB));
        await t.write(18 * MiB, random.bytes(MiB));
        await store.createSnapshot({ name: 't' }, 't3');
      } finally {
        await store.close();
      }
      images = (await stateOfDataDir(sourceDir)).images;
      a = await startServer(dataDir('serve-a'));
      b = await startServer(dataDir('serve-b'));
    });
    after(async () => {
      for (const server of [a, b]) if (server) assert.equal(await server.stop(), 0, 'arbor serve stops cleanly');
    });

    it('sends and receives the same as on data directories, and refuses a volume open for I/O', async () => {
      assert.match(await a.cliOk('snapshot', 'send', 't@t1', '-o', file('t1')), /^sent t@t1: \d+ records, 8 MiB of data/);
      assert.match(await b.cliOk('snapshot', 'receive', 't', '-i', file('t1')), /^received t@t1 .*: 16 MiB, full/);
      const { send, receive } = await pipeThrough(
        ['--data-dir', a.dataDir, 'snapshot', 'send', 't@t2', '--from', 't@t1'],
        ['--data-dir', b.dataDir, 'snapshot', 'receive', 't'],
      );
      assert.equal(send.status, 0, send.stderr);
      assert.equal(receive.status, 0, receive.stderr);
      assert.match(receive.stdout, /^received t@t2 .*: 20 MiB, incremental from @t1, 3(\.\d+)? MiB read\n$/);

      // While an NBD client has t open on b's server, t is in use.
      await a.cliOk('snapshot', 'send', 't@t3', '--from', 't@t2', '-o', file('t23'));
      const client = await NbdClient.connect({ socketPath: b.nbdSocket, exportName: 't' });
      try {
        const busy = await b.cli('snapshot', 'receive', 't', '-i', file('t23'));
        assert.equal(busy.status, 1);
        assert.match(busy.stderr, /^arbor: volume t is in use \(open for I\/O\); stop its users before receiving into it\n$/);
      } finally {
        await client.disconnect();
      }
      assert.match(await b.cliOk('snapshot', 'receive', 't', '-i', file('t23')), /^received t@t3 .*, incremental from @t2/);

      for (const name of ['t@t1', 't@t2', 't@t3', 't']) {
        await b.cliOk('volume', 'export', name, file('from-b'));
        assert.equal(sha256(fs.readFileSync(file('from-b'))), images[name === 't' ? 't@t3' : name], `${name} reads on b's server as on a's`);
      }
      assert.equal(JSON.parse(await a.cliOk('snapshot', 'diff', 't@t1', 't@t2', '--json')).changedBytes, 3 * MiB + 4 * KiB);
    });
  });
});
