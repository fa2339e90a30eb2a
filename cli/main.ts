#!/usr/bin/env node
import { createLog, LogFormat, logFormats } from '../lib/logger';
import { packageVersion } from '../lib/version';
import { isArborError } from '../store/errors';
import { CommandSpec, UsageError, helpText, parseCommandLine } from './args';
import { CliContext, defaultDataDir, sessionOpener } from './context';
import { gcCommands } from './commands/gc';
import { csiCommands } from './commands/csi';
import { daemonCommands } from './commands/daemons';
import { snapshotCommands } from './commands/snapshot';
import { volumeCommands } from './commands/volume';
import { statusCommands } from './status';
import { isTerminal } from './output';
import path from 'node:path';
import { parseDuration, parseSize, UnitError } from '../lib/units';
import { StoreLocation } from '../store/open';

export const commands: CommandSpec<CliContext>[] = [
  ...volumeCommands,
  ...snapshotCommands,
  ...gcCommands,
  ...daemonCommands,
  ...statusCommands,
  ...csiCommands,
];

export interface Io {
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream;
  stdin: NodeJS.ReadableStream;
  env: NodeJS.ProcessEnv;
  cwd: string;
}

/** Runs one command line; returns the exit status (0 ok, 1 failed, 2 usage). */
export async function main(argv: string[], io: Io): Promise<number> {
  try {
    if (argv[0] === '--version' || argv[0] === 'version') {
      io.stdout.write(`arbor ${packageVersion()}\n`);
      return 0;
    }
    const result = parseCommandLine(argv, commands);
    if (result.help || !result.command || !result.parsed) {
      io.stdout.write(helpText(commands, result.command));
      return 0;
    }
    const { values } = result.parsed;
    const dataDir = values['data-dir'] ? path.resolve(io.cwd, String(values['data-dir'])) : defaultDataDir(io.env, io.cwd);
    const level = String(values['log-level'] ?? io.env.ARBOR_LOG_LEVEL ?? (['serve', 'node', 'controller'].includes(result.command.path[0]) ? 'info' : 'warn'));
    if (!['error', 'warn', 'info', 'debug'].includes(level)) throw new UsageError(`--log-level ${level} is not one of error, warn, info, debug`);
    const format = String(values['log-format'] ?? (isTerminal(io.stderr) ? 'text' : 'json'));
    if (!(logFormats as readonly string[]).includes(format)) throw new UsageError(`--log-format ${format} is not one of ${logFormats.join(', ')}`);
    const log = createLog({ level, component: 'cli', format: format as LogFormat });
    const location = storeLocation(values, io.env, io.cwd, dataDir);
    const context: CliContext = { ...io, dataDir, location, log, withSession: sessionOpener(location, log) };
    await result.command.run(context, result.parsed);
    return 0;
  } catch (err) {
    if (err instanceof UsageError) {
      io.stderr.write(`arbor: ${err.message}\n`);
      return 2;
    }
    if (isArborError(err)) {
      io.stderr.write(`arbor: ${err.message}\n`);
      return 1;
    }
    const e = err as NodeJS.ErrnoException;
    if (e.code && e.syscall) {
      io.stderr.write(`arbor: ${e.message}\n`);
      return 1;
    }
    io.stderr.write(`arbor: unexpected error: ${e.stack ?? String(err)}\n`);
    return 1;
  }
}

if (require.main === module) {
  // main answers every failure with an exit status: it never rejects.
  void main(process.argv.slice(2), { stdout: process.stdout, stderr: process.stderr, stdin: process.stdin, env: process.env, cwd: process.cwd() }).then(
    (status) => {
      process.exitCode = status;
    },
  );
}

/** The global options that say where the store is (the same for every command). */
function storeLocation(values: Record<string, string | boolean | undefined>, env: NodeJS.ProcessEnv, cwd: string, dataDir: string): StoreLocation {
  const text = (name: string, envName?: string) => (values[name] !== undefined ? String(values[name]) : envName ? env[envName] : undefined);
  const file = (name: string) => (values[name] !== undefined ? path.resolve(cwd, String(values[name])) : undefined);
  try {
    const cacheSize = text('cache-size');
    const leaseTtl = text('lease-ttl');
    return {
      dataDir,
      storeUrl: text('store', 'ARBOR_STORE'),
      blobsUrl: text('blobs', 'ARBOR_BLOBS'),
      etcdTls: { caFile: file('etcd-ca'), certFile: file('etcd-cert'), keyFile: file('etcd-key') },
      cacheDir: file('cache-dir'),
      cacheBytes: cacheSize === undefined ? undefined : parseSize(cacheSize, '--cache-size'),
      leaseTtlMs: leaseTtl === undefined ? undefined : parseDuration(leaseTtl, '--lease-ttl'),
    };
  } catch (err) {
    if (err instanceof UnitError) throw new UsageError(err.message);
    throw err;
  }
}
