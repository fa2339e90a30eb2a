import crypto from 'node:crypto';
import {
  CreateBucketCommand,
  DeleteObjectsCommand,
  GetObjectCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
} from '@aws-sdk/client-s3';
import { runBounded } from '../../lib/bounded';
import { Log, silentLog } from '../../lib/logger';
import { s3Requests } from '../../lib/metrics';
import { bytesOfClass, classOf, sizeClassCount } from '../blob-id';
import { ArborError, assert } from '../errors';
import {
  s3ConnectTimeoutMs,
  s3DeleteBatchKeys,
  s3DeleteConcurrency,
  s3MaxAttempts,
  s3MaxSockets,
  s3RequestTimeoutMs,
  s3SocketIdleTimeoutMs,
  s3UploadConcurrency,
} from '../limits';
import { BlobCache } from './blob-cache';
import { BlobStore } from './blobs';
import { BlobsLocation, idOfKey, objectKey, parseBlobsUrl } from './s3-url';

export interface S3BlobStoreOptions {
  /** `s3://bucket/prefix?endpoint=…&region=…`, or what `parseBlobsUrl` made of one. */
  location: string | BlobsLocation;
  /** The node-local cache directory; one store at a time (it is locked). */
  cacheDir: string;
  /** What the cache may hold; blobs staged for upload count, and go above it when they must. */
  cacheBytes: number;
  log?: Log;
  /** Create the bucket when it is missing (default true). */
  createBucket?: boolean;
  /** Per try of a request, and per silence of its socket (default `s3RequestTimeoutMs`); tests shorten it. */
  requestTimeoutMs?: number;
}

/**
 * Blobs as S3 objects, one per blob, each written once: a blob's writes gather in a
 * staged file of the node-local cache, and `sync` uploads it with `If-None-Match: *`,
 * so an object, once there, never changes. Reads come from the cache, or fetch the
 * whole object once and keep it there.
 *
 * Because objects never change, a cached copy is never stale: nothing is ever
 * invalidated, on this node or any other, and a cache survives restarts.
 *
 * The engine guarantees (rewritable = false) that a blob is never written after a
 * sync included it. Breaking that is a bug and fails loudly: a write to a blob known
 * to be synced throws at once; one this process cannot know about (evicted, or
 * uploaded by another process) fails at its sync, when the conditional upload finds
 * the object there with other bytes. Nothing is ever overwritten.
 * Keys spread blobs over many key prefixes (`objectKey`).
 */
export class S3BlobStore implements BlobStore {
  readonly rewritable = false;
  /** Uploads in flight by blob id; a second sync of the same blob waits for the first. */
  private readonly uploads = new Map<number, Promise<void>>();
  /** Fetches in flight by blob id: concurrent misses share one GET. */
  private readonly fetches = new Map<number, Promise<Buffer | undefined>>();
  /** Blobs deleted while their fetch was in flight: the fetched bytes must not be cached. */
  private readonly voidedFetches = new Set<number>();
  private readonly uploadSlots = new Slots(s3UploadConcurrency);
  private readonly requestCounts = new Map<string, number>();
  private closed = false;

  private constructor(
    readonly location: BlobsLocation,
    private readonly client: S3Client,
    private readonly cache: BlobCache,
    private readonly log: Log,
  ) {
    // Counts and times every HTTP request, retries included (the deserialize step runs once per try).
    client.middlewareStack.add(
      (next, context) => async (args) => {
        const command = (context.commandName ?? 'unknown').replace(/Command$/, '');
        this.requestCounts.set(command, (this.requestCounts.get(command) ?? 0) + 1);
        const timer = s3Requests.startTimer({ operation: command });
        try {
          const output = await next(args);
          timer({ status: String((output.response as { statusCode?: number } | undefined)?.statusCode ?? 'none') });
          return output;
        } catch (err) {
          timer({ status: String(statusOf(err) ?? 'none') });
          throw err;
        }
      },
      { step: 'deserialize', name: 'arborRequestCount' },
    );
  }

