import fs from 'node:fs';
import { formatRef } from '../../store/names';
import { Progress } from '../../lib/progress';
import { formatSize } from '../../lib/units';
import { SnapshotRecord } from '../../store/records';
import { CommandSpec, UsageError } from '../args';
import { CliContext } from '../context';
import { json, table } from '../output';
import { parseRef, parseSnapshotRef, snapshotOf } from '../refs';
import { receiveSnapshot } from '../stream/receive';
import { sendSnapshot } from '../stream/send';

/** The stable JSON form of a snapshot (documented in the README). */
export function snapshotJson(s: SnapshotRecord): Record<string, unknown> {
  return {
    id: s.id,
    name: s.name,
    volumeId: s.volumeId,
    volume: s.volumeName,
    sizeBytes: s.sizeBytes,
    extentSizeBytes: s.extentSizeBytes,
    createdAt: s.createdAt,
  };
}

export const snapshotCommands: CommandSpec<CliContext>[] = [
  {
    path: ['snapshot', 'create'],
    positionals: ['NAME@SNAP'],
    options: {},
    summary: 'Take a point-in-time snapshot of a volume (O(1), whatever the size). Snapshot names are unique in the store.',
    async run(ctx, { positionals: [text] }) {
      const ref = parseSnapshotRef(text, 'snapshot');
      const s = await ctx.withSession(({ api }) => api.createSnapshot({ name: ref.volume }, ref.snapshot, 'volume'));
      ctx.stdout.write(`snapshot ${s.volumeName}@${s.name} (${s.id}): ${formatSize(s.sizeBytes)}\n`);
    },
  },
  {
    path: ['snapshot', 'list'],
    positionals: ['NAME?'],
    options: { json: { type: 'boolean', description: 'print JSON' } },
    summary: 'List snapshots, of every volume or of one.',
    async run(ctx, { positionals: [name], values }) {
      const snapshots = await ctx.withSession(async ({ api: store }) => {
        if (name === undefined) return store.listSnapshots();
        const volume = await store.findVolume({ name });
        return store.listSnapshots(volume ? { id: volume.id } : { name });
      });
      if (values.json) {
        ctx.stdout.write(json(snapshots.map(snapshotJson)));
        return;
      }
      ctx.stdout.write(
        table(
          ['SNAPSHOT', 'SIZE', 'CREATED'],
          snapshots.map((s) => [formatRef(s.volumeName, s.name), formatSize(s.sizeBytes), s.createdAt]),
        ),
      );
    },
  },
  {
    path: ['snapshot', 'diff'],
    positionals: ['NAME@FROM', 'NAME@TO'],
    options: { json: { type: 'boolean', description: 'print JSON' } },
    summary:
      'The byte ranges whose contents differ between two snapshots of one lineage (of one volume, or of a clone and its source); the work follows what changed, not the size.',
    async run(ctx, { positionals: [fromText, toText], values }) {
      const [fromRef, toRef] = [parseSnapshotRef(fromText, 'snapshot'), parseSnapshotRef(toText, 'snapshot')];
      const { from, to, ranges } = await ctx.withSession(async ({ api }) => {
        const [from, to] = [await snapshotOf(api, fromRef), await snapshotOf(api, toRef)];
        return { from, to, ranges: await api.diffSnapshots({ id: from.id }, { id: to.id }) };
      });
      const changedBytes = ranges.reduce((sum, r) => sum + r.length, 0);
      if (values.json) {
        ctx.stdout.write(
          json({ from: formatRef(from.volumeName, from.name), to: formatRef(to.volumeName, to.name), sizeBytes: to.sizeBytes, changedBytes, ranges }),
        );
        return;
      }
      if (ranges.length)
        ctx.stdout.write(
          table(
            ['OFFSET', 'LENGTH'],
            ranges.map((r) => [String(r.offset), String(r.length)]),
          ),
        );
      ctx.stdout.write(`${ranges.length} ranges, ${formatSize(changedBytes)} (${changedBytes} bytes) differ of ${formatSize(to.sizeBytes)}\n`);
    },
  },
  {
    path: ['snapshot', 'send'],
    positionals: ['NAME@SNAP'],
    options: {
      from: { type: 'string', value: 'NAME@BASE', description: 'send only what changed since this snapshot (the receiver must hold it)' },
      output: { type: 'string', short: 'o', value: 'FILE', description: "where to write the stream (default '-': standard output)" },
    },
    summary: 'Write a snapshot as a stream for `snapshot receive`: all it holds, or with --from only what changed since a base; ends with a SHA-256 digest.',
    async run(ctx, { positionals: [text], values }) {
      const ref = parseSnapshotRef(text, 'snapshot');
      const baseRef = typeof values.from === 'string' ? parseSnapshotRef(values.from, '--from') : undefined;
      const file = typeof values.output === 'string' ? values.output : '-';
      if (file === '-' && (ctx.stdout as NodeJS.WriteStream).isTTY) {
        throw new UsageError('the stream is binary: redirect standard output to a file or a pipe, or write it with -o FILE');
      }
      await ctx.withSession(async (session) => {
        const snapshot = await snapshotOf(session.api, ref);
        const base = baseRef && (await snapshotOf(session.api, baseRef));
        const fd = file === '-' ? undefined : fs.openSync(file, 'w', 0o644);
        const output = fd === undefined ? ctx.stdout : fs.createWriteStream('', { fd, autoClose: false });
        try {
          const sent = await sendSnapshot(session, snapshot, base, output, (covered) => new Progress(ctx.stderr, `sending ${text}`, covered));
          if (fd !== undefined) await endDurably(output as fs.WriteStream, fd);
          const what = `${base ? `changes of ${text} since @${base.name}` : text}: ${sent.records} records, ${formatSize(sent.dataBytes)} of data, ${formatSize(sent.streamBytes)} in all`;
          (file === '-' ? ctx.stderr : ctx.stdout).write(`sent ${what}${file === '-' ? '' : ` to ${file}`}\n`);
        } catch (err) {
          if (fd !== undefined) {
            (output as fs.WriteStream).destroy();
            fs.closeSync(fd);
            fs.rmSync(file, { force: true });
          }
          throw err;
        }
      });
    },
  },
  {
    path: ['snapshot', 'receive'],
    positionals: ['NAME[@SNAP]'],
    options: {
      input: { type: 'string', short: 'i', value: 'FILE', description: "the stream to read (default '-': standard input)" },
      force: { type: 'boolean', description: "discard what was written to the volume after the stream's base" },
    },
    summary:
      'Apply a stream from `snapshot send` as snapshot NAME@SNAP (default: its sent name); a full stream makes volume NAME, an incremental one needs its base there. Nothing appears unless the whole stream applied and its digest matched.',
    async run(ctx, { positionals: [text], values }) {
      const ref = parseRef(text, 'target');
      const file = typeof values.input === 'string' ? values.input : '-';
      const input = file === '-' ? (ctx.stdin as AsyncIterable<Buffer>) : fs.createReadStream(file, { highWaterMark: 1024 * 1024 });
      const received = await ctx.withSession((session) =>
        receiveSnapshot(session, input, { volume: ref.volume, snapshot: ref.snapshot, force: values.force === true }, (header) => {
          return new Progress(ctx.stderr, `receiving ${ref.volume}@${ref.snapshot ?? header.snapshot}`, header.coveredBytes);
        }),
      );
      const s = received.snapshot;
      const kind = received.header.base ? `incremental from @${received.header.base.name}` : 'full';
      ctx.stdout.write(`received ${s.volumeName}@${s.name} (${s.id}): ${formatSize(s.sizeBytes)}, ${kind}, ${formatSize(received.streamBytes)} read\n`);
    },
  },
  {
    path: ['snapshot', 'rm'],
    positionals: ['NAME@SNAP'],
    options: {},
    summary: 'Delete a snapshot; blocks only it held are reclaimed by the next gc.',
    async run(ctx, { positionals: [text] }) {
      const ref = parseSnapshotRef(text, 'snapshot');
      await ctx.withSession(async ({ api: store }) => store.deleteSnapshot({ id: (await snapshotOf(store, ref)).id }));
      ctx.stdout.write(`snapshot ${text} deleted\n`);
    },
  },
];

/** Ends the file stream and syncs it: the stream may be a backup, so it is durable before we say it was sent. */
function endDurably(stream: fs.WriteStream, fd: number): Promise<void> {
  return new Promise((resolve, reject) => {
    stream.once('error', reject);
    stream.end(() => {
      try {
        fs.fsyncSync(fd);
        fs.closeSync(fd);
        resolve();
      } catch (err) {
        reject(err);
      }
    });
  });
}
