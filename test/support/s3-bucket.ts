import crypto from 'node:crypto';
import { CreateBucketCommand, S3Client } from '@aws-sdk/client-s3';
import { Rgw } from './rgw';

const connectionTimeoutMs = 2_000;
// A full or stopped OSD makes RGW writes hang rather than fail: only a timeout ends them.
const defaultRequestTimeoutMs = 15_000;
const defaultMaxAttempts = 2;

/** An S3 client for an RGW: path-style, checksums only where S3 requires them, every request bounded in time. */
export function s3ClientFor(rgw: Rgw, options: { requestTimeoutMs?: number; maxAttempts?: number } = {}): S3Client {
  // The SDK is pinned to a release that supports Node 20; its notice that later ones
  // will not would otherwise interrupt every test run.
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
  return new S3Client({
    endpoint: rgw.endpoint,
    region: rgw.region,
    credentials: { accessKeyId: rgw.accessKeyId, secretAccessKey: rgw.secretAccessKey },
    forcePathStyle: true,
    // Otherwise streamed bodies go out with aws-chunked checksums, which RGW 16 answers with 411.
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
    maxAttempts: options.maxAttempts ?? defaultMaxAttempts,
    requestHandler: {
      connectionTimeout: connectionTimeoutMs,
      requestTimeout: options.requestTimeoutMs ?? defaultRequestTimeoutMs,
      throwOnRequestTimeout: true,
    },
  });
}

/** Creates a bucket with a name no other test uses and returns the name. */
export async function createUniqueBucket(client: S3Client, prefix = 'arbor-test'): Promise<string> {
  const bucket = `${prefix}-${Date.now().toString(36)}-${crypto.randomBytes(4).toString('hex')}`;
  if (!/^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$/.test(bucket)) throw new Error(`bucket name ${bucket} is not a valid S3 bucket name`);
  await client.send(new CreateBucketCommand({ Bucket: bucket }));
  return bucket;
}

/**
 * A client for the suite's RGW and a fresh bucket for every test (made in
 * `beforeEach`; buckets are not emptied: the cluster is discarded after the suite).
 * Read `client` and `bucket` inside tests.
 */
export function bucketForEachTest(suite: { rgw: Rgw }): { client: S3Client; bucket: string } {
  const state = {} as { client: S3Client; bucket: string };
  beforeEach(async () => {
    state.client ??= s3ClientFor(suite.rgw);
    state.bucket = await createUniqueBucket(state.client);
  });
  after(() => state.client?.destroy());
  return state;
}
