import assert from 'node:assert/strict';
import path from 'node:path';
import { csiClient } from '../../csi/client';
import { cliPath, serverForSuite } from '../support/arbor-server';
import { ok, run } from '../support/run';

const MiB = 1024 * 1024;

/** The value of one sample in Prometheus text, or undefined when absent. */
function sample(text: string, name: string, labels = ''): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(`${name}${labels} `) || (labels === '' && l.startsWith(`${name} `)));
  return line === undefined ? undefined : Number(line.slice(line.lastIndexOf(' ') + 1));
}

describe('Prometheus metrics (--metrics-listen)', function () {
  this.timeout(60_000);
  const suite = serverForSuite(async (dir) => [
    '--metrics-listen',
    '127.0.0.1:0',
    '--csi-endpoint',
    `unix://${path.join(dir, 'csi.sock')}`,
    '--node-id',
    'metrics-node',
  ]);
  const metricsUrl = () => {
    const line = suite.server
      .log()
      .split('\n')
      .find((l) => l.includes('"message":"metrics served"'));
    assert.ok(line, 'the server logs where it serves metrics');
    return `http://${JSON.parse(line).address}/metrics`;
  };
  const scrape = async () => {
    const response = await fetch(metricsUrl());
    assert.equal(response.status, 200);
    assert.match(response.headers.get('content-type') ?? '', /text\/plain/);
    return response.text();
  };

  it('counts NBD requests and bytes, CSI calls by method and code, and reports the store', async () => {
    const before = await scrape();
    const writesBefore = sample(before, 'arbor_nbd_requests_total', '{command="write"}') ?? 0;
    const bytesBefore = sample(before, 'arbor_nbd_bytes_total', '{direction="write"}') ?? 0;
    const readsBefore = sample(before, 'arbor_nbd_requests_total', '{command="read"}') ?? 0;
    const readBytesBefore = sample(before, 'arbor_nbd_bytes_total', '{direction="read"}') ?? 0;
    const refusedBefore = sample(before, 'arbor_nbd_request_errors_total', '{command="read"}') ?? 0;

    const csi = csiClient(path.join(suite.dir, 'csi.sock'));
    try {
      await csi.controller.CreateVolume({
        name: 'observed',
        capacity_range: { required_bytes: String(16 * MiB) },
        volume_capabilities: [{ access_mode: { mode: 'SINGLE_NODE_WRITER' }, block: {} }],
      });
      await assert.rejects(csi.controller.DeleteVolume({ volume_id: '' }));
    } finally {
      csi.close();
    }
    // Three writes of 64 KiB, 4 KiB and 1 MiB, and one flush.
    await ok('qemu-io', ['-f', 'raw', '-c', 'write 0 64k', '-c', 'write 1M 4k', '-c', 'write 2M 1M', '-c', 'flush', suite.server.uri('observed')]);
    // Two reads, then one past the end of the 16 MiB volume, which the server refuses
    // (libnbd's strict mode off, or it would refuse it first).
    const script = [
      'h.set_strict_mode(0)',
      `h.connect_uri(${JSON.stringify(suite.server.uri('observed'))})`,
      'h.pread(4096, 0)',
      'h.pread(8192, 1 << 20)',
      'try:\n  h.pread(4096, 16 << 20)\nexcept nbd.Error as e:\n  print(e.errno)',
    ];
    // nbdsh needs Debian's python3 (python3-libnbd), not another one earlier on PATH.
    const refused = await ok('nbdsh', ['-c', script.join('\n')], { env: { ...process.env, PATH: `/usr/bin:${process.env.PATH}` } });
    assert.match(refused, /EINVAL|22/);

    const after = await scrape();
    assert.equal(sample(after, 'arbor_nbd_requests_total', '{command="write"}'), writesBefore + 3);
    assert.equal(sample(after, 'arbor_nbd_bytes_total', '{direction="write"}'), bytesBefore + 64 * 1024 + 4096 + MiB);
    assert.ok((sample(after, 'arbor_nbd_requests_total', '{command="flush"}') ?? 0) >= 1);
    assert.equal(sample(after, 'arbor_nbd_requests_total', '{command="read"}'), readsBefore + 2);
    assert.equal(sample(after, 'arbor_nbd_bytes_total', '{direction="read"}'), readBytesBefore + 4096 + 8192);
    assert.equal(sample(after, 'arbor_nbd_request_errors_total', '{command="read"}'), refusedBefore + 1);
    assert.equal(sample(after, 'arbor_csi_requests_total', '{method="Controller.CreateVolume",code="OK"}'), 1);
    assert.equal(sample(after, 'arbor_csi_requests_total', '{method="Controller.DeleteVolume",code="INVALID_ARGUMENT"}'), 1);
    assert.equal(sample(after, 'arbor_volumes'), 1);
    assert.equal(sample(after, 'arbor_snapshots'), 0);
    assert.ok((sample(after, 'arbor_store_available_bytes') ?? 0) > 0);
    assert.ok((sample(after, 'arbor_store_commit_duration_seconds_count') ?? 0) >= 1, 'the flush committed');
    assert.ok(sample(after, 'arbor_process_resident_memory_bytes') !== undefined, 'process metrics are there');
  });

  it('answers 404 for anything but GET /metrics', async () => {
    const response = await fetch(metricsUrl().replace('/metrics', '/other'));
    assert.equal(response.status, 404);
    assert.match(await response.text(), /only GET \/metrics/);
  });

  it('an address it cannot listen on stops the command with a clear error', async () => {
    const taken = new URL(metricsUrl()).host;
    const result = await run(process.execPath, [cliPath, '--data-dir', path.join(suite.dir, 'other-data'), 'serve', '--metrics-listen', taken]);
    assert.equal(result.status, 1);
    assert.match(result.stderr, new RegExp(`--metrics-listen ${taken.replace(/[.[\]]/g, '\\$&')}: cannot listen \\(.*EADDRINUSE.*\\); choose another address`));
    const bad = await run(process.execPath, [cliPath, '--data-dir', path.join(suite.dir, 'other-data'), 'serve', '--metrics-listen', 'nowhere']);
    assert.equal(bad.status, 2);
    assert.match(bad.stderr, /--metrics-listen "nowhere" is not HOST:PORT \(e.g. 0.0.0.0:9820\)/);
  });
});
