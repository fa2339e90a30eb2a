import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { CsiClient, csiClient, expectCode, status } from '../../csi/client';
import { serverForSuite } from '../support/arbor-server';
import { ok } from '../support/run';

const MiB = 1024 * 1024;

interface FioJob {
  error: number;
  read: { iops: number; io_bytes: number };
}

/**
 * fio's nbd engine, 4 KiB random reads for `seconds`; its JSON job. Queue depth 64:
 * on a busy host a descheduled fio must still have requests waiting at the server,
 * or what it measures is its own scheduling, not the limit.
 */
async function fio(uri: string, seconds: number, extra: string[] = []): Promise<FioJob> {
  const out = await ok('fio', [
    '--name=qos',
    '--ioengine=nbd',
    `--uri=${uri}`,
    '--rw=randread',
    '--bs=4k',
    '--iodepth=64',
    '--size=64M',
    '--time_based=1',
    `--runtime=${seconds}`,
    '--output-format=json',
    ...extra,
  ]);
  // fio prints "fio: connected to NBD server" before its JSON.
  return (JSON.parse(out.slice(out.indexOf('{'))) as { jobs: FioJob[] }).jobs[0];
}

function sample(text: string, name: string, labels: string): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(`${name}${labels} `));
  return line === undefined ? undefined : Number(line.slice(line.lastIndexOf(' ') + 1));
}

const block = [{ access_mode: { mode: 'SINGLE_NODE_WRITER' }, block: {} }];

