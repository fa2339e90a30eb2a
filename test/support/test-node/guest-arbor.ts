/**
 * `arbor serve` inside the test node, as a node would run it: the embedded store on
 * the guest's own tmpfs, NBD on a unix socket, CSI on another, metrics on the
 * guest's loopback. The tests drive it through the agent.
 */
import path from 'node:path';
import { cliPath } from '../arbor-server';
import { GuestProcess, TestNode } from './test-node';

/** The guest sees the host's root read-only at the same paths, so it runs the same bin. */
export const guestCliPath = cliPath;

/** Node.js loads the whole CLI over 9p under TCG: seconds, tens of them on a loaded machine. */
export const guestStartTimeoutMs = 120_000;

export interface GuestArbor {
  dir: string;
  dataDir: string;
  nbdSocket: string;
  csiSocket: string;
  stateDir: string;
  nodeId: string;
  process: GuestProcess;
  csi: ReturnType<TestNode['csi']>;
  /** The arbor CLI on the same data directory (through the server's admin socket); its stdout. */
  cli(...args: string[]): Promise<string>;
  /** The server's Prometheus metrics, as text. */
  metrics(): Promise<string>;
  /** SIGTERM; resolves with the exit status. */
  stop(): Promise<number | null>;
  /** SIGKILL. */
  kill(): Promise<void>;
}

export const guestMetricsAddress = '127.0.0.1:9820';

/**
 * Starts `arbor serve` (or, with `command: 'node'`, the node plugin alone) with its
 * files under `dir` in the guest; the same `dir` again is a restart on the same data.
 * Resolves once it serves (and, for the node service, has re-attached its devices).
 */
export async function startGuestArbor(
  node: TestNode,
  dir: string,
  options: { nodeId?: string; extraArgs?: string[]; command?: 'serve' | 'node'; metricsAddress?: string } = {},
): Promise<GuestArbor> {
  const metricsAddress = options.metricsAddress ?? guestMetricsAddress;
  const nodeId = options.nodeId ?? 'test-node';
  const paths = {
    dir,
    dataDir: path.join(dir, 'data'),
    nbdSocket: path.join(dir, 'nbd.sock'),
    csiSocket: path.join(dir, 'csi.sock'),
    stateDir: path.join(dir, 'node-state'),
  };
  await node.ok(['mkdir', '-p', paths.dataDir]);
  const process = await node.spawn(
    [
      'node', guestCliPath, '--data-dir', paths.dataDir, options.command ?? 'serve',
      '--nbd-socket', paths.nbdSocket, '--csi-endpoint', `unix://${paths.csiSocket}`,
      '--node-id', nodeId, '--state-dir', paths.stateDir, '--metrics-listen', metricsAddress,
      ...(options.extraArgs ?? []),
    ], // prettier-ignore
    { env: { ARBOR_LOG_LEVEL: 'info' } },
  );
  // A node without the data (--relay-to) says so.
  const relay = (options.extraArgs ?? []).includes('--relay-to');
  await process.waitForOutput(relay ? '"message":"arbor relay node serving"' : '"message":"arbor serving"', guestStartTimeoutMs);
  const ended = async (timeoutMs: number) => (await process.wait(timeoutMs))?.status ?? null;
  return {
    ...paths,
    nodeId,
    process,
    csi: node.csi(paths.csiSocket),
    cli: (...args) => node.ok(['node', guestCliPath, '--data-dir', paths.dataDir, ...args], { timeoutMs: guestStartTimeoutMs }),
    metrics: () =>
      node.ok([
        'node',
        '-e',
        `require('http').get('http://${metricsAddress}/metrics', (r) => r.pipe(process.stdout)).on('error', (e) => { console.error(e.message); process.exit(1); })`,
      ]),
    async stop() {
      await process.signal('SIGTERM');
      const status = await ended(60_000);
      if (status === null) throw new Error(`arbor serve in the test node did not stop within 60 s of SIGTERM:\n${(await process.output()).slice(-3000)}`);
      return status;
    },
    async kill() {
      await process.signal('SIGKILL');
      await process.wait(30_000);
    },
  };
}

/** The nbd devices the guest's kernel has configured: name and backend identifier. */
export async function configuredNbdDevices(node: TestNode): Promise<Array<{ device: string; backend: string }>> {
  const out = await node.sh('for d in /sys/block/nbd*; do if [ -e "$d/pid" ]; then echo "/dev/$(basename "$d") $(cat "$d/backend")"; fi; done');
  return out
    .split('\n')
    .filter((line) => line.trim() !== '')
    .map((line) => {
      const [device, backend = ''] = line.split(' ');
      return { device, backend };
    });
}
