/**
 * Two Arbor nodes in embedded mode, as a migration sees them: the data node
 * (`arbor serve`, NBD over TCP and the admin API for other nodes, mutual TLS) and a
 * node without the data (`arbor node --relay-to`) that serves every volume on its own
 * unix socket by relaying NBD to the data node. Each node's unix socket (`nbdSocket`,
 * the same path across a restart) stands in for the /dev/nbdX a VM on that node
 * would be given.
 *
 * Real processes on loopback, certificates from a private CA made with openssl. The
 * data node can be restarted on the same ports and data directory.
 */
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { ArborServer, startServer } from '../arbor-server';
import { issue, makeCa, NodeCertificate } from '../certs';
import { freePorts, withFreshPorts } from '../etcd';

export interface DataNodeRestart {
  /** Exit status of the SIGTERMed data node (0: a clean stop). */
  exitCode: number | null;
  /** performance.now() when SIGTERM was sent, when the process had exited, when the new one said it serves. */
  stoppedAtMs: number;
  exitedAtMs: number;
  servingAtMs: number;
}

export interface EmbeddedNodes {
  /** The data node; a new process after `restartDataNode`. */
  readonly dataNode: ArborServer;
  /** The node without the data, relaying to the data node. */
  readonly relayNode: ArborServer;
  /** SIGTERM to the data node, `pauseMs` with no data node, then the same command on the same ports and data directory. */
  restartDataNode(pauseMs: number): Promise<DataNodeRestart>;
  /** SIGTERM to both (relay first); their exit statuses. */
  stop(): Promise<{ relay: number | null; data: number | null }>;
}

const tlsArgs = (cert: NodeCertificate) => ['--tls-cert', cert.certFile, '--tls-key', cert.keyFile, '--tls-ca', cert.caFile];

/** Starts the data node in `dir`/data and the relay node ('relay-1') in `dir`/relay; `dir` is the caller's to remove. */
export async function startEmbeddedNodes(dir: string): Promise<EmbeddedNodes> {
  const certsDir = path.join(dir, 'certs');
  const cert = await issue(certsDir, await makeCa(certsDir, 'cluster'), 'node');
  const dataDir = path.join(dir, 'data');
  const relayDir = path.join(dir, 'relay');
  let nbdPort = 0;
  let adminPort = 0;
  const startDataNode = () =>
    startServer(dataDir, [
      '--node-id', 'data-node',
      '--csi-endpoint', `unix://${path.join(dataDir, 'csi.sock')}`,
      '--nbd-listen', `127.0.0.1:${nbdPort}`,
      '--admin-listen', `127.0.0.1:${adminPort}`,
      ...tlsArgs(cert),
    ]); // prettier-ignore
  let dataNode = await withFreshPorts(async () => {
    [nbdPort, adminPort] = await freePorts(2);
    return startDataNode();
  });
  let relayNode: ArborServer;
  try {
    relayNode = await startServer(
      relayDir,
      [
        '--node-id', 'relay-1',
        '--csi-endpoint', `unix://${path.join(relayDir, 'csi.sock')}`,
        '--relay-to', `127.0.0.1:${nbdPort}`,
        '--relay-admin', `127.0.0.1:${adminPort}`,
        ...tlsArgs(cert),
      ],
      'node',
    ); // prettier-ignore
  } catch (err) {
    await dataNode.stop();
    throw err;
  }
  return {
    get dataNode() {
      return dataNode;
    },
    relayNode,
    async restartDataNode(pauseMs) {
      const stoppedAtMs = performance.now();
      const exitCode = await dataNode.stop();
      const exitedAtMs = performance.now();
      await new Promise((resolve) => setTimeout(resolve, pauseMs));
      dataNode = await startDataNode();
      return { exitCode, stoppedAtMs, exitedAtMs, servingAtMs: performance.now() };
    },
    async stop() {
      const relay = await relayNode.stop();
      return { relay, data: await dataNode.stop() };
    },
  };
}
