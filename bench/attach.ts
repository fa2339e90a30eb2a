/**
 * npm run bench:attach — the kernel attach path, measured inside the test node (a
 * QEMU VM with Debian's kernel, test/support/test-node/): fio (libaio, O_DIRECT) on
 * /dev/nbdN, the device configured over netlink the way Arbor's node plugin does it,
 * served in the same guest, one after the other, by
 *   arbor       a volume staged through arbor serve's CSI Node service
 *   nbdkit      nbdkit's file plugin on a raw file
 *   qemu-nbd    qemu-nbd on a raw file
 * each first filled with data, for 4 KiB random reads and writes at queue depth 16
 * and 1 MiB sequential reads and writes at depth 4. Everything runs under TCG, so
 * absolute figures mean little: it prints Arbor's ratio to each peer, and the test
 * node's boot time. BENCH_RUNTIME (seconds per run, default 10) trades time for noise.
 */
import path from 'node:path';
import { startGuestArbor } from '../test/support/test-node/guest-arbor';
import { GuestProcess, TestNode } from '../test/support/test-node/test-node';
import { fioJobArgs, FioResult, fioResult, fmt, printTable, runBenchmark, workloads } from './support';

const runtime = Number(process.env.BENCH_RUNTIME ?? 10);
const MiB = 1024 * 1024;
const volumeBytes = 1024 * MiB;
/** The part of the device fio reads and writes, filled first. */
const regionBytes = 512 * MiB;
const dir = '/tmp/bench';
const attachScript = path.join(__dirname, 'attach-device.js');

interface Target {
  name: string;
  /** Starts the server, attaches and fills the device; returns it and how to take it all down. */
  setUp(node: TestNode): Promise<{ device: string; connections: number; tearDown: () => Promise<void> }>;
}

/** A peer server in the guest, attached through the same kernel attacher Arbor's volumes use. */
function peer(name: string, argv: (socket: string, file: string) => string[]): Target {
  return {
    name,
    async setUp(node) {
      const socket = `${dir}/${name}.sock`;
      const file = `${dir}/${name}.raw`;
      await node.ok(['truncate', '-s', String(volumeBytes), file]);
      const server: GuestProcess = await node.spawn(argv(socket, file));
      await node.sh(`for i in $(seq 1 600); do [ -S ${socket} ] && exit 0; sleep 0.1; done; echo "${name} did not listen on ${socket}" >&2; exit 1`);
      const attachment = (await node.ok(['node', attachScript, 'attach', socket, 'bench', `${dir}/${name}-work`])).trim();
      const { device, details } = JSON.parse(attachment) as { device: string; details: { connections: number } };
      return {
        device,
        connections: details.connections,
        tearDown: async () => {
          await node.ok(['node', attachScript, 'detach', attachment]);
          await server.signal('SIGTERM');
          await server.wait(30_000);
          await node.ok(['rm', '-f', file]);
        },
      };
    },
  };
}

const arbor: Target = {
  name: 'arbor',
  async setUp(node) {
    const server = await startGuestArbor(node, `${dir}/arbor`);
    const capability = { access_mode: { mode: 'SINGLE_NODE_WRITER' }, block: {} };
    const { volume } = (await server.csi.controller.CreateVolume({
      name: 'bench',
      volume_capabilities: [capability],
      capacity_range: { required_bytes: String(volumeBytes) },
    })) as {
      volume: { volume_id: string; volume_context: Record<string, string> };
    };
    const published = await server.csi.controller.ControllerPublishVolume({
      volume_id: volume.volume_id,
      node_id: server.nodeId,
      volume_capability: capability,
    });
    const staging = `${dir}/arbor/staging`;
    await node.ok(['mkdir', '-p', staging]);
    await server.csi.node.NodeStageVolume({
      volume_id: volume.volume_id,
      staging_target_path: staging,
      volume_capability: capability,
      publish_context: published.publish_context,
      volume_context: volume.volume_context,
    });
    const device = (
      await node.sh(`for d in /sys/block/nbd*; do if [ "$(cat $d/backend 2>/dev/null)" = ${volume.volume_id} ]; then echo /dev/$(basename $d); fi; done`)
    ).trim();
    const state = JSON.parse(await node.sh(`cat ${server.stateDir}/volumes/${volume.volume_id}/kernel-attachment.json`)) as {
      details: { connections: number };
    };
    return {
      device,
      connections: state.details.connections,
      tearDown: async () => {
        await server.csi.node.NodeUnstageVolume({ volume_id: volume.volume_id, staging_target_path: staging });
        const status = await server.stop();
        if (status !== 0) throw new Error(`arbor serve exited ${status}`);
        await node.ok(['rm', '-rf', `${dir}/arbor`]);
      },
    };
  },
};

