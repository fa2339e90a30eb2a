import fs from 'node:fs';
import { formatRef } from '../../store/names';
import { Progress } from '../../lib/progress';
import path from 'node:path';
import { formatSize, parseDuration, parseSize, UnitError } from '../../lib/units';
import { ArborError } from '../../store/errors';
import { LineageStep, VolumeRecord } from '../../store/records';
import { CommandSpec, UsageError } from '../args';
import { CliContext } from '../context';
import { json, table } from '../output';
import { parseRef, snapshotOf } from '../refs';
import { exportToFile, exportToStream, importImage } from '../transfer';
import { MoveReport, RoundReport, defaultMoveOptions, moveVolume } from '../move';
import { MoveRequest, moveOptions } from '../move-request';
import { openSession } from '../session';
import { StoreLocation } from '../../store/open';
import { QosLimits, burstSecondsOf, describeQos, isUnlimited, parseQosParameters } from '../../store/qos';

function size(text: string | boolean | undefined, option: string): number | undefined {
  if (text === undefined) return undefined;
  try {
    return parseSize(String(text), `--${option}`);
  } catch (err) {
    if (err instanceof UnitError) throw new UsageError(err.message);
    throw err;
  }
}

function describeParent(step?: LineageStep): string {
  if (!step) return '-';
  return formatRef(step.volumeName, step.snapshotName);
}

/** The stable JSON form of a volume (documented in the README). */
export function volumeJson(v: VolumeRecord): Record<string, unknown> {
  return {
    id: v.id,
    name: v.name,
    sizeBytes: v.sizeBytes,
    extentSizeBytes: v.extentSizeBytes,
    createdAt: v.createdAt,
    parent: v.lineage[0] ? lineageJson(v.lineage[0]) : null,
  };
}

/** The stable JSON form of a volume's QoS limits: null where there is no limit. */
export function qosJson(limits: QosLimits): Record<string, unknown> {
  return {
    maxIops: limits.maxIops ?? null,
    maxBandwidthBytes: limits.maxBandwidthBytes ?? null,
    burstSeconds: isUnlimited(limits) ? null : burstSecondsOf(limits),
  };
}

function lineageJson(step: LineageStep): Record<string, unknown> {
  return { volumeId: step.volumeId, volume: step.volumeName, snapshotId: step.snapshotId ?? null, snapshot: step.snapshotName ?? null };
}

