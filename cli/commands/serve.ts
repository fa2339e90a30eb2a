import { once } from 'node:events';
import { parseDuration, UnitError } from '../../lib/units';
import { openDataDir } from '../../store/embedded';
import { CommandSpec, UsageError } from '../args';
import { CliContext } from '../context';

const defaultGcInterval = '10m';

export const serveCommands: CommandSpec<CliContext>[] = [
  {
    path: ['serve'],
    positionals: [],
    options: {
      'gc-interval': { type: 'string', value: 'DURATION', description: `how often the collector runs, e.g. 30s or 1h (default ${defaultGcInterval})` },
    },
    summary: 'Run Arbor on the embedded store until SIGTERM or SIGINT.',
    async run(ctx, { values }) {
      let gcIntervalMs: number;
      try {
        gcIntervalMs = parseDuration(String(values['gc-interval'] ?? defaultGcInterval), '--gc-interval');
      } catch (err) {
        if (err instanceof UnitError) throw new UsageError(err.message);
        throw err;
      }
      const store = await openDataDir(ctx.dataDir, ctx.log);
      store.collectPeriodically(gcIntervalMs);
      ctx.log.info('arbor serving', { dataDir: ctx.dataDir, pid: process.pid, gcIntervalMs });
      // Signal listeners do not keep Node alive; this does, until we stop.
      const keepAlive = setInterval(() => {}, 1 << 30);
      const signal = await Promise.race([once(process, 'SIGTERM').then(() => 'SIGTERM'), once(process, 'SIGINT').then(() => 'SIGINT')]);
      clearInterval(keepAlive);
      ctx.log.info('stopping', { signal });
      await store.close();
      ctx.log.info('stopped: every volume committed and the store closed');
    },
  },
];
