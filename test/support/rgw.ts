import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Daemon, daemonTempDir, freePorts, httpStatus, parseJson, requireCommands, secondsSince, spawnDaemon, waitFor, withFreshPorts } from './etcd';
import { run } from './run';

/*
 * A real S3 endpoint for tests: a one-host Ceph cluster (one ceph-mon, one ceph-osd on
 * memstore, radosgw with beast) in a temporary directory, on free loopback ports,
 * without authentication between the daemons. Debian bookworm's Ceph 16.2.
 */

const GiB = 1024 * 1024 * 1024;
const defaultCapacityBytes = 2 * GiB;
const monWithinMs = 30_000;
const osdWithinMs = 60_000;
const rgwWithinMs = 90_000;
const commandTimeoutMs = 15_000;
const region = 'us-east-1';

export interface Rgw {
  /** 'http://127.0.0.1:PORT'; use path-style addressing. */
  endpoint: string;
  region: string;
  accessKeyId: string;
  secretAccessKey: string;
  /** AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION, for a child process. */
  env(): Record<string, string>;
  /** Stops radosgw, then the OSD, then the monitor, by PID; waits for each; removes the directory. */
  stop(): Promise<void>;
}

export interface RgwOptions {
  /** What the memstore OSD holds before writes hang (they do not fail: see the S3 client's timeouts). */
  capacityBytes?: number;
}

/** Starts mon, OSD and radosgw, creates an S3 user with fresh keys, and resolves once S3 answers. */
export function startRgw(options: RgwOptions = {}): Promise<Rgw> {
  requireCommands(['ceph-mon', 'ceph-osd', 'radosgw', 'radosgw-admin', 'monmaptool', 'ceph'], 'ceph-mon ceph-osd radosgw');
  const capacityBytes = options.capacityBytes ?? defaultCapacityBytes;
  if (!Number.isSafeInteger(capacityBytes) || capacityBytes < 256 * 1024 * 1024) {
    throw new Error(`rgw: capacityBytes ${capacityBytes} must be a whole number of at least 256 MiB`);
  }
  return withFreshPorts(() => bringUp(capacityBytes));
}

async function bringUp(capacityBytes: number): Promise<Rgw> {
  const t0 = Date.now();
  const temp = daemonTempDir('arbor-rgw-');
  const dir = temp.dir;
  const [monV2Port, monV1Port, rgwPort] = await freePorts(3);
  const monAddrs = `[v2:127.0.0.1:${monV2Port},v1:127.0.0.1:${monV1Port}]`;
  const endpoint = `http://127.0.0.1:${rgwPort}`;
  const conf = path.join(dir, 'ceph.conf');
  for (const sub of ['run', 'log', 'crash', 'osd.0']) fs.mkdirSync(path.join(dir, sub));
  const fsid = crypto.randomUUID();
  fs.writeFileSync(conf, cephConf(dir, fsid, monAddrs, rgwPort, capacityBytes));
  process.stderr.write(`rgw: starting ceph-mon, ceph-osd (memstore ${(capacityBytes / GiB).toFixed(1)} GiB) and radosgw in ${dir}\n`);

  const ceph = (...args: string[]) => run('ceph', ['-c', conf, '--connect-timeout', '5', ...args], { timeoutMs: commandTimeoutMs });
  const out = (name: string) => path.join(dir, 'log', `${name}.out`);
  const ownLog = (name: string) => path.join(dir, 'log', `${name}.log`);
  const daemons: Daemon[] = [];
  const lap = lapTimer();
  let stopped: Promise<void> | undefined;
  const stop = () =>
    (stopped ??= (async () => {
      try {
        for (const daemon of [...daemons].reverse()) await daemon.stop();
      } finally {
        temp.cleanup();
      }
    })());

  try {
    const monmap = path.join(dir, 'monmap');
    await step('monmaptool', ['--create', '--clobber', '--fsid', fsid, '--addv', 'a', monAddrs, monmap]);
    await step('ceph-mon', ['-c', conf, '--mkfs', '-i', 'a', '--monmap', monmap]);
    const mon = spawnDaemon('ceph-mon', 'ceph-mon', ['-c', conf, '-i', 'a', '-f'], out('mon.a'), [ownLog('mon.a')]);
    daemons.push(mon);
    await waitFor(`ceph-mon at ${monAddrs}`, monWithinMs, mon, async () => (await ceph('mon', 'stat')).status === 0);
    lap('mon');

    const osdUuid = crypto.randomUUID();
    const osdId = (await step('ceph', ['-c', conf, 'osd', 'new', osdUuid])).trim();
    if (osdId !== '0') throw new Error(`the first OSD got id ${osdId}, expected 0`);
    await step('ceph-osd', ['-c', conf, '-i', '0', '--mkfs', '--osd-uuid', osdUuid]);
    const osd = spawnDaemon('ceph-osd', 'ceph-osd', ['-c', conf, '-i', '0', '-f'], out('osd.0'), [ownLog('osd.0')]);
    daemons.push(osd);
    await waitFor('ceph-osd up', osdWithinMs, osd, async () => osdsUp(await ceph('osd', 'stat', '-f', 'json')) >= 1, daemons);
    lap('osd');

    // Its first start creates the RGW pools, one monitor proposal each: hence the short paxos interval.
    const rgw = spawnDaemon('radosgw', 'radosgw', ['-c', conf, '-n', 'client.rgw.a', '-f'], out('client.rgw.a'), [ownLog('client.rgw.a')]);
    daemons.push(rgw);
    await waitFor(`radosgw at ${endpoint}`, rgwWithinMs, rgw, async () => (await httpStatus(`${endpoint}/`)) !== undefined, daemons);
    lap('radosgw');

    const accessKeyId = crypto.randomBytes(10).toString('hex').toUpperCase();
    const secretAccessKey = crypto.randomBytes(20).toString('hex');
    const user = await step('radosgw-admin', [
      '-c',
      conf,
      'user',
      'create',
      '--uid',
      'arbor',
      '--display-name',
      'Arbor tests',
      '--access-key',
      accessKeyId,
      '--secret-key',
      secretAccessKey,
    ]);
    if (!user.includes(accessKeyId)) throw new Error(`radosgw-admin user create did not report the key:\n${user}`);
    lap('user');

    process.stderr.write(`rgw: up in ${secondsSince(t0)} s at ${endpoint} (${lap.summary()})\n`);
    return {
      endpoint,
      region,
      accessKeyId,
      secretAccessKey,
      env: () => ({ AWS_ACCESS_KEY_ID: accessKeyId, AWS_SECRET_ACCESS_KEY: secretAccessKey, AWS_REGION: region }),
      stop,
    };
  } catch (error) {
    await stop();
    throw new Error(`rgw: bring-up failed after ${secondsSince(t0)} s: ${(error as Error).message}`);
  }
}