  /** Locks the cache directory, then checks the bucket (creating it when missing and allowed). */
  static async open(options: S3BlobStoreOptions): Promise<S3BlobStore> {
    const location = typeof options.location === 'string' ? parseBlobsUrl(options.location) : options.location;
    const log = options.log ?? silentLog;
    const cache = BlobCache.open({ dir: options.cacheDir, capacityBytes: options.cacheBytes, log });
    let client: S3Client | undefined;
    try {
      client = createClient(location, options.requestTimeoutMs ?? s3RequestTimeoutMs);
      const store = new S3BlobStore(location, client, cache, log);
      await store.ensureBucket(options.createBucket ?? true);
      log.info('S3 blob store open', { bucket: location.bucket, prefix: location.prefix, endpoint: location.endpoint, cacheDir: options.cacheDir });
      return store;
    } catch (err) {
      cache.close();
      client?.destroy();
      throw err;
    }
  }

  /** HTTP requests sent for an S3 operation ('PutObject', 'GetObject', …), retries included. */
  requestsSent(operation: string): number {
    return this.requestCounts.get(operation) ?? 0;
  }

  cacheStats(): ReturnType<BlobCache['stats']> {
    return this.cache.stats();
  }

  readNow(id: number, offset: number, target: Buffer, targetOffset: number, length: number): boolean {
    this.checkOpen();
    checkRange(id, offset, length, 'read');
    return this.cache.read(id, offset, target, targetOffset, length);
  }

  async read(id: number, offset: number, target: Buffer, targetOffset: number, length: number): Promise<void> {
    this.checkOpen();
    checkRange(id, offset, length, 'read');
    if (this.cache.read(id, offset, target, targetOffset, length)) return;
    const object = await this.fetch(id);
    // A missing object reads as zeros: a blob never written has none.
    const available = object ? Math.max(0, Math.min(length, object.length - offset)) : 0;
    if (object && available > 0) object.copy(target, targetOffset, offset, offset + available);
    if (available < length) target.fill(0, targetOffset + available, targetOffset + length);
  }

  async write(id: number, offset: number, source: Buffer, sourceOffset: number, length: number): Promise<void> {
    this.writeNow(id, offset, source, sourceOffset, length);
  }

  /** Writes go to the local staged copy (uploaded at sync): always at once. */
  writeNow(id: number, offset: number, source: Buffer, sourceOffset: number, length: number): void {
    this.checkOpen();
    checkRange(id, offset, length, 'write');
    const state = this.cache.state(id);
    if (state === 'sealed' || state === 'clean') {
      throw new ArborError(
        'internal',
        `blob ${id} was written after it was synced (${this.where(objectKey(this.location.prefix, id))}): objects are written once; the write was refused`,
      );
    }
    this.cache.writeStaged(id, offset, source, sourceOffset, length);
  }

  async sync(ids: Iterable<number>): Promise<void> {
    this.checkOpen();
    const pending: Promise<void>[] = [];
    // Every blob is sealed before the first await: a write that comes after this call is refused.
    for (const id of new Set(ids)) {
      const inFlight = this.uploads.get(id);
      if (inFlight) {
        pending.push(inFlight);
        continue;
      }
      const state = this.cache.state(id);
      if (state !== 'staged' && state !== 'sealed') continue; // uploaded already, or never written here
      this.cache.seal(id);
      const upload = this.upload(id).finally(() => this.uploads.delete(id));
      this.uploads.set(id, upload);
      pending.push(upload);
    }
    const results = await Promise.allSettled(pending);
    const failed = results.find((result): result is PromiseRejectedResult => result.status === 'rejected');
    if (failed) throw failed.reason;
  }

