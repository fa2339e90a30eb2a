import assert from 'node:assert/strict';
import { ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { csiClient } from '../../csi/client';
import { NbdClient } from '../../node-plugin/nbd/client';
import { cliPath } from '../support/arbor-server';
import { ok, run } from '../support/run';
import { tempDir } from '../support/tmp';

const repoRoot = path.join(__dirname, '../../..');

/** A process whose output is read as it comes, stopped by PID (never by name). */
interface Started {
  child: ChildProcess;
  output(): string;
  exited: Promise<number | null>;
  waitFor(pattern: RegExp, what: string): Promise<RegExpExecArray>;
}

function start(command: string, args: string[], env: NodeJS.ProcessEnv): Started {
  // stdin stays an open pipe: `script` forwards it to the pty, and stops at its end.
  const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'pipe'], env, cwd: repoRoot });
  let output = '';
  child.stdout.on('data', (chunk) => (output += chunk));
  child.stderr.on('data', (chunk) => (output += chunk));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return {
    child,
    output: () => output,
    exited,
    waitFor: (pattern, what) =>
      new Promise((resolve, reject) => {
        const timer = setInterval(() => {
          const match = pattern.exec(output);
          if (match) {
            clearInterval(timer);
            resolve(match);
          }
        }, 20);
        void exited.then((code) => {
          clearInterval(timer);
          reject(new Error(`exited ${code} before ${what}:\n${output}`));
        });
      }),
  };
}

/** The environment of a first run: no log level or data directory inherited from the test's own. */
function firstRunEnv(dataDir: string): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, ARBOR_DATA_DIR: dataDir };
  delete env.ARBOR_LOG_LEVEL;
  return env;
}

/**
 * Stops the server by its PID, then waits for what started it (npm, script) to end.
 * First a round trip to it (`arbor status`): its signal handlers are installed just
 * after it logs that it serves.
 */
async function stop(serverPid: number, started: Started, dataDir: string): Promise<void> {
  assert.match(await ok(process.execPath, [cliPath, 'status'], { env: firstRunEnv(dataDir) }), new RegExp(`pid ${serverPid}\\b`));
  process.kill(serverPid, 'SIGTERM');
  let timer: NodeJS.Timeout | undefined;
  const code = await Promise.race([started.exited, new Promise<string>((resolve) => (timer = setTimeout(() => resolve('timeout'), 10_000)))]);
  clearTimeout(timer);
  if (code === 'timeout' && started.child.exitCode === null) started.child.kill('SIGKILL');
  assert.equal(code, 0, `the server stops cleanly on SIGTERM:\n${started.output()}`);
}

async function checkSocketsAnswer(dataDir: string, exportNames: string[]): Promise<void> {
  const exports = await NbdClient.list({ socketPath: path.join(dataDir, 'nbd.sock') });
  assert.deepEqual(exports.map((e) => e.name).sort(), exportNames, 'the NBD socket in the data directory lists the volumes and snapshots');
  const csi = csiClient(path.join(dataDir, 'csi.sock'));
  try {
    const info = await csi.identity.GetPluginInfo({});
    assert.equal(info.name, 'csi.arbor.dev', 'the CSI socket in the data directory answers GetPluginInfo');
  } finally {
    csi.close();
  }
}

