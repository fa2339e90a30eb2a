import crypto from 'node:crypto';
import http from 'node:http';
import https from 'node:https';
import { SignatureV4 } from '@smithy/signature-v4';
import { BlobsLocation } from './s3-url';

/**
 * PutObject and GetObject without the AWS SDK's middleware stack: requests signed
 * with the SDK's own SigV4 signer (`@smithy/signature-v4`), sent with node:http on
 * the store's keep-alive agent. They are the blob store's hot path: a fill makes a
 * PUT per 64 KiB extent, an attached snapshot waits for one, and a read that misses
 * the cache (a VM booting on a node that never held its image) waits for a GET. The
 * SDK spent 1.4–1.8 ms of CPU on a 64 KiB PUT here and 1.3–1.4 ms on a GET, against
 * 0.45–0.6 ms for these. Every other request (HEAD, lists, deletes, the bucket) still
 * goes through the SDK.
 *
 * They keep the SDK's contract where the store relies on it: credentials from the
 * client's own provider chain, standard retries (`maxAttempts` tries, exponential
 * backoff with jitter, on timeouts, dropped connections, 5xx, 429 and throttling),
 * the same three timeouts, and errors shaped as the SDK's (`name` the S3 error code,
 * `$metadata.httpStatusCode` and `attempts`), so the store maps them once.
 */
/** What the SDK's credential providers give. */
export interface S3Credentials {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
  expiration?: Date;
}

type SourceData = string | ArrayBuffer | ArrayBufferView;

export interface S3HttpOptions {
  location: BlobsLocation;
  credentials: () => Promise<S3Credentials>;
  /** Keep-alive connections to the endpoint, at most. */
  maxSockets: number;
  maxAttempts: number;
  connectTimeoutMs: number;
  /** Per try: from sending to the whole answer. */
  requestTimeoutMs: number;
  socketIdleTimeoutMs: number;
  /** Each try as it ends: the S3 operation, its duration and the HTTP status (undefined: no answer). */
  onTry: (operation: string, seconds: number, status: number | undefined) => void;
}

/** A failed request, shaped as the SDK's errors are. */
export class S3HttpError extends Error {
  readonly $metadata: { httpStatusCode?: number; attempts: number };
  readonly code?: string;

  constructor(name: string, message: string, status: number | undefined, attempts: number, code?: string) {
    super(message);
    this.name = name;
    this.code = code;
    this.$metadata = { httpStatusCode: status, attempts };
  }
}

/** SHA-256 of no bytes: what a request without a body signs. */
const emptyBodySha256 = crypto.createHash('sha256').digest('hex');
/** Base of the backoff between tries, and its cap (the SDK's standard retry mode). */
const backoffBaseMs = 100;
const backoffCapMs = 20_000;
const retryableStatuses = new Set([429, 500, 502, 503, 504]);
const throttlingCodes = new Set(['SlowDown', 'Throttling', 'ThrottlingException', 'RequestThrottled', 'TooManyRequestsException']);

export class S3Http {
  private readonly signer: SignatureV4;
  private readonly target: { protocol: 'http:' | 'https:'; hostname: string; port?: number; host: string; pathPrefix: string };
  /** Its own connections, apart from the SDK client's. */
  private readonly agent: http.Agent;