  async delete(ids: Iterable<number>): Promise<void> {
    this.checkOpen();
    const unique = [...new Set(ids)];
    // An upload racing a delete would bring the object back after it.
    await Promise.allSettled(unique.map((id) => this.uploads.get(id)).filter((upload) => upload !== undefined));
    for (const id of unique) {
      if (this.fetches.has(id)) this.voidedFetches.add(id);
      this.cache.drop(id);
    }
    const batches: string[][] = [];
    for (let i = 0; i < unique.length; i += s3DeleteBatchKeys) {
      batches.push(unique.slice(i, i + s3DeleteBatchKeys).map((id) => objectKey(this.location.prefix, id)));
    }
    await runBounded(
      batches.map((keys) => async () => {
        let errors: Array<{ Key?: string; Code?: string; Message?: string }> | undefined;
        try {
          const out = await this.client.send(
            new DeleteObjectsCommand({ Bucket: this.location.bucket, Delete: { Objects: keys.map((Key) => ({ Key })), Quiet: true } }),
          );
          errors = out.Errors?.filter((error) => error.Code !== 'NoSuchKey');
        } catch (err) {
          throw this.failure(err, `deleting ${keys.length} objects (${keys[0]} …)`, keys[0]);
        }
        if (errors && errors.length > 0) {
          const first = errors[0];
          throw new ArborError(
            'unavailable',
            `${this.where(first.Key ?? keys[0])}: deleting it failed (${first.Code ?? 'unknown error'}: ${first.Message ?? 'no message'})` +
              (errors.length > 1 ? `, and ${errors.length - 1} more keys of the same batch` : ''),
          );
        }
      }),
      s3DeleteConcurrency,
    );
  }

  async list(): Promise<number[]> {
    this.checkOpen();
    const ids = new Set(this.cache.stagedIds());
    await this.listObjects((id) => ids.add(id));
    return [...ids];
  }

  async usage(): Promise<{ blobs: number; bytes: number }> {
    this.checkOpen();
    let blobs = 0;
    let bytes = 0;
    await this.listObjects((_id, size) => {
      blobs++;
      bytes += size;
    });
    return { blobs, bytes };
  }

  async availableBytes(): Promise<undefined> {
    return undefined;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.allSettled([...this.uploads.values(), ...this.fetches.values()]);
    this.cache.close();
    this.client.destroy();
  }

  private async upload(id: number): Promise<void> {
    const key = objectKey(this.location.prefix, id);
    await this.uploadSlots.acquire();
    try {
      const body = this.cache.stagedContents(id);
      const md5 = crypto.createHash('md5').update(body).digest();
      try {
        await this.client.send(
          new PutObjectCommand({
            Bucket: this.location.bucket,
            Key: key,
            Body: body,
            ContentLength: body.length,
            // The server checks the bytes it stored against ours.
            ContentMD5: md5.toString('base64'),
            // Write-once: never replace an object (atomic on RGW and S3).
            IfNoneMatch: '*',
          }),
        );
      } catch (err) {
        const status = statusOf(err);
        // 412: the object exists, typically because a try whose answer was lost did land.
        // 409: a concurrent conditional write of the same key. Either way, look.
        if (status !== 412 && status !== 409) throw this.failure(err, `uploading blob ${id}`, key);
        await this.confirmLanded(id, key, md5, status);
      }
      this.cache.promote(id);
    } finally {
      this.uploadSlots.release();
    }
  }