describe('per-volume QoS: limits set by CSI, enforced by the NBD server', function () {
  this.timeout(120_000);
  const suite = serverForSuite(async (dir) => [
    '--metrics-listen',
    '127.0.0.1:0',
    '--csi-endpoint',
    `unix://${path.join(dir, 'csi.sock')}`,
    '--node-id',
    'qos-node',
  ]);
  let csi: CsiClient;
  const ids = new Map<string, string>();
  before(() => (csi = csiClient(path.join(suite.dir, 'csi.sock'))));
  after(() => csi?.close());

  const create = async (name: string, mutable: Record<string, string> = {}) => {
    const response = (await csi.controller.CreateVolume({
      name,
      capacity_range: { required_bytes: String(64 * MiB) },
      volume_capabilities: block,
      mutable_parameters: mutable,
    })) as { volume: { volume_id: string } };
    ids.set(name, response.volume.volume_id);
    return response.volume.volume_id;
  };
  const scrape = async () => {
    const line = suite.server
      .log()
      .split('\n')
      .find((l) => l.includes('"message":"metrics served"'));
    assert.ok(line, 'the server logs where it serves metrics');
    return (await fetch(`http://${JSON.parse(line).address}/metrics`)).text();
  };

  it('advertises MODIFY_VOLUME; CreateVolume with mutable_parameters sets the limits, shown by volume info', async () => {
    const caps = (await csi.controller.ControllerGetCapabilities({})) as { capabilities: Array<{ rpc: { type: string } }> };
    assert.ok(caps.capabilities.some((c) => c.rpc.type === 'MODIFY_VOLUME'));
    await create('limited', { maxIops: '1000', maxBandwidth: '100MiB' });
    await create('free');
    const info = JSON.parse(await suite.server.cliOk('volume', 'info', 'limited', '--json'));
    assert.deepEqual(info.qos, { maxIops: 1000, maxBandwidthBytes: 100 * MiB, burstSeconds: 0.1 });
    assert.match(await suite.server.cliOk('volume', 'info', 'limited'), /qos: +1000 IOPS, 100 MiB\/s, burst 0.1 s/);
    assert.deepEqual(JSON.parse(await suite.server.cliOk('volume', 'info', 'free', '--json')).qos, {
      maxIops: null,
      maxBandwidthBytes: null,
      burstSeconds: null,
    });
    // A retried CreateVolume answers the same volume and keeps the limits.
    assert.equal(await create('limited', { maxIops: '1000', maxBandwidth: '100MiB' }), ids.get('limited'));
  });

  it('fio against a volume limited to 1,000 IOPS measures 1,000 ± 10% while an unlimited volume on the same server keeps its rate', async () => {
    const alone = await fio(suite.server.uri('free'), 2);
    const [limited, free] = await Promise.all([fio(suite.server.uri('limited'), 5), fio(suite.server.uri('free'), 5)]);
    console.log(
      `      free alone ${alone.read.iops.toFixed(0)} IOPS; together: limited ${limited.read.iops.toFixed(0)}, free ${free.read.iops.toFixed(0)} IOPS`,
    );
    assert.equal(limited.error, 0);
    assert.equal(free.error, 0);
    assert.ok(Math.abs(limited.read.iops - 1000) <= 100, `the limited volume ran at ${limited.read.iops} IOPS`);
    assert.ok(free.read.iops >= 0.5 * alone.read.iops, `the unlimited volume ran at ${free.read.iops} IOPS beside it, ${alone.read.iops} alone`);
    assert.ok(free.read.iops > 5 * limited.read.iops, 'the unlimited volume is not held to the limit');

    const metrics = await scrape();
    assert.equal(sample(metrics, 'arbor_volume_qos_max_iops', '{volume="limited"}'), undefined, 'no series once no connection serves the volume');
    assert.ok((sample(metrics, 'arbor_volume_qos_wait_seconds_total', '{volume="limited"}') ?? 0) > 1, 'requests to the limited volume waited');
    assert.ok((sample(metrics, 'arbor_volume_qos_delayed_requests_total', '{volume="limited"}') ?? 0) > 1000);
    assert.equal(sample(metrics, 'arbor_volume_qos_wait_seconds_total', '{volume="free"}'), undefined, 'requests to the unlimited volume never waited');
  });

  it('ControllerModifyVolume changes the limit under load, without an I/O error, and the rate follows', async () => {
    const logPrefix = path.join(suite.dir, 'modify');
    const running = fio(suite.server.uri('limited'), 6, [`--write_iops_log=${logPrefix}`, '--log_avg_msec=500']);
    await new Promise((resolve) => setTimeout(resolve, 1000));
    const served = await scrape();
    assert.equal(sample(served, 'arbor_volume_qos_max_iops', '{volume="limited"}'), 1000, 'the limit of a served volume is a metric');
    assert.equal(sample(served, 'arbor_volume_qos_max_bandwidth_bytes', '{volume="limited"}'), 100 * MiB);
    await new Promise((resolve) => setTimeout(resolve, 2000));
    await csi.controller.ControllerModifyVolume({ volume_id: ids.get('limited'), mutable_parameters: { maxIops: '3000' } });
    const job = await running;
    assert.equal(job.error, 0, 'fio saw no I/O error');
    // Each line: time (ms), IOPS over the last 500 ms, direction, block size, offset.
    const points = fs
      .readFileSync(`${logPrefix}_iops.1.log`, 'utf8')
      .trim()
      .split('\n')
      .map((line) => line.split(',').map((field) => Number(field.trim())));
    const mean = (from: number, to: number) => {
      const inside = points.filter(([ms]) => ms > from && ms <= to).map(([, iops]) => iops);
      return inside.reduce((a, b) => a + b, 0) / inside.length;
    };
    const before = mean(500, 2800);
    const after = mean(3800, 6000);
    console.log(`      before ModifyVolume ${before.toFixed(0)} IOPS, after ${after.toFixed(0)} IOPS`);
    assert.ok(Math.abs(before - 1000) <= 100, `before: ${before} IOPS`);
    assert.ok(Math.abs(after - 3000) <= 300, `after: ${after} IOPS`);
    const info = JSON.parse(await suite.server.cliOk('volume', 'info', 'limited', '--json'));
    assert.deepEqual(
      info.qos,
      { maxIops: 3000, maxBandwidthBytes: null, burstSeconds: 0.1 },
      'the parameters are the whole QoS: maxBandwidth left out is no limit',
    );
  });

  it('arbor volume qos sets limits through the running server, applied to a connection already open, and lifts them', async () => {
    const running = fio(suite.server.uri('free'), 4);
    await new Promise((resolve) => setTimeout(resolve, 500));
    assert.match(await suite.server.cliOk('volume', 'qos', 'free', '--max-iops', '500', '--burst-seconds', '0.05'), /volume free: qos 500 IOPS, burst 0.05 s/);
    const job = await running;
    assert.equal(job.error, 0);
    const delayed = sample(await scrape(), 'arbor_volume_qos_delayed_requests_total', '{volume="free"}') ?? 0;
    assert.ok(delayed > 100, `the connection open before the change waited for the new limit (${delayed} requests waited)`);
    const limited = await fio(suite.server.uri('free'), 2);
    assert.ok(Math.abs(limited.read.iops - 500) <= 75, `a new connection runs at the limit (${limited.read.iops} IOPS)`);
    assert.match(await suite.server.cliOk('volume', 'qos', 'free'), /volume free: qos unlimited/);
    const bad = await suite.server.cli('volume', 'qos', 'free', '--max-bandwidth', 'fast');
    assert.equal(bad.status, 1);
    assert.match(bad.stderr, /parameter maxBandwidth "fast" is not a size/);
  });

  it('refuses unknown and malformed parameters with INVALID_ARGUMENT naming the key, and a missing volume with NOT_FOUND', async () => {
    const modify = (mutable: Record<string, string>, id = ids.get('free')) =>
      csi.controller.ControllerModifyVolume({ volume_id: id, mutable_parameters: mutable });
    assert.match(
      await expectCode(modify({ maxIops: 'fast' }), status.INVALID_ARGUMENT, 'a word'),
      /volume free: mutable_parameters: parameter maxIops "fast" is not a whole number/,
    );
    assert.match(await expectCode(modify({ maxIops: '0' }), status.INVALID_ARGUMENT, 'zero'), /parameter maxIops "0" is out of range/);
    assert.match(await expectCode(modify({ maxBandwidth: 'lots' }), status.INVALID_ARGUMENT, 'no size'), /parameter maxBandwidth "lots" is not a size/);
    assert.match(await expectCode(modify({ burstSeconds: '-1' }), status.INVALID_ARGUMENT, 'negative'), /parameter burstSeconds "-1"/);
    assert.match(await expectCode(modify({ burstSeconds: '2' }), status.INVALID_ARGUMENT, 'a burst alone'), /burstSeconds 2 without maxIops or maxBandwidth/);
    assert.match(
      await expectCode(modify({ iops: '100' }), status.INVALID_ARGUMENT, 'unknown'),
      /unknown QoS parameter "iops": Arbor takes maxIops, maxBandwidth, burstSeconds/,
    );
    await expectCode(modify({ maxIops: '10' }, 'vol-0000000000000000'), status.NOT_FOUND, 'no such volume');
    await expectCode(modify({ maxIops: '10' }, ''), status.INVALID_ARGUMENT, 'no volume id');
    const refused = await expectCode(
      csi.controller.CreateVolume({ name: 'never', volume_capabilities: block, mutable_parameters: { maxBandwidth: '1 lot' } }),
      status.INVALID_ARGUMENT,
      'CreateVolume',
    );
    assert.match(refused, /volume never: mutable_parameters: parameter maxBandwidth "1 lot" is not a size/);
    assert.equal((await suite.server.cli('volume', 'info', 'never')).status, 1, 'a refused CreateVolume made nothing');
    assert.deepEqual(JSON.parse(await suite.server.cliOk('volume', 'info', 'free', '--json')).qos.maxIops, null, 'refused changes changed nothing');
  });
});