  constructor(private readonly options: S3HttpOptions) {
    const { location } = options;
    this.signer = new SignatureV4({
      credentials: options.credentials,
      region: location.region,
      service: 's3',
      sha256: NodeSha256,
      // S3 takes the path as sent: segments are encoded once, here, not again by the signer.
      uriEscapePath: false,
    });
    if (location.endpoint !== undefined) {
      // A custom endpoint (RGW, MinIO) serves buckets by path, as the SDK client is told to.
      const url = new URL(location.endpoint);
      this.target = {
        protocol: url.protocol === 'https:' ? 'https:' : 'http:',
        hostname: url.hostname,
        port: url.port === '' ? undefined : Number(url.port),
        host: url.host,
        pathPrefix: `${url.pathname.replace(/\/$/, '')}/${encodeSegment(location.bucket)}/`,
      };
    } else {
      // AWS: the bucket in the host name, as the SDK does (path style for names with dots, which TLS cannot match).
      const virtual = !location.bucket.includes('.');
      const hostname = virtual ? `${location.bucket}.s3.${location.region}.amazonaws.com` : `s3.${location.region}.amazonaws.com`;
      this.target = { protocol: 'https:', hostname, host: hostname, pathPrefix: virtual ? '/' : `/${encodeSegment(location.bucket)}/` };
    }
    const agentOptions = { keepAlive: true, maxSockets: options.maxSockets };
    this.agent = this.target.protocol === 'https:' ? new https.Agent(agentOptions) : new http.Agent(agentOptions);
  }

  /** Closes its connections; requests in flight fail. */
  destroy(): void {
    this.agent.destroy();
  }

  /** Uploads `body` to `key` with its MD5 (checked by the server); `ifNoneMatch`: only where no object is. */
  async put(key: string, body: Buffer, md5: Buffer, ifNoneMatch: boolean): Promise<void> {
    const headers: Record<string, string> = {
      'content-length': String(body.length),
      'content-md5': md5.toString('base64'),
      // The body's own hash, signed: the request cannot be altered on the way.
      'x-amz-content-sha256': crypto.createHash('sha256').update(body).digest('hex'),
    };
    if (ifNoneMatch) headers['if-none-match'] = '*';
    await this.withRetries('PutObject', 'PUT', key, headers, body);
  }

  /**
   * The object's bytes, or the `range` of them ('bytes=a-b'); undefined when there is
   * no such object. An answer cut short is a failed try.
   */
  async get(key: string, range?: string): Promise<Buffer | undefined> {
    const headers: Record<string, string> = { 'x-amz-content-sha256': emptyBodySha256 };
    if (range !== undefined) headers.range = range;
    try {
      return await this.withRetries('GetObject', 'GET', key, headers);
    } catch (err) {
      if (err instanceof S3HttpError && err.$metadata.httpStatusCode === 404) return undefined;
      throw err;
    }
  }

