import { classOf, sizeClassCount } from '../blob-id';
import { ArborError } from '../errors';
import { maxS3PrefixBytes } from '../limits';

/*
 * Where an S3 blob store keeps its objects: the bucket, prefix and endpoint an
 * s3:// URL names, and the key of each blob under them.
 */

/** Where an S3 blob store keeps its objects. */
export interface BlobsLocation {
  bucket: string;
  /** '' or ending in '/': every key starts with it. */
  prefix: string;
  /** 'http://127.0.0.1:7480' for RGW or MinIO; absent for AWS itself. */
  endpoint?: string;
  region: string;
}

const defaultRegion = 'us-east-1';
const queryKeys = new Set(['endpoint', 'region']);

/**
 * `s3://bucket/prefix?endpoint=http://127.0.0.1:7480&region=us-east-1`.
 *
 * Credentials never come from here: a URL ends up in process listings, manifests and
 * logs, so one that carries a key is refused, and the S3 client takes the SDK's
 * default chain (environment, shared credentials file) instead.
 */
export function parseBlobsUrl(url: string, env: NodeJS.ProcessEnv = process.env): BlobsLocation {
  // Every message shows the URL with any user information hidden: it may be a secret.
  const shown = redacted(url);
  // No part of a valid URL holds an '@' (the prefix, bucket, region and endpoint host
  // cannot), so any '@' is user information, wherever an unescaped '/' or '#' in a
  // secret may have moved it.
  if (/@|%40/i.test(url)) {
    throw bad(
      `blob store URL "${shown}" carries credentials; put them in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY ` +
        '(or a shared credentials file) instead, where they stay out of process listings and logs',
    );
  }
  const shape = /^s3:\/\/([^/?#]*)([^?#]*)(\?[^#]*)?(#.*)?$/.exec(url);
  if (!shape) throw bad(`blob store URL "${shown}" is not of the form s3://bucket[/prefix][?endpoint=URL&region=NAME]`);
  const [, authority, rawPath, rawQuery, fragment] = shape;
  if (fragment !== undefined) throw bad(`blob store URL "${shown}" has a fragment (${fragment}); remove it`);

  const bucket = authority;
  const bucketProblem = bucketNameProblem(bucket);
  if (bucketProblem) throw bad(`blob store URL "${shown}": bucket name "${bucket}" ${bucketProblem}`);

  const prefix = parsePrefix(shown, rawPath);
  const { endpoint, region } = parseQuery(shown, rawQuery ?? '');
  return { bucket, prefix, ...(endpoint !== undefined ? { endpoint } : {}), region: region ?? (env.AWS_REGION || defaultRegion) };
}

/** Why a name is not a valid S3 (general purpose) bucket name, or undefined when it is. */
export function bucketNameProblem(name: string): string | undefined {
  if (name === '') return 'is empty';
  if (name.length < 3 || name.length > 63) return `is ${name.length} characters long; bucket names have 3 to 63`;
  if (!/^[a-z0-9.-]+$/.test(name)) return 'may hold only lowercase letters, digits, dots and hyphens';
  if (!/^[a-z0-9]/.test(name) || !/[a-z0-9]$/.test(name)) return 'must begin and end with a letter or a digit';
  if (name.includes('..')) return 'must not hold two adjacent dots';
  if (/^\d+\.\d+\.\d+\.\d+$/.test(name)) return 'must not look like an IP address';
  for (const reserved of ['xn--', 'sthree-', 'amzn-s3-demo-']) if (name.startsWith(reserved)) return `must not begin with "${reserved}" (reserved by S3)`;
  for (const reserved of ['-s3alias', '--ol-s3', '.mrap', '--x-s3', '--table-s3'])
    if (name.endsWith(reserved)) return `must not end with "${reserved}" (reserved by S3)`;
  return undefined;
}

function parsePrefix(shown: string, rawPath: string): string {
  let path: string;
  try {
    path = decodeURIComponent(rawPath);
  } catch {
    throw bad(`blob store URL "${shown}": the prefix "${rawPath}" has a malformed percent-escape`);
  }
  const trimmed = path.replace(/^\//, '').replace(/\/$/, '');
  if (trimmed === '') return '';
  for (const segment of trimmed.split('/')) {
    if (segment === '') throw bad(`blob store URL "${shown}": the prefix "${trimmed}" has an empty segment ("//")`);
    if (segment === '.' || segment === '..') throw bad(`blob store URL "${shown}": the prefix "${trimmed}" has a "${segment}" segment`);
    // S3's "safe characters": anything else needs escaping in some tool along the way.
    if (!/^[A-Za-z0-9!_.*'()-]+$/.test(segment)) {
      throw bad(`blob store URL "${shown}": prefix segment "${segment}" may hold only letters, digits and ! _ . * ' ( ) -`);
    }
  }
  const prefix = `${trimmed}/`;
  if (Buffer.byteLength(prefix) > maxS3PrefixBytes) throw bad(`blob store URL "${shown}": the prefix is longer than ${maxS3PrefixBytes} bytes`);
  return prefix;
}

function parseQuery(shown: string, rawQuery: string): { endpoint?: string; region?: string } {
  const query = new URLSearchParams(rawQuery.replace(/^\?/, ''));
  const seen = new Set<string>();
  for (const [key, value] of query) {
    if (!queryKeys.has(key)) throw bad(`blob store URL "${shown}": unknown query parameter "${key}" (known: ${[...queryKeys].join(', ')})`);
    if (seen.has(key)) throw bad(`blob store URL "${shown}": query parameter "${key}" is given twice`);
    if (value === '') throw bad(`blob store URL "${shown}": query parameter "${key}" is empty`);
    seen.add(key);
  }
  const result: { endpoint?: string; region?: string } = {};
  const endpoint = query.get('endpoint');
  if (endpoint !== null) result.endpoint = parseEndpoint(shown, endpoint);
  const region = query.get('region');
  if (region !== null) {
    if (!/^[a-z0-9][a-z0-9-]{0,62}$/.test(region))
      throw bad(`blob store URL "${shown}": region "${region}" may hold only lowercase letters, digits and hyphens`);
    result.region = region;
  }
  return result;
}

function parseEndpoint(shown: string, endpoint: string): string {
  let parsed: URL;
  try {
    parsed = new URL(endpoint);
  } catch {
    throw bad(`blob store URL "${shown}": endpoint "${endpoint}" is not a URL (want http://host:port or https://host:port)`);
  }
  if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') throw bad(`blob store URL "${shown}": endpoint "${endpoint}" must be http:// or https://`);
  if (parsed.pathname !== '/' || parsed.search !== '' || parsed.hash !== '') {
    throw bad(`blob store URL "${shown}": endpoint "${endpoint}" must be only scheme, host and port (no path or query); the bucket goes in s3://bucket`);
  }
  return `${parsed.protocol}//${parsed.host}`;
}

/** The URL with everything from the first '//' to the last '@' (or '%40') hidden. */
function redacted(url: string): string {
  return url.replace(/(\/\/|%2F%2F).*(@|%40)/is, '$1***$2');
}

function bad(message: string): ArborError {
  return new ArborError('invalid-argument', message);
}

/**
 * The object key of a blob: `<prefix><4 hex digits of a hash of the id>/<id in 12 hex
 * digits>`. S3 partitions a bucket by key prefix, and consecutive ids under one
 * prefix would all land on one partition. Part of the stored format: never change it.
 */
export function objectKey(prefix: string, id: number): string {
  return `${prefix}${spreadOf(id).toString(16).padStart(4, '0')}/${id.toString(16).padStart(12, '0')}`;
}

/** The blob a key names, or undefined for a key that is not one of ours. */
export function idOfKey(prefix: string, key: string): number | undefined {
  if (!key.startsWith(prefix)) return undefined;
  const match = /^([0-9a-f]{4})\/([0-9a-f]{12})$/.exec(key.slice(prefix.length));
  if (!match) return undefined;
  const id = parseInt(match[2], 16);
  return parseInt(match[1], 16) === spreadOf(id) && classOf(id) < sizeClassCount ? id : undefined;
}

/**
 * 16 bits of a hash of the id (murmur3's finalizer over both 32-bit halves): stable,
 * and consecutive ids land far apart.
 */
function spreadOf(id: number): number {
  let h = (id >>> 0) ^ Math.imul(Math.floor(id / 2 ** 32), 0x9e3779b1);
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 16;
}
