/**
 * npm run bench:restart — how long a writer in the test node waits when the node
 * plugin restarts under it: `arbor node` in the test node with a Block volume staged
 * through the kernel's nbd driver, a writer (test/kernel/stamp_writer.py: 4 threads
 * of 4 KiB O_DIRECT|O_DSYNC writes) on it, and the plugin stopped (SIGTERM, a
 * DaemonSet update) or killed (SIGKILL, a crash) and started again, 10 times each
 * (BENCH_RESTARTS). For each restart: the longest any single write took (the stall
 * the workload sees) and the plugin's own start time (Node.js under TCG, then the
 * re-attachment), as p50 and max.
 */
import path from 'node:path';
import { configuredNbdDevices, GuestArbor, startGuestArbor } from '../test/support/test-node/guest-arbor';
import { TestNode } from '../test/support/test-node/test-node';
import { fmt, percentile, printTable, runBenchmark } from './support';

const restarts = Number(process.env.BENCH_RESTARTS ?? 10);
const dir = '/tmp/bench-restart';
const stampWriter = path.resolve(__dirname, '..', '..', 'test', 'kernel', 'stamp_writer.py');
const blocks = 4096;

runBenchmark(async () => {
  process.stderr.write('booting the test node...\n');
  const node = await TestNode.boot({ memoryMiB: 3072 });
  const rows: string[][] = [];
  try {
    const start = () => startGuestArbor(node, dir, { command: 'node', nodeId: 'bench' });
    let arbor: GuestArbor = await start();
    await arbor.cli('volume', 'create', 'disk', '--size', '256MiB');
    const id = (JSON.parse(await arbor.cli('volume', 'info', 'disk', '--json')) as { id: string }).id;
    const staging = `${dir}/staging`;
    await node.ok(['mkdir', '-p', staging]);
    const capability = { access_mode: { mode: 'SINGLE_NODE_WRITER' }, block: {} };
    await arbor.csi.node.NodeStageVolume({ volume_id: id, staging_target_path: staging, volume_capability: capability, volume_context: { name: 'disk' } });
    const device = (await configuredNbdDevices(node)).find((d) => d.backend === id)!.device;

    for (const how of ['SIGTERM', 'SIGKILL'] as const) {
      const stalls: number[] = [];
      const starts: number[] = [];
      for (let i = 0; i < restarts; i++) {
        process.stderr.write(`${how} restart ${i + 1} of ${restarts}...\n`);
        const state = `${dir}/writer-${how}-${i}.state`;
        const stop = `${dir}/writer-${how}-${i}.stop`;
        const writer = await node.spawn(['python3', stampWriter, 'write', device, String(blocks), state, stop, '4']);
        await new Promise((resolve) => setTimeout(resolve, 2000));
        if (how === 'SIGTERM') await arbor.stop();
        else await arbor.kill();
        const started = Date.now();
        arbor = await start();
        starts.push((Date.now() - started) / 1000);
        // The writes held during the restart complete; then a little more writing, and the writer stops.
        await new Promise((resolve) => setTimeout(resolve, 2000));
        await node.ok(['touch', stop]);
        const ended = await writer.wait(120_000);
        if (!ended || ended.status !== 0) throw new Error(`the writer failed across a ${how} restart:\n${await writer.output()}`);
        stalls.push((JSON.parse((await node.readFile(state)).toString()) as { longestWriteSeconds: number }).longestWriteSeconds);
      }
      rows.push([how, fmt(percentile(stalls, 50)), fmt(Math.max(...stalls)), fmt(percentile(starts, 50)), fmt(Math.max(...starts))]);
    }
    await arbor.csi.node.NodeUnstageVolume({ volume_id: id, staging_target_path: staging });
    await arbor.stop();
  } finally {
    await node.shutdown();
  }
  console.log(`\nthe test node: kernel ${node.kernelVersion}, booted in ${node.bootSeconds.toFixed(1)} s; ${restarts} restarts of each kind`);
  printTable(
    "the longest a write waited across a node plugin restart, beside the plugin's start time (s)",
    ['restart', 'stall p50', 'stall max', 'start p50', 'start max'],
    rows,
  );
  console.log('\nSIGTERM: the stall is the start time plus what a stop takes (the goal: under start + 2 s).');
  console.log(
    "SIGKILL: writes the killed process had read and never answered wait for the kernel's request timeout (30 s when none is set) before they are sent again.",
  );
});