  private async withRetries(operation: string, method: 'PUT' | 'GET', key: string, headers: Record<string, string>, body?: Buffer): Promise<Buffer> {
    const path = this.target.pathPrefix + key.split('/').map(encodeSegment).join('/');
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.tryOnce(operation, method, path, { host: this.target.host, ...headers }, body, attempt);
      } catch (err) {
        if (!(err instanceof S3HttpError) || attempt >= this.options.maxAttempts || !retryable(err)) throw err;
        const delay = Math.random() * Math.min(backoffCapMs, backoffBaseMs * 2 ** (attempt - 1));
        await new Promise((resolve) => setTimeout(resolve, delay));
      }
    }
  }

  private async tryOnce(
    operation: string,
    method: 'PUT' | 'GET',
    path: string,
    headers: Record<string, string>,
    body: Buffer | undefined,
    attempt: number,
  ): Promise<Buffer> {
    const { protocol, hostname, port } = this.target;
    // No credentials, or a provider that failed: the SDK's error goes to the caller as it is.
    const signed = await this.signer.sign({ method, protocol, hostname, port, path, query: {}, headers });
    const began = performance.now();
    let status: number | undefined;
    try {
      const answer = await this.send(method, signed.path, signed.headers, body, attempt);
      status = answer.status;
      if (status >= 200 && status < 300) return answer.body;
      const text = answer.body.toString('utf8');
      const code = /<Code>([^<]*)<\/Code>/.exec(text)?.[1];
      const message = /<Message>([^<]*)<\/Message>/.exec(text)?.[1];
      throw new S3HttpError(code ?? 'UnknownError', message ?? `HTTP ${status}`, status, attempt, code);
    } finally {
      this.options.onTry(operation, (performance.now() - began) / 1000, status);
    }
  }

  /** One HTTP exchange, bounded by the connect, idle and whole-request timeouts; a failure without an answer is an S3HttpError without a status. */
  private send(
    method: 'PUT' | 'GET',
    path: string,
    headers: Record<string, string>,
    body: Buffer | undefined,
    attempt: number,
  ): Promise<{ status: number; body: Buffer }> {
    const { connectTimeoutMs, requestTimeoutMs, socketIdleTimeoutMs } = this.options;
    const agent = this.agent;
    const { protocol, hostname, port } = this.target;
    return new Promise((resolve, reject) => {
      const request = (protocol === 'https:' ? https : http).request({ method, hostname, port, path, headers, agent, timeout: socketIdleTimeoutMs });
      let done = false;
      const fail = (name: string, message: string, code?: string) => {
        if (done) return;
        done = true;
        clearTimeout(whole);
        reject(new S3HttpError(name, message, undefined, attempt, code));
        request.destroy();
      };
      const whole = setTimeout(() => fail('TimeoutError', `no answer within ${requestTimeoutMs} ms`), requestTimeoutMs);
      request.on('timeout', () => fail('TimeoutError', `the connection was idle for ${socketIdleTimeoutMs} ms`));
      request.on('socket', (socket) => {
        // A body past one segment ends in a small one: with Nagle it would wait for the server's delayed ACK.
        socket.setNoDelay(true);
        if (!socket.connecting) return;
        const connecting = setTimeout(() => fail('TimeoutError', `no connection within ${connectTimeoutMs} ms`), connectTimeoutMs);
        socket.once('connect', () => clearTimeout(connecting));
        socket.once('close', () => clearTimeout(connecting));
      });
      request.on('error', (err: NodeJS.ErrnoException) => fail(err.name, err.message, err.code));
      request.on('response', (response) => {
        const chunks: Buffer[] = [];
        response.on('data', (chunk: Buffer) => chunks.push(chunk));
        response.on('error', (err: NodeJS.ErrnoException) => fail(err.name, err.message, err.code));
        response.on('close', () => fail('Error', 'the connection closed before the answer ended', 'ECONNRESET'));
        response.on('end', () => {
          // An answer cut short never ends: Node's parser reports it as an error (above).
          if (done) return;
          done = true;
          clearTimeout(whole);
          resolve({ status: response.statusCode ?? 0, body: Buffer.concat(chunks) });
        });
      });
      request.end(body);
    });
  }
}

function retryable(err: S3HttpError): boolean {
  const status = err.$metadata.httpStatusCode;
  if (status === undefined) return true; // no answer: timed out, refused, reset
  return retryableStatuses.has(status) || (err.code !== undefined && throttlingCodes.has(err.code));
}

/** RFC 3986 encoding of one path segment, as SigV4 wants it. */
function encodeSegment(segment: string): string {
  return encodeURIComponent(segment).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
}

/** The signer's hash: Node's own SHA-256 and HMAC, not a JavaScript one. */
class NodeSha256 {
  private hash: crypto.Hash | crypto.Hmac;

  constructor(private readonly secret?: SourceData) {
    this.hash = this.fresh();
  }

  update(data: Uint8Array): void {
    this.hash.update(data);
  }

  async digest(): Promise<Uint8Array> {
    return new Uint8Array(this.hash.digest());
  }

  reset(): void {
    this.hash = this.fresh();
  }

  private fresh(): crypto.Hash | crypto.Hmac {
    if (this.secret === undefined) return crypto.createHash('sha256');
    const secret = this.secret;
    const key =
      typeof secret === 'string' ? secret : ArrayBuffer.isView(secret) ? Buffer.from(secret.buffer, secret.byteOffset, secret.byteLength) : Buffer.from(secret);
    return crypto.createHmac('sha256', key);
  }
}
