import { formatSize } from '../../lib/units';
import { SnapshotRecord } from '../../store/records';
import { CommandSpec } from '../args';
import { CliContext } from '../context';
import { json, table } from '../output';
import { parseSnapshotRef, snapshotOf } from '../refs';

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
      const s = await ctx.withSession(({ api }) => api.createSnapshot({ name: ref.volume }, ref.snapshot));
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
          snapshots.map((s) => [`${s.volumeName}@${s.name}`, formatSize(s.sizeBytes), s.createdAt]),
        ),
      );
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
