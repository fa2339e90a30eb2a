import path from 'node:path';
import { openStore } from '../../store/open';
import { distributedForSuite } from '../support/distributed';
import { modelSuite } from '../support/store-model';

const operations = Number(process.env.ARBOR_DIST_MODEL_OPS ?? 1500);

/** The whole store model, on etcd and Ceph RGW instead of the embedded backend. */
describe('the store on etcd and S3 (real etcd, real Ceph RGW)', function () {
  this.timeout(10 * 60 * 1000);
  const servers = distributedForSuite();
  modelSuite(`store model on etcd + RGW`, operations, (dir) =>
    openStore({ ...servers.location('model', dir), cacheDir: path.join(dir, 'cache'), leaseTtlMs: 5000 }, { nodeId: 'model-node' }),
  );
});