/**
 * What a one-host cluster needs; each line not obvious is there because without it
 * something hangs or crawls (measured, see the comments).
 */
function cephConf(dir: string, fsid: string, monAddrs: string, rgwPort: number, capacityBytes: number): string {
  return `[global]
fsid = ${fsid}
mon host = ${monAddrs}
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
# Without it radosgw with auth none hangs forever at start.
ms mon client mode = crc
run dir = ${dir}/run
admin socket = ${dir}/run/$name.$pid.asok
log file = ${dir}/log/$name.log
pid file = ${dir}/run/$name.pid
crash dir = ${dir}/crash
mon data = ${dir}/$name
osd data = ${dir}/$name
rgw data = ${dir}/$name
keyring = ${dir}/keyring
osd objectstore = memstore
memstore device bytes = ${capacityBytes}
# Without it a restarted OSD leaves radosgw requests hanging.
osd fast shutdown = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon max pg per osd = 1000
mon data avail warn = 1
mon data avail crit = 0
# radosgw's first start takes ~1.5 s instead of ~9 s.
paxos propose interval = 0.1

[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:${rgwPort} tcp_nodelay=1
rgw thread pool size = 64
# Lifecycle workers sleep 5 s at a time and SIGTERM waits for them; tests need no lifecycle.
rgw enable lc threads = false
`;
}

/** Runs a setup command; when it fails, the error carries the end of its output (Ceph dumps whole backtraces). */
async function step(command: string, args: string[]): Promise<string> {
  const result = await run(command, args, { timeoutMs: commandTimeoutMs });
  if (result.status === 0) return result.stdout;
  const output = `${result.stderr}${result.stdout}`.trimEnd().split('\n').slice(-25).join('\n');
  throw new Error(`${command} ${args.join(' ')} exited ${result.status ?? 'on a signal (timeout?)'}; last lines:\n${output}`);
}

function osdsUp(result: { status: number | null; stdout: string }): number {
  const stat = result.status === 0 ? (parseJson(result.stdout) as { num_up_osds?: unknown } | undefined) : undefined;
  return Number(stat?.num_up_osds) || 0;
}

/** Records how long each step took since the previous one. */
function lapTimer(): ((step: string) => void) & { summary(): string } {
  const laps: string[] = [];
  let last = Date.now();
  const lap = (step: string) => {
    laps.push(`${step} ${secondsSince(last)} s`);
    last = Date.now();
  };
  return Object.assign(lap, { summary: () => laps.join(', ') });
}

/**
 * One RGW for a whole mocha suite: started in `before`, stopped by PID in `after`.
 * Read `rgw` inside tests; give each test a bucket of its own (s3-bucket.ts).
 */
export function rgwForSuite(options: RgwOptions = {}): { rgw: Rgw } {
  const suite = {} as { rgw: Rgw };
  before(async function () {
    this.timeout(monWithinMs + osdWithinMs + rgwWithinMs + 4 * commandTimeoutMs);
    suite.rgw = await startRgw(options);
  });
  after(async function () {
    this.timeout(60_000);
    await suite.rgw?.stop();
  });
  return suite;
}
