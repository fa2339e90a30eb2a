import * as grpc from '@grpc/grpc-js';
import { ArborError, ErrorCode, isArborError } from '../store/errors';

/** A CSI error: a gRPC status and a sentence for the CO's events and logs. */
export class CsiError extends Error {
  constructor(
    readonly status: grpc.status,
    message: string,
  ) {
    super(message);
  }
}

const statusFor: Record<ErrorCode, grpc.status> = {
  'invalid-argument': grpc.status.INVALID_ARGUMENT,
  'not-found': grpc.status.NOT_FOUND,
  'already-exists': grpc.status.ALREADY_EXISTS,
  'out-of-range': grpc.status.OUT_OF_RANGE,
  'failed-precondition': grpc.status.FAILED_PRECONDITION,
  'resource-exhausted': grpc.status.RESOURCE_EXHAUSTED,
  busy: grpc.status.ABORTED,
  aborted: grpc.status.ABORTED,
  'read-only': grpc.status.FAILED_PRECONDITION,
  unsupported: grpc.status.UNIMPLEMENTED,
  unavailable: grpc.status.UNAVAILABLE,
  internal: grpc.status.INTERNAL,
};

/** The one place an error becomes a gRPC status. */
export function toGrpcError(err: unknown): grpc.ServiceError {
  let status = grpc.status.INTERNAL;
  let message = 'internal error';
  if (err instanceof CsiError) {
    status = err.status;
    message = err.message;
  } else if (isArborError(err)) {
    status = statusFor[err.code];
    message = err.message;
  } else if (err instanceof Error) {
    message = err.message;
  }
  return Object.assign(new Error(message), { code: status, details: message, metadata: new grpc.Metadata() });
}

export const invalid = (message: string) => new CsiError(grpc.status.INVALID_ARGUMENT, message);
export const notFound = (message: string) => new CsiError(grpc.status.NOT_FOUND, message);
export const failedPrecondition = (message: string) => new CsiError(grpc.status.FAILED_PRECONDITION, message);
export const alreadyExists = (message: string) => new CsiError(grpc.status.ALREADY_EXISTS, message);
export const outOfRange = (message: string) => new CsiError(grpc.status.OUT_OF_RANGE, message);
export const aborted = (message: string) => new CsiError(grpc.status.ABORTED, message);

export { ArborError };