const targets: Target[] = [
  arbor,
  peer('nbdkit', (socket, file) => ['nbdkit', '--foreground', '--exit-with-parent', '--unix', socket, 'file', file]),
  peer('qemu-nbd', (socket, file) => ['qemu-nbd', '--persistent', '--shared=8', '--format=raw', '--export-name=bench', `--socket=${socket}`, file]),
];

async function fio(node: TestNode, device: string, w: (typeof workloads)[number]): Promise<FioResult> {
  const out = await node.ok(['fio', '--ioengine=libaio', '--direct=1', `--filename=${device}`, ...fioJobArgs(w, regionBytes, runtime)], {
    timeoutMs: (runtime + 120) * 1000,
  });
  return fioResult(out, w);
}

runBenchmark(async () => {
  process.stderr.write('booting the test node...\n');
  const node = await TestNode.boot({ memoryMiB: 4096 });
  const results = new Map<string, FioResult[]>();
  const connections = new Map<string, number>();
  try {
    await node.ok(['mkdir', '-p', dir]);
    for (const target of targets) {
      process.stderr.write(`${target.name}: starting, attaching, filling ${regionBytes / MiB} MiB...\n`);
      const { device, connections: count, tearDown } = await target.setUp(node);
      connections.set(target.name, count);
      try {
        await node.ok(
          [
            'fio',
            '--name=fill',
            '--ioengine=libaio',
            '--direct=1',
            `--filename=${device}`,
            '--rw=write',
            '--bs=1m',
            '--iodepth=4',
            `--size=${regionBytes}`,
            '--refill_buffers',
            '--output-format=terse',
          ],
          { timeoutMs: 600_000 },
        );
        const row: FioResult[] = [];
        for (const w of workloads) {
          process.stderr.write(`${target.name}: ${w.name}...\n`);
          row.push(await fio(node, device, w));
        }
        results.set(target.name, row);
      } finally {
        await tearDown();
      }
    }
  } finally {
    await node.shutdown();
  }

  console.log(
    `\nthe test node: kernel ${node.kernelVersion}, booted in ${node.bootSeconds.toFixed(1)} s (agent started at ${node.guestUptimeAtAgent.toFixed(1)} s of guest uptime)`,
  );
  const rows = workloads.flatMap((w, i) =>
    targets.map((t) => {
      const r = results.get(t.name)![i];
      return [w.name, `${t.name} (${connections.get(t.name)} conn)`, fmt(r.iops, 0), fmt(r.mibs), fmt(r.p50us, 0), fmt(r.p99us, 0)];
    }),
  );
  printTable(
    `fio --ioengine=libaio --direct=1 on /dev/nbdN in the test node (TCG, ${runtime} s per run after 2 s ramp)`,
    ['workload', 'server', 'IOPS', 'MiB/s', 'p50 µs', 'p99 µs'],
    rows,
  );
  const ratio = (i: number, peerName: string) => fmt(results.get('arbor')![i].mibs / results.get(peerName)![i].mibs);
  printTable(
    'arbor / peer (throughput, same guest, same kernel path)',
    ['workload', 'arbor / nbdkit file', 'arbor / qemu-nbd raw'],
    workloads.map((w, i) => [w.name, ratio(i, 'nbdkit'), ratio(i, 'qemu-nbd')]),
  );
});
