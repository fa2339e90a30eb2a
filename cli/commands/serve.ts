import { once } from 'node:events';
import { parseDuration, UnitError } from '../../lib/units';
import path from 'node:path';
import { NbdServer, TlsFiles } from '../../node-plugin/nbd/server';
import { StoreExports } from '../../node-plugin/store-exports';
import { openDataDir } from '../../store/embedded';
import { AdminServer } from '../admin/server';
import { adminSocketPath } from '../session';
import { CommandSpec, UsageError } from '../args';
import { CliContext } from '../context';

const defaultGcInterval = '10m';

export const serveCommands: CommandSpec<CliContext>[] = [
  {
    path: ['serve'],
    positionals: [],
    options: {
      'gc-interval': { type: 'string', value: 'DURATION', description: `how often the collector runs, e.g. 30s or 1h (default ${defaultGcInterval})` },
      'nbd-socket': { type: 'string', value: 'PATH', description: 'serve every volume (NAME) and snapshot (NAME@SNAP) over NBD on this unix socket (mode 0600)' },
      'nbd-listen': { type: 'string', value: 'HOST:PORT', description: 'also serve NBD over TCP; anything but loopback requires --tls-cert and --tls-key' },
      'tls-cert': { type: 'string', value: 'FILE', description: 'PEM certificate for NBD over TCP (clients must use STARTTLS)' },
      'tls-key': { type: 'string', value: 'FILE', description: 'PEM private key for --tls-cert' },
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
      const tcp = values['nbd-listen'] === undefined ? undefined : parseListen(String(values['nbd-listen']));
      const tlsFiles = tlsOptions(values['tls-cert'], values['tls-key']);
      if (tcp && !isLoopback(tcp.host) && !tlsFiles) {
        throw new UsageError(`--nbd-listen ${tcp.host}:${tcp.port} is not loopback: NBD over the network needs TLS; give --tls-cert and --tls-key`);
      }
      const store = await openDataDir(ctx.dataDir, ctx.log);
      store.collectPeriodically(gcIntervalMs);
      const nbd = new NbdServer(new StoreExports(store), ctx.log);
      try {
        if (values['nbd-socket'] !== undefined) await nbd.listenUnix(path.resolve(String(values['nbd-socket'])));
        if (tcp) await nbd.listenTcp(tcp.host, tcp.port, tlsFiles);
      } catch (err) {
        await nbd.close();
        await store.close();
        throw err;
      }
      const nbdSocket = values['nbd-socket'] === undefined ? undefined : path.resolve(String(values['nbd-socket']));
      const admin = await AdminServer.listen(adminSocketPath(ctx.dataDir), store, { pid: process.pid, nbdSocket }, ctx.log);
      ctx.log.info('arbor serving', { dataDir: ctx.dataDir, pid: process.pid, gcIntervalMs, nbdSocket, adminSocket: adminSocketPath(ctx.dataDir) });
      // Signal listeners do not keep Node alive; this does, until we stop.
      const keepAlive = setInterval(() => {}, 1 << 30);
      const signal = await Promise.race([once(process, 'SIGTERM').then(() => 'SIGTERM'), once(process, 'SIGINT').then(() => 'SIGINT')]);
      clearInterval(keepAlive);
      ctx.log.info('stopping', { signal, nbdConnections: nbd.connectionCount });
      await admin.close();
      await nbd.close();
      await store.close();
      ctx.log.info('stopped: every volume committed and the store closed');
    },
  },
];

function parseListen(text: string): { host: string; port: number } {
  const match = /^(\[[^\]]+\]|[^:]+):(\d+)$/.exec(text);
  const port = match ? Number(match[2]) : NaN;
  if (!match || port > 65535) throw new UsageError(`--nbd-listen ${JSON.stringify(text)} is not HOST:PORT (e.g. 127.0.0.1:10809)`);
  return { host: match[1].replace(/^\[|\]$/g, ''), port };
}

function tlsOptions(cert: string | boolean | undefined, key: string | boolean | undefined): TlsFiles | undefined {
  if (cert === undefined && key === undefined) return undefined;
  if (cert === undefined || key === undefined) throw new UsageError('--tls-cert and --tls-key go together');
  return { certFile: String(cert), keyFile: String(key) };
}

function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\./.test(host);
}
