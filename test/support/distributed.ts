import crypto from 'node:crypto';
import path from 'node:path';
import { StoreLocation } from '../../store/open';
import { etcdForSuite, EtcdCluster } from './etcd';
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
