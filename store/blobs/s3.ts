import crypto from 'node:crypto';
import { CreateBucketCommand, DeleteObjectsCommand, HeadBucketCommand, HeadObjectCommand, ListObjectsV2Command, S3Client } from '@aws-sdk/client-s3';
import { chunksOf, runBounded } from '../../lib/bounded';
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
  s3PackBlobMaxBytes,
  s3PackGraceMs,
  s3PackForgetDelayMs,
  s3PackMaxBlobs,
  maxCatalogOpsPerTxn,
  s3UploadConcurrency,
} from '../limits';
import { Catalog } from '../catalog/catalog';
import { BlobIdSet } from '../blob-id-set';
import { PackIndex, PackedAt, newPackName, packKey, packOfKey } from './pack-index';
import { BlobCache } from './blob-cache';
import { BlobStore, DurableForCommit } from './blobs';
import { BlobsLocation, idOfKey, objectKey, parseBlobsUrl } from './s3-url';
import { S3Http } from './s3-http';

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
  /**
   * The store's catalog, where packed blobs are indexed: with it, `syncForCommit` of a
   * few small blobs uploads them as one pack object (`s3PackMaxBlobs`). Without it,
   * every blob is an object of its own.
   */
  packIndex?: Catalog;
  /** How old an unused pack must be before the collector deletes it (default `s3PackGraceMs`); tests shorten it. */
  packGraceMs?: number;
}