export const volumeCommands: CommandSpec<CliContext>[] = [
  {
    path: ['volume', 'create'],
    positionals: ['NAME'],
    options: {
      size: { type: 'string', value: 'SIZE', required: true, description: 'logical size, e.g. 10GiB (a multiple of 512 bytes)' },
      'extent-size': { type: 'string', value: 'SIZE', description: 'copy-on-write unit, a power of two from 4KiB to 4MiB (default 64KiB)' },
    },
    summary: 'Create an empty volume (thin: it uses no space until written).',
    async run(ctx, { positionals: [name], values }) {
      const sizeBytes = size(values.size, 'size')!;
      const extentSizeBytes = size(values['extent-size'], 'extent-size');
      const v = await ctx.withSession(({ api }) => api.createVolume(name, { sizeBytes, extentSizeBytes }));
      ctx.stdout.write(`volume ${v.name} (${v.id}): ${formatSize(v.sizeBytes)}, extent size ${formatSize(v.extentSizeBytes)}\n`);
    },
  },
  {
    path: ['volume', 'list'],
    positionals: [],
    options: { json: { type: 'boolean', description: 'print JSON' } },
    summary: 'List volumes.',
    async run(ctx, { values }) {
      const volumes = await ctx.withSession(({ api }) => api.listVolumes());
      if (values.json) {
        ctx.stdout.write(json(volumes.map(volumeJson)));
        return;
      }
      ctx.stdout.write(
        table(
          ['NAME', 'SIZE', 'EXTENT', 'PARENT', 'CREATED'],
          volumes.map((v) => [formatRef(v.name), formatSize(v.sizeBytes), formatSize(v.extentSizeBytes), describeParent(v.lineage[0]), v.createdAt]),
        ),
      );
    },
  },
  {
    path: ['volume', 'info'],
    positionals: ['NAME'],
    options: { json: { type: 'boolean', description: 'print JSON' } },
    summary: 'Show a volume: size, extent size, allocated bytes, parent lineage, snapshots.',
    async run(ctx, { positionals: [name], values }) {
      const { v, usage, snapshots, qos } = await ctx.withSession(async ({ api: store }) => {
        const v = await store.getVolume({ name });
        return {
          v,
          usage: await store.volumeUsage({ id: v.id }),
          snapshots: await store.listSnapshots({ id: v.id }),
          qos: await store.volumeQos({ id: v.id }),
        };
      });
      if (values.json) {
        ctx.stdout.write(
          json({
            ...volumeJson(v),
            allocatedBytes: usage.allocatedBytes,
            exclusiveBytes: usage.exclusiveBytes,
            lineage: v.lineage.map(lineageJson),
            qos: qosJson(qos),
            snapshots: snapshots.map((s) => ({ id: s.id, name: s.name, sizeBytes: s.sizeBytes, createdAt: s.createdAt })),
          }),
        );
        return;
      }
      const lines = [
        `volume ${v.name}`,
        `  id:          ${v.id}`,
        `  size:        ${formatSize(v.sizeBytes)} (${v.sizeBytes} bytes)`,
        `  extent size: ${formatSize(v.extentSizeBytes)}`,
        `  allocated:   ${formatSize(usage.allocatedBytes)} (${formatSize(usage.exclusiveBytes)} its own, the rest shared)`,
        `  created:     ${v.createdAt}`,
        `  lineage:     ${v.lineage.length ? v.lineage.map(describeParent).join(' <- ') : '- (not a clone)'}`,
        `  snapshots:   ${snapshots.length ? snapshots.map((s) => s.name).join(', ') : '-'}`,
        `  qos:         ${describeQos(qos)}`,
      ];
      ctx.stdout.write(lines.join('\n') + '\n');
    },
  },
  {
    path: ['volume', 'qos'],
    positionals: ['NAME'],
    options: {
      'max-iops': { type: 'string', value: 'N', description: 'requests per second (reads, writes, trims, zeroes)' },
      'max-bandwidth': { type: 'string', value: 'SIZE', description: 'bytes per second read and written, e.g. 100MiB' },
      'burst-seconds': { type: 'string', value: 'S', description: 'how far an idle volume may run ahead of its limits (default 0.1)' },
    },
    summary: 'Set the I/O limits of a volume, applied at once to every connection (a limit left out is no limit; none: unlimited).',
    async run(ctx, { positionals: [name], values }) {
      const parameters: Record<string, string> = {};
      if (values['max-iops'] !== undefined) parameters.maxIops = String(values['max-iops']);
      if (values['max-bandwidth'] !== undefined) parameters.maxBandwidth = String(values['max-bandwidth']);
      if (values['burst-seconds'] !== undefined) parameters.burstSeconds = String(values['burst-seconds']);
      const limits = parseQosParameters(parameters);
      const set = await ctx.withSession(({ api }) => api.setVolumeQos({ name }, limits));
      ctx.stdout.write(`volume ${name}: qos ${describeQos(set)}\n`);
    },
  },
  {
    path: ['volume', 'import'],
    positionals: ['NAME', 'FILE'],
    options: {},
    summary: "Copy a raw image (a file, or '-' for standard input) over the start of an existing volume; zero runs become holes.",
    async run(ctx, { positionals: [name, file] }) {
      await ctx.withSession(async (session) => {
        await session.api.getVolume({ name });
        const volume = await session.openImage(formatRef(name));
        let total: number | undefined;
        if (file !== '-') {
          total = fs.statSync(file).size;
          if (total > volume.sizeBytes) {
            throw new ArborError('out-of-range', `${file} is ${total} bytes, larger than volume ${name} (${volume.sizeBytes} bytes); resize the volume first`);
          }
        }
        const input = file === '-' ? (ctx.stdin as AsyncIterable<Buffer>) : fs.createReadStream(file, { highWaterMark: 1024 * 1024 });
        const progress = new Progress(ctx.stderr, `importing into ${name}`, total);
        try {
          await importImage(volume, input, progress);
        } finally {
          await volume.close();
        }
        ctx.stdout.write(`imported ${progress.finish()} into volume ${name}\n`);
      });
    },
  },
  {
    path: ['volume', 'export'],
    positionals: ['NAME[@SNAP]', 'FILE'],
    options: {},
    summary: "Write a whole volume or snapshot as a raw image to FILE (sparse) or '-' (standard output).",
    async run(ctx, { positionals: [source, file] }) {
      const ref = parseRef(source, 'source');
      await ctx.withSession(async (session) => {
        // Look the name up first: the error then says what is wrong and what to do.
        if (ref.snapshot) await snapshotOf(session.api, { volume: ref.volume, snapshot: ref.snapshot });
        else await session.api.getVolume({ name: ref.volume });
        const image = await session.openImage(formatRef(ref.volume, ref.snapshot));
        const progress = new Progress(ctx.stderr, `exporting ${source}`, image.sizeBytes);
        try {
          if (file === '-') {
            const complete = await exportToStream(image, ctx.stdout, progress);
            const summary = progress.finish();
            if (complete) ctx.stderr.write(`exported ${source}: ${summary}\n`);
          } else {
            await exportToFile(image, file, progress);
            ctx.stdout.write(`exported ${source} to ${file}: ${progress.finish()}\n`);
          }
        } finally {
          await image.close();
        }
      });
    },
  },
  {
    path: ['volume', 'clone'],
    positionals: ['SRC[@SNAP]', 'NEWNAME'],
    options: {},
    summary: 'Create a volume sharing every block of a snapshot, or of a volume as it is now (O(1), whatever the size).',
    async run(ctx, { positionals: [source, name] }) {
      const ref = parseRef(source, 'source');
      const v = await ctx.withSession(async ({ api: store }) => {
        if (!ref.snapshot) return store.cloneVolume(name, { volume: { name: ref.volume } });
        const snapshot = await snapshotOf(store, { volume: ref.volume, snapshot: ref.snapshot });
        return store.cloneVolume(name, { snapshot: { id: snapshot.id } });
      });
      ctx.stdout.write(`volume ${v.name} (${v.id}): clone of ${source}, ${formatSize(v.sizeBytes)}\n`);
    },
  },
  {
    path: ['volume', 'resize'],
    positionals: ['NAME'],
    options: { size: { type: 'string', value: 'SIZE', required: true, description: 'the new size; volumes only grow' } },
    summary: 'Grow a volume (shrinking is refused).',
    async run(ctx, { positionals: [name], values }) {
      const sizeBytes = size(values.size, 'size')!;
      const v = await ctx.withSession(({ api }) => api.resizeVolume({ name }, sizeBytes));
      ctx.stdout.write(`volume ${v.name}: ${formatSize(v.sizeBytes)}\n`);
    },
  },
  {
    path: ['volume', 'move'],
    positionals: ['NAME'],
    options: {
      to: { type: 'string', value: 'DIR', description: "the destination's data directory (its cache directory with --to-store)" },
      'to-store': {
        type: 'string',
        value: 'etcd://HOST:PORT[,...]/PREFIX',
        description: 'a distributed destination: its catalog (with --to-blobs; etcd TLS as --etcd-ca etc.)',
      },
      'to-blobs': { type: 'string', value: 's3://BUCKET/PREFIX?endpoint=URL', description: 'a distributed destination: its blobs' },
      'to-nbd-socket': {
        type: 'string',
        value: 'PATH',
        description:
          "the NBD socket of a server of the destination on this host, where the volume's connections go (default: the socket of the server holding --to)",
      },
      'final-round': {
        type: 'string',
        value: 'SIZE',
        description: `pre-copy until a round changes at most this much (default ${formatSize(defaultMoveOptions.finalRoundBytes)})`,
      },
      'max-rounds': { type: 'string', value: 'N', description: `pre-copy rounds at most (default ${defaultMoveOptions.maxRounds})` },
      'max-pause': {
        type: 'string',
        value: 'DURATION',
        description: `longest the last round may hold writes; longer, the move is cancelled (default ${defaultMoveOptions.maxPauseMs / 1000}s)`,
      },
    },
    summary:
      'Move a volume to another store while it is in use: a full copy, then rounds of what changed, then writes held for one short last round while the connections of the server holding it switch to the destination.',
    async run(ctx, { positionals: [name], values }) {
      const request = moveRequest(ctx.location, name, values);
      const report = await ctx.withSession(async (session) => {
        if (session.admin) return session.admin.moveVolume(request);
        // Nothing serves the volume: no connection to switch, this process moves it.
        const destination = await openSession(request.destination, ctx.log);
        try {
          return await moveVolume({ session }, { session: destination, nbdSocket: request.nbdSocket ?? destination.nbdSocket }, name, {
            ...moveOptions(request, ctx.log),
            onRound: (r) =>
              ctx.stderr.write(`round ${r.round} (${r.kind}): ${formatSize(r.changedBytes)} changed, ${formatSize(r.streamBytes)} sent in ${r.ms} ms\n`),
          });
        } finally {
          await destination.close();
        }
      });
      ctx.stdout.write(describeMove(report));
    },
  },
  {
    path: ['volume', 'rm'],
    positionals: ['NAME'],
    options: {},
    summary: 'Delete a volume; what only it held is freed at once (its snapshots stay).',
    async run(ctx, { positionals: [name] }) {
      await ctx.withSession(({ api }) => api.deleteVolume({ name }));
      ctx.stdout.write(`volume ${name} deleted\n`);
    },
  },
];

