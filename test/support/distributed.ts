import crypto from 'node:crypto';
import path from 'node:path';
import { NbdClient } from '../../node-plugin/nbd/client';
import { ArborServer } from './arbor-server';
import { StoreLocation } from '../../store/open';
import { etcdForSuite, EtcdCluster, sleep } from './etcd';
import { Rgw, rgwForSuite } from './rgw';

export interface DistributedSuite {
  etcd: EtcdCluster;
  rgw: Rgw;
  /** A store of its own (etcd prefix and bucket named after `name`), its cache in `dir`. */
  location(name: string, dir: string): StoreLocation;
  /** The command-line options that name the same store, for `arbor` child processes. */
  args(location: StoreLocation): string[];
  /** The environment an `arbor` child process needs (S3 credentials). */
  env(): NodeJS.ProcessEnv;
}

/**
 * Real etcd and a real Ceph RGW for a whole mocha suite, started once in `before`
 * and stopped by PID in `after`. The S3 credentials go into this process's
 * environment (the store reads them from there, as in production).
 */
export function distributedForSuite(options: { etcdMembers?: 1 | 3 } = {}): DistributedSuite {
  const etcdSuite = etcdForSuite(options.etcdMembers ?? 1);
  const rgwSuite = rgwForSuite();
  const run = crypto.randomBytes(3).toString('hex');
  before(() => {
    Object.assign(process.env, rgwSuite.rgw.env());
    process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED = 'true';
  });
  const suite: DistributedSuite = {
    get etcd() {
      return etcdSuite.cluster;
    },
    get rgw() {
      return rgwSuite.rgw;
    },
    location(name, dir) {
      const hosts = etcdSuite.cluster.endpoints.map((e) => new URL(e).host).join(',');
      return {
        dataDir: path.join(dir, 'data'),
        storeUrl: `etcd://${hosts}/${name}-${run}`,
        blobsUrl: `s3://arbor-${name}-${run}/blobs/?endpoint=${encodeURIComponent(rgwSuite.rgw.endpoint)}&region=${rgwSuite.rgw.region}`,
        cacheDir: path.join(dir, 'cache'),
        cacheBytes: 64 * 1024 * 1024,
      };
    },
    args(location) {
      return ['--store', location.storeUrl!, '--blobs', location.blobsUrl!];
    },
    env() {
      return { ...process.env, ...rgwSuite.rgw.env(), AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: 'true' };
    },
  };
  return suite;
}

const blockBytes = 4096;

/** A 4 KiB block that names what wrote it: `tag` repeated (tags are unique per write). */
export function stamped(tag: number): Buffer {
  const buffer = Buffer.alloc(blockBytes);
  for (let at = 0; at < blockBytes; at += 4) buffer.writeUInt32LE(tag, at);
  return buffer;
}

/** The tag a block holds (0 for a block never written), or 'mixed' when it is torn. */
export function stampOf(data: Buffer): number | 'mixed' {
  const first = data.readUInt32LE(0);
  for (let at = 4; at < data.length; at += 4) if (data.readUInt32LE(at) !== first) return 'mixed';
  return first;
}

/**
 * Connects to a node's NBD socket. While the volume is owned by another live node (or
 * the catalog cannot be reached) the server refuses, so this retries until `withinMs`.
 */
export async function connectWithin(node: ArborServer, exportName: string, withinMs = 0): Promise<{ client: NbdClient; waitedMs: number; lastError?: string }> {
  const started = Date.now();
  let lastError: string | undefined;
  for (;;) {
    try {
      return { client: await NbdClient.connect({ socketPath: node.nbdSocket, exportName }), waitedMs: Date.now() - started, lastError };
    } catch (err) {
      lastError = (err as Error).message;
      if (Date.now() - started > withinMs)
        throw new Error(`no connection to ${exportName} on ${path.basename(path.dirname(node.dataDir))} within ${withinMs} ms: ${lastError}`);
      await sleep(200);
    }
  }
}