/** A pack to upload: its name, its members' places, its bytes. */
interface PackPlan {
  name: string;
  members: Array<{ id: number } & PackedAt>;
  body: Buffer;
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
 *
 * With a pack index (the catalog), a commit's sync of a few small blobs (a snapshot's:
 * a data extent and the map nodes above it) uploads them as one pack object under
 * `packs/`: one PUT where each was one, the slowest part of a snapshot of an attached
 * volume. Where each blob is in its pack rides in the commit's own transaction
 * (`syncForCommit`), so a packed blob is found exactly when a committed tree names
 * it, at no extra catalog round trip. Until then this store knows where it is, and
 * keeps it staged (never evicted). A blob is read from its pack where the index names
 * one, else from its own object. A pack goes when the collector finds no index key
 * naming it (`collectUnused`), once older than a grace period that outlasts any
 * commit still to carry its index: a member not committed within half of it is
 * packed anew.
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
  /** Packed blobs whose index no commit has carried yet: where they are, and when their pack was made. */
  private readonly unindexed = new Map<number, { at: PackedAt; madeAt: number }>();
  /**
   * Blobs this store knows to have an object of their own and no index key (it uploaded
   * them, or read them so): deleting one needs no catalog write. Deleting any other
   * deletes its index key too, so that a blob deleted is gone whoever packed it.
   */
  private readonly knownUnpacked = new BlobIdSet();
  /**
   * Deleted blobs whose index keys are still to go: deleted together, in one catalog
   * transaction at most `s3PackForgetDelayMs` later (a flush-heavy volume frees the map
   * nodes of its last commit at every commit), and meanwhile left out of every answer.
   */
  private readonly forgetting = new Set<number>();
  private forgetTimer?: NodeJS.Timeout;
  /** The forget transaction in flight, if any: one at a time. */
  private forgetRunning: Promise<void> = Promise.resolve();
  private closed = false;
  /** PutObject's and GetObject's own path (store/blobs/s3-http.ts), on its own keep-alive connections. */
  private readonly direct: S3Http;

  private constructor(
    readonly location: BlobsLocation,
    private readonly client: S3Client,
    private readonly cache: BlobCache,
    private readonly log: Log,
    private readonly packs: PackIndex | undefined,
    private readonly packGraceMs: number,
    requestTimeoutMs: number,
  ) {
    this.direct = new S3Http({
      location,
      credentials: () => client.config.credentials(),
      maxSockets: s3MaxSockets,
      maxAttempts: s3MaxAttempts,
      connectTimeoutMs: s3ConnectTimeoutMs,
      requestTimeoutMs,
      socketIdleTimeoutMs: Math.min(requestTimeoutMs, s3SocketIdleTimeoutMs),
      onTry: (operation, seconds, status) => {
        this.requestCounts.set(operation, (this.requestCounts.get(operation) ?? 0) + 1);
        s3Requests.observe({ operation, status: String(status ?? 'none') }, seconds);
      },
    });
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
      const requestTimeoutMs = options.requestTimeoutMs ?? s3RequestTimeoutMs;
      client = createClient(location, requestTimeoutMs);
      const packs = options.packIndex && new PackIndex(options.packIndex);
      const store = new S3BlobStore(location, client, cache, log, packs, options.packGraceMs ?? s3PackGraceMs, requestTimeoutMs);
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
    await settleAll(this.startUploads(new Set(ids), false));
  }

  /**
   * `sync` for a commit: a few small blobs go as one pack (`s3PackMaxBlobs`, each at
   * most `s3PackBlobMaxBytes`), and the returned ops, the index of every packed blob
   * among `ids` not yet indexed, must ride in the commit's transaction; call
   * `committed` once it has. A blob whose commit failed comes back here with the next:
   * its ops are returned again. More packed blobs than one pack holds (commits that
   * failed in a row), or one packed longer ago than half the grace period, are
   * uploaded anew, so a commit carries at most `s3PackMaxBlobs` index keys and never
   * names a pack the collector may have deleted.
   */
  async syncForCommit(ids: Iterable<number>): Promise<DurableForCommit> {
    this.checkOpen();
    const wanted = new Set(ids);
    const stillUnindexed = [...wanted].filter((id) => this.unindexed.has(id));
    const expired = stillUnindexed.some((id) => Date.now() - this.unindexed.get(id)!.madeAt > this.packGraceMs / 2);
    if (expired || stillUnindexed.length > s3PackMaxBlobs) for (const id of stillUnindexed) this.unindexed.delete(id);
    await settleAll(this.startUploads(wanted, this.packs !== undefined));
    const indexed = [...wanted].flatMap((id) => {
      const packed = this.unindexed.get(id);
      return packed ? [{ id, packed }] : [];
    });
    return {
      ops: PackIndex.recordOps(indexed.map(({ id, packed }) => ({ id, ...packed.at }))),
      committed: () => {
        for (const { id, packed } of indexed) {
          if (this.unindexed.get(id) !== packed) continue;
          this.unindexed.delete(id);
          if (this.cache.state(id) === 'sealed') this.cache.promote(id);
        }
      },
    };
  }

  /**
   * Starts the uploads `ids` need, and returns them with those already in flight. Every
   * blob is sealed before the first await: a write that comes after the call is refused.
   * `pack`: a few small blobs may go as one pack.
   */
  private startUploads(ids: Set<number>, pack: boolean): Promise<void>[] {
    const pending: Promise<void>[] = [];
    const fresh: number[] = [];
    for (const id of ids) {
      const inFlight = this.uploads.get(id);
      if (inFlight) {
        pending.push(inFlight);
        continue;
      }
      // Packed already (its pack is durable; the index waits for a commit), uploaded already, or never written here.
      if (this.unindexed.has(id)) continue;
      const state = this.cache.state(id);
      if (state !== 'staged' && state !== 'sealed') continue;
      this.cache.seal(id);
      fresh.push(id);
    }
    const plan = pack ? this.planPack(fresh) : undefined;
    if (plan)
      pending.push(
        this.track(
          plan.members.map(({ id }) => id),
          this.uploadPack(plan),
        ),
      );
    const direct = plan ? [] : fresh;
    // Write-once for blobs packed before: one read of the index for the whole sync, not one per upload (a fill syncs thousands).
    const packedBefore = direct.length > 0 ? this.packs?.locateMany(direct) : undefined;
    // Each upload waits for it and fails with it; until they do, it is not an unhandled rejection.
    packedBefore?.catch(() => {});
    for (const id of direct) pending.push(this.track([id], this.upload(id, packedBefore)));
    return pending;
  }

  /** Marks the blobs' upload in flight until it settles: a second sync of one waits for it, a delete too. */
  private track(ids: number[], upload: Promise<void>): Promise<void> {
    const tracked: Promise<void> = upload.finally(() => {
      for (const id of ids) if (this.uploads.get(id) === tracked) this.uploads.delete(id);
    });
    for (const id of ids) this.uploads.set(id, tracked);
    return tracked;
  }

  async delete(ids: Iterable<number>): Promise<void> {
    this.checkOpen();
    const unique = [...new Set(ids)];
    // An upload racing a delete would bring the object back after it.
    await Promise.allSettled(unique.map((id) => this.uploads.get(id)).filter((upload) => upload !== undefined));
    for (const id of unique) {
      if (this.fetches.has(id)) this.voidedFetches.add(id);
    }
    // Neither staged and never synced (taken and dropped between two commits), nor known to have an object of its own.
    const mayBePacked = unique.filter((id) => this.cache.state(id) !== 'staged' && !this.knownUnpacked.has(id));
    for (const id of unique) {
      this.cache.drop(id);
      this.unindexed.delete(id);
      this.knownUnpacked.delete(id);
    }
    // Its pack stays while another blob uses it (the collector deletes it after: `collectUnused`).
    if (this.packs) for (const id of mayBePacked) this.forgetting.add(id);
    await settleAll([
      this.deleteObjects(unique.map((id) => objectKey(this.location.prefix, id))),
      this.forgetting.size >= maxCatalogOpsPerTxn ? this.forgetNow() : this.forgetLater(),
    ]);
  }

  private forgetLater(): void {
    if (this.forgetting.size === 0 || this.forgetTimer) return;
    this.forgetTimer = setTimeout(() => {
      this.forgetTimer = undefined;
      this.forgetNow().catch((err) =>
        this.log.warn('deleting the index keys of deleted blobs failed; trying again', { blobs: this.forgetting.size, error: (err as Error).message }),
      );
    }, s3PackForgetDelayMs);
    this.forgetTimer.unref();
  }

  /** Deletes the index keys of the blobs deleted so far; they stay left out of every answer until that has landed. */
  private forgetNow(): Promise<void> {
    clearTimeout(this.forgetTimer);
    this.forgetTimer = undefined;
    const run = this.forgetRunning.then(async () => {
      const ids = [...this.forgetting];
      if (ids.length === 0) return;
      try {
        await this.packs!.forget(ids);
      } catch (err) {
        if (!this.closed) this.forgetLater();
        throw err;
      }
      for (const id of ids) this.forgetting.delete(id);
    });
    this.forgetRunning = run.catch(() => {});
    return run;
  }

  /** Deletes objects, in DeleteObjects batches; keys that do not exist are ignored. */
  private async deleteObjects(keys: string[]): Promise<void> {
    await runBounded(
      chunksOf(keys, s3DeleteBatchKeys).map((keys) => async () => {
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
    await this.listObjects({ blob: (id) => ids.add(id) });
    for (const { id } of await this.packedBlobs()) ids.add(id);
    return [...ids];
  }

  /** Blobs: with their own object or in a pack; bytes: of every object, packs whole. */
  async usage(): Promise<{ blobs: number; bytes: number }> {
    this.checkOpen();
    const ids = new Set<number>();
    let bytes = 0;
    await this.listObjects({
      blob: (id, size) => {
        ids.add(id);
        bytes += size;
      },
      pack: (_name, size) => (bytes += size),
    });
    for (const { id } of await this.packedBlobs()) ids.add(id);
    return { blobs: ids.size, bytes };
  }

  /**
   * Deletes the packs no index key names any more, once older than the grace period
   * (a pack whose commit has not landed yet is named by none); the collector calls it
   * after its sweep. Returns how many went.
   */
  async collectUnused(): Promise<number> {
    this.checkOpen();
    if (!this.packs) return 0;
    // Packs first, then the index: a commit that lands in between names a pack already listed, and is seen.
    const packs: Array<{ name: string; modified: number }> = [];
    await this.listObjects({ pack: (name, _size, modified) => packs.push({ name, modified }) });
    await this.forgetNow();
    const used = new Set((await this.packedBlobs()).map(({ pack }) => pack));
    const unused = packs.filter(({ name, modified }) => !used.has(name) && Date.now() - modified > this.packGraceMs);
    await this.deleteObjects(unused.map(({ name }) => packKey(this.location.prefix, name)));
    if (unused.length > 0) this.log.info('deleted packs no blob uses', { packs: unused.length });
    return unused.length;
  }

  async availableBytes(): Promise<undefined> {
    return undefined;
  }

  /** Every packed blob the index names, with its pack, but those deleted here whose keys are still to go. */
  private async packedBlobs(): Promise<Array<{ id: number; pack: string }>> {
    return ((await this.packs?.all()) ?? []).filter(({ id }) => !this.forgetting.has(id));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.allSettled([...this.uploads.values(), ...this.fetches.values()]);
    // Keys left behind would only cost the collector's next pass a delete.
    await this.forgetNow().catch((err) =>
      this.log.warn('closing: deleting the index keys of deleted blobs failed; the collector deletes them', { error: (err as Error).message }),
    );
    this.cache.close();
    this.client.destroy();
    this.direct.destroy();
  }

  private async upload(id: number, packedBefore?: Promise<Map<number, PackedAt>>): Promise<void> {
    const key = objectKey(this.location.prefix, id);
    await this.uploadSlots.acquire();
    try {
      const body = this.cache.stagedContents(id);
      const md5 = crypto.createHash('md5').update(body).digest();
      // A blob packed before has no object of its own for the conditional upload to find:
      // the index does. (Reads prefer the pack, so what they see never changes.)
      const [packedAt] = await settleAll([packedBefore?.then((found) => found.get(id)), this.putOnce(key, body, md5, `blob ${id}`)]);
      if (packedAt) {
        throw new ArborError(
          'internal',
          `blob ${id} was synced before, in pack ${packedAt.pack} (${this.where(packKey(this.location.prefix, packedAt.pack))}), and written again: ` +
            'blobs are written once; reads keep the packed bytes, nothing was overwritten',
        );
      }
      this.cache.promote(id);
      this.knownUnpacked.add(id);
    } finally {
      this.uploadSlots.release();
    }
  }

  /** Uploads `body` to `key` unless an object is there; one that is must hold these bytes. `what`: 'blob 12' or 'pack …', for messages. */
  private async putOnce(key: string, body: Buffer, md5: Buffer, what: string): Promise<void> {
    try {
      // Write-once: never replace an object (atomic on RGW and S3). The server checks the bytes it stored against the MD5.
      await this.direct.put(key, body, md5, true);
    } catch (err) {
      const status = statusOf(err);
      // 412: the object exists, typically because a try whose answer was lost did land.
      // 409: a concurrent conditional write of the same key. Either way, look.
      if (status !== 412 && status !== 409) throw this.failure(err, `uploading ${what}`, key);
      await this.confirmLanded(what, key, md5, status);
    }
  }

  /**
   * The pack for a commit's fresh blobs, when they are few and small enough to go as
   * one (`s3PackMaxBlobs`); undefined when they go as objects of their own.
   */
  private planPack(ids: number[]): PackPlan | undefined {
    if (ids.length < 2 || ids.length > s3PackMaxBlobs) return undefined;
    const bodies = ids.map((id) => this.cache.stagedContents(id));
    if (bodies.some((body) => body.length > s3PackBlobMaxBytes)) return undefined;
    const name = newPackName(ids[0]);
    let offset = 0;
    const members = ids.map((id, i) => {
      const member = { id, pack: name, offset, length: bodies[i].length };
      offset += bodies[i].length;
      return member;
    });
    return { name, members, body: Buffer.concat(bodies) };
  }

  /** One PUT for the pack; its members stay staged until a commit carried their index (`syncForCommit`). */
  private async uploadPack(plan: PackPlan): Promise<void> {
    await this.uploadSlots.acquire();
    try {
      const md5 = crypto.createHash('md5').update(plan.body).digest();
      await this.putOnce(packKey(this.location.prefix, plan.name), plan.body, md5, `pack ${plan.name} (blobs ${plan.members.map(({ id }) => id).join(', ')})`);
      const madeAt = Date.now();
      for (const { id, ...at } of plan.members) this.unindexed.set(id, { at, madeAt });
    } finally {
      this.uploadSlots.release();
    }
  }

  /** The object exists after a refused conditional upload: fine only if it holds our bytes. */
  private async confirmLanded(what: string, key: string, md5: Buffer, status: number): Promise<void> {
    let etag: string | undefined;
    try {
      etag = (await this.client.send(new HeadObjectCommand({ Bucket: this.location.bucket, Key: key }))).ETag;
    } catch (err) {
      if (statusOf(err) === 404) {
        throw new ArborError(
          'unavailable',
          `${this.where(key)}: uploading ${what} met a conflicting write (HTTP ${status}), and no object is there; sync again`,
        );
      }
      throw this.failure(err, `checking ${what} after its upload was refused (HTTP ${status})`, key);
    }
    // A single-part upload's ETag is the MD5 of its bytes.
    if (etag?.replace(/"/g, '').toLowerCase() === md5.toString('hex')) {
      this.log.debug('an earlier try of an upload had landed', { what, key });
      return;
    }
    throw new ArborError(
      'internal',
      `${this.where(key)} already holds other bytes than ${what} (ETag ${etag ?? 'none'}, ours "${md5.toString('hex')}"): ` +
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
    // Both at once: a packed blob costs the index read, not the 404 before it.
    // (A blob packed here whose index is not committed yet is staged, never evicted: read from the cache, never fetched.)
    const [own, indexed] = await settleAll([this.getObject(key, `reading blob ${id}`), this.packs?.locate(id)]);
    const packedAt = this.forgetting.has(id) ? undefined : indexed;
    // Not cached: the 404 costs a request only when something reads a blob that has no
    // object, which the engine does not do, and an object may appear later (a blob
    // uploaded by the process that owns it now).
    const object = packedAt ? await this.readPacked(id, packedAt) : own;
    if (own && !packedAt && this.packs) this.knownUnpacked.add(id);
    if (!object) return undefined;
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

  /** A packed blob's bytes: a ranged GET of its pack. */
  private async readPacked(id: number, { pack, offset, length }: PackedAt): Promise<Buffer> {
    if (length === 0) return Buffer.alloc(0);
    const key = packKey(this.location.prefix, pack);
    const bytes = await this.getObject(key, `reading blob ${id} from pack ${pack}`, `bytes=${offset}-${offset + length - 1}`);
    if (bytes?.length !== length) {
      throw new ArborError(
        'internal',
        `${this.where(key)}: blob ${id} is indexed at bytes ${offset}+${length} of pack ${pack}, which ` +
          (bytes ? `gave ${bytes.length} bytes there` : 'is missing') +
          '; the blob cannot be read',
      );
    }
    return bytes;
  }

  /** The object's bytes (a range of them, where given), or undefined when there is none. */
  private async getObject(key: string, what: string, range?: string): Promise<Buffer | undefined> {
    try {
      return await this.direct.get(key, range);
    } catch (err) {
      throw this.failure(err, what, key);
    }
  }

  /** Calls `visit.blob` for every blob object under the prefix and `visit.pack` for every pack, page by page. */
  private async listObjects(visit: {
    blob?: (id: number, bytes: number) => void;
    pack?: (name: string, bytes: number, modifiedMs: number) => void;
  }): Promise<void> {
    let token: string | undefined;
    do {
      let page;
      try {
        page = await this.client.send(new ListObjectsV2Command({ Bucket: this.location.bucket, Prefix: this.location.prefix, ContinuationToken: token }));
      } catch (err) {
        throw this.failure(err, 'listing the blobs', this.location.prefix);
      }
      for (const object of page.Contents ?? []) {
        if (object.Key === undefined) continue;
        const id = idOfKey(this.location.prefix, object.Key);
        if (id !== undefined) visit.blob?.(id, object.Size ?? 0);
        const pack = id === undefined ? packOfKey(this.location.prefix, object.Key) : undefined;
        if (pack !== undefined) visit.pack?.(pack, object.Size ?? 0, object.LastModified?.getTime() ?? Date.now());
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

/** Waits for every promise (undefined ones stand for nothing to wait for), then throws the first failure: nothing is still running when it returns. */
async function settleAll<T extends readonly unknown[]>(promises: T): Promise<{ -readonly [K in keyof T]: Awaited<T[K]> }> {
  const results = await Promise.allSettled(promises);
  const failed = results.find((result): result is PromiseRejectedResult => result.status === 'rejected');
  if (failed) throw failed.reason;
  return results.map((result) => (result as PromiseFulfilledResult<unknown>).value) as { -readonly [K in keyof T]: Awaited<T[K]> };
}