function moveRequest(source: StoreLocation, volume: string, values: Record<string, string | boolean | undefined>): MoveRequest {
  if (values.to === undefined) throw new UsageError('--to DIR is required: the destination data directory (with --to-store, its cache directory)');
  const distributed = values['to-store'] !== undefined || values['to-blobs'] !== undefined;
  if (distributed && (values['to-store'] === undefined || values['to-blobs'] === undefined)) {
    throw new UsageError('a distributed destination needs both --to-store and --to-blobs');
  }
  const dataDir = path.resolve(String(values.to));
  const destination: StoreLocation = distributed
    ? {
        dataDir,
        storeUrl: String(values['to-store']),
        blobsUrl: String(values['to-blobs']),
        etcdTls: source.etcdTls,
        cacheDir: path.join(dataDir, 'blob-cache'),
      }
    : { dataDir };
  const sameStore = distributed ? destination.storeUrl === source.storeUrl : source.storeUrl === undefined && dataDir === path.resolve(source.dataDir);
  if (sameStore) throw new UsageError('the destination is the store the volume is in');
  const rounds = values['max-rounds'] === undefined ? undefined : Number(values['max-rounds']);
  if (rounds !== undefined && (!Number.isSafeInteger(rounds) || rounds < 0))
    throw new UsageError(`--max-rounds ${String(values['max-rounds'])} is not a count`);
  return {
    volume,
    destination,
    ...(values['to-nbd-socket'] === undefined ? {} : { nbdSocket: path.resolve(String(values['to-nbd-socket'])) }),
    finalRoundBytes: size(values['final-round'], 'final-round'),
    maxRounds: rounds,
    maxPauseMs: values['max-pause'] === undefined ? undefined : duration(String(values['max-pause']), '--max-pause'),
  };
}

function duration(text: string, option: string): number {
  try {
    return parseDuration(text, option);
  } catch (err) {
    if (err instanceof UnitError) throw new UsageError(err.message);
    throw err;
  }
}

function describeRound(r: RoundReport): string {
  // The snapshot commits the volume: its writes wait that long at the start of every round, not only in the last.
  return `round ${r.round} (${r.kind}): ${formatSize(r.changedBytes)} changed, ${formatSize(r.streamBytes)} sent in ${r.ms} ms (snapshot ${r.snapshotMs} ms)`;
}

function describeMove(report: MoveReport): string {
  const lines = report.rounds.map((r) => `  ${describeRound(r)}`);
  const pause =
    report.pauseMs === undefined
      ? 'no connection used it: nothing was paused'
      : `writes paused ${report.pauseMs} ms; ${report.switchedConnections} connections switched to the destination`;
  return `moved volume ${report.volume} (${formatSize(report.sizeBytes)}) in ${report.ms} ms, ${report.rounds.length} rounds; ${pause}\n${lines.join('\n')}\n`;
}
