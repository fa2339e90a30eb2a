import { CommandSpec } from '../args';
import { CliContext } from '../context';

export const gcCommands: CommandSpec<CliContext>[] = [
  {
    path: ['gc'],
    positionals: [],
    options: {},
    summary: 'Reclaim blocks no volume or snapshot reaches any more (after snapshot deletions or a crash).',
    async run(ctx) {
      const report = await ctx.withSession(({ api }) => api.collectGarbage());
      ctx.stdout.write(`gc: freed ${report.freedBlobs} of ${report.scannedBlobs} blobs (${report.reachableBlobs} in use) in ${report.durationMs} ms\n`);
    },
  },
];
