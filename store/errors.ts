/**
 * Errors are values with a code and a sentence a person can act on. The code is
 * mapped once, at each edge, to a gRPC status, an NBD errno or a CLI exit status.
 */
export type ErrorCode =
  | 'invalid-argument'
  | 'not-found'
  | 'already-exists'
  | 'out-of-range'
  | 'failed-precondition'
  | 'resource-exhausted'
  | 'busy'
  | 'aborted'
  | 'read-only'
  | 'unsupported'
  | 'unavailable'
  | 'internal';

export class ArborError extends Error {
  constructor(
    readonly code: ErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'ArborError';
  }
}

export function isArborError(err: unknown, code?: ErrorCode): err is ArborError {
  return err instanceof ArborError && (code === undefined || err.code === code);
}

/** A broken invariant: a bug, never bad input. Asserted in production code. */
export function assert(condition: unknown, what: string): asserts condition {
  if (!condition) throw new ArborError('internal', `internal invariant broken: ${what}`);
}

/** The filesystem refused a write for want of space (or of quota); SQLite says SQLITE_FULL. */
export function isDiskFull(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return code === 'ENOSPC' || code === 'EDQUOT' || code === 'SQLITE_FULL';
}
