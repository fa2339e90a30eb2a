import crypto from 'node:crypto';
import http from 'node:http';
import https from 'node:https';
import { SignatureV4 } from '@smithy/signature-v4';
import { BlobsLocation } from './s3-url';

/**
 * PutObject without the AWS SDK's middleware stack: the request signed with the
 * SDK's own SigV4 signer (`@smithy/signature-v4`), sent with node:http on the
 * store's keep-alive agent. Uploads are the blob store's hot path (a fill makes one
 * per 64 KiB extent, an attached snapshot waits for one), and the SDK spent 1.4–1.8 ms
 * of CPU on each 64 KiB PUT here against 0.45–0.5 ms for this; every other request
 * still goes through the SDK.
 *
 * It keeps the SDK's contract where the store relies on it: credentials from the
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

export interface S3PutOptions {
  location: BlobsLocation;
  credentials: () => Promise<S3Credentials>;
  agent: http.Agent;
  maxAttempts: number;
  connectTimeoutMs: number;
  /** Per try: from sending to the whole answer. */
  requestTimeoutMs: number;
  socketIdleTimeoutMs: number;
  /** Each try as it ends: its duration and the HTTP status (undefined: no answer). */
  onTry: (seconds: number, status: number | undefined) => void;
}

/** A failed PutObject, shaped as the SDK's errors are. */
export class S3PutError extends Error {
  readonly $metadata: { httpStatusCode?: number; attempts: number };
  readonly code?: string;

  constructor(name: string, message: string, status: number | undefined, attempts: number, code?: string) {
    super(message);
    this.name = name;
    this.code = code;
    this.$metadata = { httpStatusCode: status, attempts };
  }
}

/** Base of the backoff between tries, and its cap (the SDK's standard retry mode). */
const backoffBaseMs = 100;
const backoffCapMs = 20_000;
const retryableStatuses = new Set([429, 500, 502, 503, 504]);
const throttlingCodes = new Set(['SlowDown', 'Throttling', 'ThrottlingException', 'RequestThrottled', 'TooManyRequestsException']);

export class S3Put {
  private readonly signer: SignatureV4;
  private readonly target: { protocol: 'http:' | 'https:'; hostname: string; port?: number; host: string; pathPrefix: string };

  constructor(private readonly options: S3PutOptions) {
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
  }

  /** Uploads `body` to `key` with its MD5 (checked by the server); `ifNoneMatch`: only where no object is. */
  async put(key: string, body: Buffer, md5: Buffer, ifNoneMatch: boolean): Promise<void> {
    const path = this.target.pathPrefix + key.split('/').map(encodeSegment).join('/');
    const headers: Record<string, string> = {
      host: this.target.host,
      'content-length': String(body.length),
      'content-md5': md5.toString('base64'),
      // The body's own hash, signed: the request cannot be altered on the way.
      'x-amz-content-sha256': crypto.createHash('sha256').update(body).digest('hex'),
    };
    if (ifNoneMatch) headers['if-none-match'] = '*';
    for (let attempt = 1; ; attempt++) {
      try {
        await this.tryOnce(path, headers, body, attempt);
        return;
      } catch (err) {
        if (!(err instanceof S3PutError) || attempt >= this.options.maxAttempts || !retryable(err)) throw err;
        const delay = Math.random() * Math.min(backoffCapMs, backoffBaseMs * 2 ** (attempt - 1));
        await new Promise((resolve) => setTimeout(resolve, delay));
      }
    }
  }

  private async tryOnce(path: string, headers: Record<string, string>, body: Buffer, attempt: number): Promise<void> {
    const { protocol, hostname, port } = this.target;
    let signed;
    try {
      signed = await this.signer.sign({ method: 'PUT', protocol, hostname, port, path, query: {}, headers: { ...headers } });
    } catch (err) {
      // No credentials, or a provider that failed: the SDK's error, with its name, as it is.
      throw err instanceof Error ? err : new Error(String(err));
    }
    const began = performance.now();
    let status: number | undefined;
    try {
      const answer = await this.send(signed.path, signed.headers, body, attempt);
      status = answer.status;
      if (status >= 200 && status < 300) return;
      const code = /<Code>([^<]*)<\/Code>/.exec(answer.body)?.[1];
      const message = /<Message>([^<]*)<\/Message>/.exec(answer.body)?.[1];
      throw new S3PutError(code ?? 'UnknownError', message ?? `HTTP ${status}`, status, attempt, code);
    } finally {
      this.options.onTry((performance.now() - began) / 1000, status);
    }
  }

  /** One HTTP exchange, bounded by the connect, idle and whole-request timeouts; a failure without an answer is an S3PutError without a status. */
  private send(path: string, headers: Record<string, string>, body: Buffer, attempt: number): Promise<{ status: number; body: string }> {
    const { connectTimeoutMs, requestTimeoutMs, socketIdleTimeoutMs, agent } = this.options;
    const { protocol, hostname, port } = this.target;
    return new Promise((resolve, reject) => {
      const request = (protocol === 'https:' ? https : http).request({ method: 'PUT', hostname, port, path, headers, agent, timeout: socketIdleTimeoutMs });
      let done = false;
      const fail = (name: string, message: string, code?: string) => {
        if (done) return;
        done = true;
        clearTimeout(whole);
        reject(new S3PutError(name, message, undefined, attempt, code));
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
          if (done) return;
          done = true;
          clearTimeout(whole);
          resolve({ status: response.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8') });
        });
      });
      request.end(body);
    });
  }
}

function retryable(err: S3PutError): boolean {
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