  /** The object exists after a refused conditional upload: fine only if it holds our bytes. */
  private async confirmLanded(id: number, key: string, md5: Buffer, status: number): Promise<void> {
    let etag: string | undefined;
    try {
      etag = (await this.client.send(new HeadObjectCommand({ Bucket: this.location.bucket, Key: key }))).ETag;
    } catch (err) {
      if (statusOf(err) === 404) {
        throw new ArborError(
          'unavailable',
          `${this.where(key)}: uploading blob ${id} met a conflicting write (HTTP ${status}), and no object is there; sync again`,
        );
      }
      throw this.failure(err, `checking blob ${id} after its upload was refused (HTTP ${status})`, key);
    }
    // A single-part upload's ETag is the MD5 of its bytes.
    if (etag?.replace(/"/g, '').toLowerCase() === md5.toString('hex')) {
      this.log.debug('an earlier try of an upload had landed', { blob: id, key });
      return;
    }
    throw new ArborError(
      'internal',
      `${this.where(key)} already holds other bytes than blob ${id} (ETag ${etag ?? 'none'}, ours "${md5.toString('hex')}"): ` +
        'blobs are written once, so either the blob was written after it was synced or another store uses this bucket and prefix; nothing was overwritten',
    );
  }

  /** The whole object, or undefined when there is none; concurrent calls for one id share one GET. */
  private fetch(id: number): Promise<Buffer | undefined> {
    let pending = this.fetches.get(id);
    if (!pending) {
      pending = this.download(id).finally(() => {
        this.fetches.delete(id);
        this.voidedFetches.delete(id);
      });
      this.fetches.set(id, pending);
    }
    return pending;
  }

  private async download(id: number): Promise<Buffer | undefined> {
    const key = objectKey(this.location.prefix, id);
    let object: Buffer;
    try {
      const out = await this.client.send(new GetObjectCommand({ Bucket: this.location.bucket, Key: key }));
      assert(out.Body, `a GetObject answer for ${key} carries a body`);
      const bytes = await out.Body.transformToByteArray();
      object = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    } catch (err) {
      // Not cached: the 404 costs a request only when something reads a blob that has no
      // object, which the engine does not do, and an object may appear later (a blob
      // uploaded by the process that owns it now).
      if (statusOf(err) === 404) return undefined;
      throw this.failure(err, `reading blob ${id}`, key);
    }
    if (object.length > bytesOfClass(classOf(id))) {
      throw new ArborError(
        'internal',
        `${this.where(key)} holds ${object.length} bytes, more than blob ${id}'s size class allows (${bytesOfClass(classOf(id))})`,
      );
    }
    // Not kept when the blob was deleted meanwhile, or written here (a bug the upload reports).
    if (!this.closed && !this.voidedFetches.has(id) && this.cache.state(id) === undefined) this.cache.insertClean(id, object);
    return object;
  }

  /** Calls `visit` for every blob object under the prefix, page by page. */
  private async listObjects(visit: (id: number, bytes: number) => void): Promise<void> {
    let token: string | undefined;
    do {
      let page;
      try {
        page = await this.client.send(new ListObjectsV2Command({ Bucket: this.location.bucket, Prefix: this.location.prefix, ContinuationToken: token }));
      } catch (err) {
        throw this.failure(err, 'listing the blobs', this.location.prefix);
      }
      for (const object of page.Contents ?? []) {
        const id = object.Key === undefined ? undefined : idOfKey(this.location.prefix, object.Key);
        if (id !== undefined) visit(id, object.Size ?? 0);
      }
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token !== undefined);
  }

  private async ensureBucket(create: boolean): Promise<void> {
    const { bucket } = this.location;
    try {
      await this.client.send(new HeadBucketCommand({ Bucket: bucket }));
      return;
    } catch (err) {
      if (statusOf(err) !== 404) throw this.failure(err, 'checking that the bucket exists');
    }
    if (!create) throw new ArborError('not-found', `bucket ${bucket} does not exist at ${this.endpointName()}; create it, or let the store create it`);
    try {
      await this.client.send(new CreateBucketCommand({ Bucket: bucket }));
      this.log.info('created the bucket', { bucket, endpoint: this.location.endpoint });
    } catch (err) {
      // Another node created it at the same moment.
      if (errorName(err) === 'BucketAlreadyOwnedByYou') return;
      throw this.failure(err, 'creating the missing bucket');
    }
  }

  /** An SDK error as an ArborError with a sentence naming the bucket, the key and what failed. */
  private failure(err: unknown, what: string, key?: string): ArborError {
    if (err instanceof ArborError) return err;
    const status = statusOf(err);
    // Answers without a body (HEAD) leave the SDK only 'Unknown' for a name.
    const name = ['Unknown', 'UnknownError'].includes(errorName(err)) ? '' : ` ${errorName(err)}`;
    const attempts = (err as { $metadata?: { attempts?: number } } | undefined)?.$metadata?.attempts;
    const tries = attempts && attempts > 1 ? ` after ${attempts} tries` : '';
    const where = this.where(key);
    if (errorName(err) === 'CredentialsProviderError') {
      return new ArborError(
        'failed-precondition',
        `${where}: ${what} failed: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or provide a shared credentials file`,
      );
    }
    if (status === 403) {
      return new ArborError(
        'failed-precondition',
        `${where}: ${what} failed: access denied (HTTP 403${name}); the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the shared credentials file) do not allow it`,
      );
    }
    if (status === 501) return new ArborError('unsupported', `${where}: ${what} failed: the object store does not implement it (HTTP 501${name})`);
    if (status === undefined || status >= 500 || status === 408 || status === 429) {
      const cause = status === undefined ? `${errorName(err)}: ${errorMessage(err)}` : `HTTP ${status}${name}`;
      return new ArborError('unavailable', `${where}: ${what} failed${tries} (${cause})`);
    }
    return new ArborError('failed-precondition', `${where}: ${what} was refused (HTTP ${status}${name}: ${errorMessage(err)})`);
  }

  /** 's3://bucket/key at http://host:port' (the prefix without a key), for messages. */
  private where(key?: string): string {
    return `s3://${this.location.bucket}/${key ?? this.location.prefix} at ${this.endpointName()}`;
  }

  private endpointName(): string {
    return this.location.endpoint ?? `AWS S3 (${this.location.region})`;
  }

  private checkOpen(): void {
    if (this.closed) throw new ArborError('unavailable', 'the blob store is closed');
  }
}

function checkRange(id: number, offset: number, length: number, what: string): void {
  assert(Number.isSafeInteger(id) && id > 0 && classOf(id) < sizeClassCount, `blob id ${id} is valid`);
  const size = bytesOfClass(classOf(id));
  if (!(Number.isSafeInteger(offset) && Number.isSafeInteger(length) && offset >= 0 && length >= 0 && offset + length <= size)) {
    throw new ArborError('internal', `a ${what} of ${length} bytes at ${offset} does not fit blob ${id} (${size} bytes)`);
  }
}

function createClient(location: BlobsLocation, requestTimeoutMs: number): S3Client {
  const agent = { keepAlive: true, maxSockets: s3MaxSockets };
  return new S3Client({
    region: location.region,
    // RGW and MinIO serve buckets by path, not by host name.
    ...(location.endpoint !== undefined ? { endpoint: location.endpoint, forcePathStyle: true } : {}),
    // Otherwise bodies go out with aws-chunked checksums, which RGW 16 answers with 411.
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
    maxAttempts: s3MaxAttempts,
    retryMode: 'standard',
    // The SDK's NodeHttpHandler, built from these options (so no direct dependency on
    // @smithy/node-http-handler). Without throwOnRequestTimeout a request past its
    // timeout only logs a warning and goes on hanging.
    requestHandler: {
      connectionTimeout: s3ConnectTimeoutMs,
      requestTimeout: requestTimeoutMs,
      socketTimeout: Math.min(requestTimeoutMs, s3SocketIdleTimeoutMs),
      throwOnRequestTimeout: true,
      httpAgent: agent,
      httpsAgent: agent,
    },
    // No `credentials`: only the SDK's default chain (environment, shared files), never a URL or an argument.
  });
}

function statusOf(err: unknown): number | undefined {
  return (err as { $metadata?: { httpStatusCode?: number } } | undefined)?.$metadata?.httpStatusCode;
}

function errorName(err: unknown): string {
  return err instanceof Error ? err.name : 'Error';
}

function errorMessage(err: unknown): string {
  const code = (err as { code?: unknown } | undefined)?.code;
  const message = err instanceof Error ? err.message : String(err);
  return typeof code === 'string' && !message.includes(code) ? `${code} ${message}` : message;
}

/** A counting semaphore: bounds uploads across concurrent syncs. */
class Slots {
  private readonly waiting: Array<() => void> = [];

  constructor(private free: number) {}

  async acquire(): Promise<void> {
    if (this.free > 0) {
      this.free--;
      return;
    }
    await new Promise<void>((resolve) => this.waiting.push(resolve));
  }

  release(): void {
    const next = this.waiting.shift();
    if (next) next();
    else this.free++;
  }
}