describe('the first run: `npm start` and `arbor serve` with no options', function () {
  this.timeout(30_000);
  let cleanups: Array<() => void> = [];
  afterEach(() => {
    for (const cleanup of cleanups) cleanup();
    cleanups = [];
  });
  const dataDirFor = () => {
    const temp = tempDir();
    cleanups.push(temp.cleanup);
    return path.join(temp.dir, 'data');
  };

  it("on a terminal, the README's `npm start` serves NBD and CSI in the data directory, prints where and what to try, and logs lines a person reads", async () => {
    const dataDir = dataDirFor();
    // Node has no pty: script(1) runs the command on one. --ignore-scripts skips only the build (prestart), done already.
    const started = start('script', ['-qfec', 'npm start --silent --ignore-scripts', '/dev/null'], firstRunEnv(dataDir));
    cleanups.push(() => {
      if (started.child.exitCode === null) started.child.kill('SIGKILL');
    });
    const [, pid] = await started.waitFor(/is serving the data directory .* \(pid (\d+),[\s\S]*Ctrl-C stops it/, 'the summary');
    const text = started.output().replace(/\r\n/g, '\n');
    assert.ok(text.includes(`NBD    ${path.join(dataDir, 'nbd.sock')}`), `the summary names the NBD socket:\n${text}`);
    assert.ok(text.includes(`CSI    unix://${path.join(dataDir, 'csi.sock')}`), `the summary names the CSI socket:\n${text}`);
    assert.ok(text.includes(`admin  ${path.join(dataDir, 'arbor.sock')}`), 'the summary names the admin socket');
    // Three commands to try: create, attach (qemu-io on the socket's URI), snapshot.
    assert.match(text, /node dist\/arbor\.js volume create disk --size 1GiB/);
    assert.ok(text.includes(`qemu-io -f raw -c 'write -P 0xab 0 1M' 'nbd+unix:///disk?socket=${path.join(dataDir, 'nbd.sock')}'`), 'an attach to try');
    assert.match(text, /node dist\/arbor\.js snapshot create disk@first/);
    // Log lines: time, level, message, key=value; no JSON.
    assert.match(text, /^\d\d:\d\d:\d\d\.\d{3} info {2}arbor serving .*nbdSocket=\S+nbd\.sock .*csiEndpoint=unix:\/\/\S+csi\.sock/m);
    assert.ok(!/^\{"/m.test(text), `no JSON log line on a terminal:\n${text}`);

    // The commands the summary suggests work, and the sockets answer.
    await ok(process.execPath, [cliPath, 'volume', 'create', 'disk', '--size', '1GiB'], { env: firstRunEnv(dataDir) });
    await ok('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 0 1M', `nbd+unix:///disk?socket=${path.join(dataDir, 'nbd.sock')}`]);
    await ok(process.execPath, [cliPath, 'snapshot', 'create', 'disk@first'], { env: firstRunEnv(dataDir) });
    await checkSocketsAnswer(dataDir, ['disk', 'disk@first']);
    await stop(Number(pid), started, dataDir);
  });

  it('without a terminal, logs JSON lines and prints no summary; --log-format text and json choose either way', async () => {
    const dataDir = dataDirFor();
    const plain = start(process.execPath, [cliPath, 'serve'], firstRunEnv(dataDir));
    const [line] = await plain.waitFor(/^\{.*"message":"arbor serving".*\}$/m, 'serving');
    const serving = JSON.parse(line) as { pid: number; nbdSocket: string; csiEndpoint: string; nodeId: string };
    assert.equal(serving.nbdSocket, path.join(dataDir, 'nbd.sock'));
    assert.equal(serving.csiEndpoint, `unix://${path.join(dataDir, 'csi.sock')}`);
    assert.ok(serving.nodeId.length > 0, 'the node id defaults to the host name');
    for (const l of plain.output().trim().split('\n')) assert.doesNotThrow(() => JSON.parse(l), `every line is JSON: ${l}`);
    assert.ok(!plain.output().includes('Try, in another terminal'), 'no summary without a terminal');
    await ok(process.execPath, [cliPath, 'volume', 'create', 'disk', '--size', '16MiB'], { env: firstRunEnv(dataDir) });
    await checkSocketsAnswer(dataDir, ['disk']);
    await stop(serving.pid, plain, dataDir);

    // Text without a terminal, asked for.
    const text = start(process.execPath, [cliPath, '--log-format', 'text', 'serve'], firstRunEnv(dataDir));
    const [, pid] = await text.waitFor(/^\d\d:\d\d:\d\d\.\d{3} info {2}arbor serving .*pid=(\d+)/m, 'serving');
    await stop(Number(pid), text, dataDir);

    // JSON on a terminal, asked for (the summary is still for the person there).
    const onPty = start('script', ['-qfec', `${process.execPath} ${cliPath} --log-format json serve`, '/dev/null'], firstRunEnv(dataDir));
    cleanups.push(() => {
      if (onPty.child.exitCode === null) onPty.child.kill('SIGKILL');
    });
    const [json] = await onPty.waitFor(/^\{.*"message":"arbor serving".*\}\r?$/m, 'serving');
    await onPty.waitFor(/Ctrl-C stops it/, 'the summary');
    await stop((JSON.parse(json) as { pid: number }).pid, onPty, dataDir);

    const bad = await run(process.execPath, [cliPath, '--log-format', 'yaml', 'serve'], { env: firstRunEnv(dataDir) });
    assert.equal(bad.status, 2);
    assert.match(bad.stderr, /--log-format yaml is not one of json, text/);
  });

  it('serves only the sockets the command line names once it names one, as before', async () => {
    const dataDir = dataDirFor();
    const nbdSocket = path.join(path.dirname(dataDir), 'elsewhere.sock');
    const server = start(process.execPath, [cliPath, 'serve', '--nbd-socket', nbdSocket], firstRunEnv(dataDir));
    const [line] = await server.waitFor(/^\{.*"message":"arbor serving".*\}$/m, 'serving');
    const serving = JSON.parse(line) as { pid: number; nbdSocket: string; csiEndpoint?: string };
    assert.equal(serving.nbdSocket, nbdSocket);
    assert.equal(serving.csiEndpoint, undefined, 'no CSI unless asked');
    assert.ok(!fs.existsSync(path.join(dataDir, 'nbd.sock')) && !fs.existsSync(path.join(dataDir, 'csi.sock')));
    await stop(serving.pid, server, dataDir);
  });
});
