/**
 * `arbor serve` with no socket options (what `npm start` runs): it serves NBD and
 * CSI on sockets inside the data directory, so there is something to attach to, and
 * on a terminal says where they are and what to try next.
 */
import os from 'node:os';
import path from 'node:path';
import { packageVersion } from '../lib/version';
import { CliContext, defaultDataDir } from './context';
import { isTerminal } from './output';
import { adminSocketPath } from './session';

/** sun_path holds 108 bytes with its NUL. */
const maxUnixSocketPathBytes = 107;
/** NbdServer.connectLocal makes `<socket>.local-<16 hex>` beside the NBD socket. */
const localSocketSuffixBytes = '.local-'.length + 16;

export function defaultNbdSocket(dataDir: string): string {
  return path.join(dataDir, 'nbd.sock');
}

export function defaultCsiEndpoint(dataDir: string): string {
  return `unix://${path.join(dataDir, 'csi.sock')}`;
}

/**
 * The sockets `arbor serve` opens when the command line names none (neither
 * --nbd-socket nor --csi-endpoint): both, in the data directory. Once either is
 * named, the command line says what to serve, as it always did. A data directory
 * whose path is too long for a unix socket gets none, with a warning saying why.
 */
export function firstRunSockets(ctx: CliContext, values: Record<string, string | boolean | undefined>): { nbdSocket?: string; csiEndpoint?: string } {
  if (values['nbd-socket'] !== undefined || values['csi-endpoint'] !== undefined) return {};
  const nbdSocket = defaultNbdSocket(ctx.dataDir);
  if (Buffer.byteLength(nbdSocket) + localSocketSuffixBytes > maxUnixSocketPathBytes) {
    ctx.log.warn('the data directory path is too long for unix sockets in it: serving no NBD or CSI; give --nbd-socket and --csi-endpoint', {
      dataDir: ctx.dataDir,
    });
    return {};
  }
  return { nbdSocket, csiEndpoint: defaultCsiEndpoint(ctx.dataDir) };
}

/** A path as the person at this terminal would type it: relative when under the working directory. */
function shortPath(file: string): string {
  const relative = path.relative(process.cwd(), file);
  return relative && !relative.startsWith('..') && !path.isAbsolute(relative) ? relative : file;
}

/** How the person at this terminal runs the CLI on this data directory. */
function cliCommand(dataDir: string): string {
  const script = process.argv[1] ?? 'arbor';
  const program = path.basename(script) === 'arbor' ? 'arbor' : `node ${shortPath(script)}`;
  if (dataDir === defaultDataDir(process.env, process.cwd())) return program;
  return `${program} --data-dir ${shortPath(dataDir)}`;
}

/**
 * On a terminal (stderr is one): where Arbor serves and three commands to try next.
 * Elsewhere nothing: the 'arbor serving' log line says the same to a machine.
 */
export function printSummary(ctx: CliContext, served: { nbdSocket?: string; csiEndpoint?: string; nodeId: string }): void {
  if (!isTerminal(ctx.stderr)) return;
  const arbor = cliCommand(ctx.dataDir);
  const uri = served.nbdSocket ? `'nbd+unix:///disk?socket=${served.nbdSocket}'` : undefined;
  const lines = [
    '',
    `Arbor ${packageVersion()} is serving the data directory ${ctx.dataDir} (pid ${process.pid}, node ${served.nodeId || os.hostname()})`,
    `  NBD    ${served.nbdSocket ?? '(no unix socket: --nbd-socket)'}   every volume as NAME, every snapshot as NAME@SNAP`,
    `  CSI    ${served.csiEndpoint ?? '(not served: --csi-endpoint)'}`,
    `  admin  ${adminSocketPath(ctx.dataDir)}   the arbor CLI works through it`,
    '',
    'Try, in another terminal:',
    `  ${arbor} volume create disk --size 1GiB`,
    ...(uri ? [`  qemu-io -f raw -c 'write -P 0xab 0 1M' ${uri}      (or nbdinfo, qemu-img, nbdfuse on that URI)`] : []),
    `  ${arbor} snapshot create disk@first`,
    `then \`${arbor} status\` shows what the server holds. Ctrl-C stops it (every volume is committed first).`,
    '',
  ];
  ctx.stderr.write(lines.join('\n') + '\n');
}
