import { openDataDir } from '../../store/embedded';
import { modelSuite } from '../support/store-model';

const operations = Number(process.env.ARBOR_MODEL_OPS ?? 10000);

modelSuite('store model: random operations against a reference model', operations, (dir) => openDataDir(dir));
// Object stores cannot rewrite a synced blob: the engine then writes every change to a
// synced extent into a new blob. The same model, with the file backend refusing rewrites.
modelSuite('store model, blobs immutable once synced (as in S3)', Math.ceil(operations / 3), (dir) => openDataDir(dir, undefined, { rewritableBlobs: false }));
