/**
 * Records read back from the catalog are checked, never trusted by cast: each record
 * type has one decoder that parses the JSON and checks every field the code reads. A
 * damaged catalog is refused with an error naming the key and what it held, rather
 * than turning into a wrong answer far from its cause. Fields a decoder does not know
 * (a later version's) are kept as they are.
 */
import { ArborError } from './errors';

/** Checks a value found at `path` (for the message: "root", "lineage[2].volumeId") and returns it typed. */
export type Check<T> = (value: unknown, path: string) => T;

/** The value at `path` is not what the record needs. */
class ShapeError extends Error {}

/** Refuses the value at `path`: it is not `expected`. For checks of their own (see `Check`). */
export function invalid(path: string, expected: string, value: unknown): never {
  const shown = JSON.stringify(value);
  throw new ShapeError(
    `${path === '' ? 'it' : path} is ${shown === undefined ? 'missing' : shown.length > 80 ? `${shown.slice(0, 77)}...` : shown}, not ${expected}`,
  );
}

export const string: Check<string> = (value, path) => (typeof value === 'string' ? value : invalid(path, 'a string', value));

export const boolean: Check<boolean> = (value, path) => (typeof value === 'boolean' ? value : invalid(path, 'true or false', value));

/** A whole number from 0 to 2^53 - 1. */
export const count: Check<number> = (value, path) =>
  typeof value === 'number' && Number.isSafeInteger(value) && value >= 0 ? value : invalid(path, 'a whole number', value);

export function optional<T>(check: Check<T>): Check<T | undefined> {
  return (value, path) => (value === undefined ? undefined : check(value, path));
}

export function arrayOf<T>(check: Check<T>): Check<T[]> {
  return (value, path) => {
    if (!Array.isArray(value)) return invalid(path, 'a list', value);
    value.forEach((item, i) => check(item, `${path}[${i}]`));
    return value as T[];
  };
}

export function mapOf<T>(check: Check<T>): Check<Record<string, T>> {
  return (value, path) => {
    if (typeof value !== 'object' || value === null || Array.isArray(value)) return invalid(path, 'an object', value);
    for (const [key, item] of Object.entries(value)) check(item, `${path}.${key}`);
    return value as Record<string, T>;
  };
}

/** An object with at least these fields, each checked. */
export function shape<T>(fields: { [K in keyof T]-?: Check<T[K]> }): Check<T> {
  // Listed once, not per record: a listing checks every record it returns (store/listing.ts).
  const checks = Object.entries<Check<unknown>>(fields);
  return (value, path) => {
    if (typeof value !== 'object' || value === null || Array.isArray(value)) return invalid(path, 'an object', value);
    for (const [name, check] of checks) check((value as Record<string, unknown>)[name], path ? `${path}.${name}` : name);
    return value as T;
  };
}

/**
 * The record a catalog key holds, as `what` ("a volume record"), checked. Throws
 * ArborError('internal') naming the key and what is wrong with it.
 */
export function decode<T>(entry: { key: string; value: string }, what: string, check: Check<T>): T {
  let parsed: unknown;
  try {
    parsed = JSON.parse(entry.value);
  } catch {
    throw damaged(entry, what, 'it is not JSON');
  }
  try {
    return check(parsed, '');
  } catch (err) {
    if (err instanceof ShapeError) throw damaged(entry, what, err.message);
    throw err;
  }
}

/** The error for a catalog key that does not hold `what` (`problem` says why). */
export function damaged(entry: { key: string; value: string }, what: string, problem: string): ArborError {
  const held = entry.value.length > 120 ? `${entry.value.slice(0, 117)}...` : entry.value;
  return new ArborError(
    'internal',
    `catalog key ${entry.key} does not hold ${what}: ${problem} (it holds ${held}); the catalog is damaged: restore it from a backup`,
  );
}
