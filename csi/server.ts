import * as grpc from '@grpc/grpc-js';
import fs from 'node:fs';
import path from 'node:path';
import { Log } from '../lib/logger';
import { csiRequests, csiRequestSeconds } from '../lib/metrics';
import { ArborError } from '../store/errors';
import { responseEncoders } from './encode';
import { toGrpcError } from './errors';
import type { ControllerHandlers } from './generated/csi/v1/Controller';
import type { GroupControllerHandlers } from './generated/csi/v1/GroupController';
import type { IdentityHandlers } from './generated/csi/v1/Identity';
import type { NodeHandlers } from './generated/csi/v1/Node';
import type { SnapshotMetadataHandlers } from './generated/csi/v1/SnapshotMetadata';
import { csiProto } from './proto';

/**
 * One CSI service's methods as promises, typed from the handler types
 * `npm run generate` writes for csi.proto: each takes its request as decoded (the
 * `__Output` type, defaults filled in) and returns what its response message
 * accepts. A name that is not an RPC of the service does not compile; an RPC left
 * out answers UNIMPLEMENTED.
 */
export type UnaryHandlers<H> = {
  // The generated types extend grpc's UntypedServiceImplementation: its index signature is not an RPC.
  [M in keyof H as string extends M ? never : M]?: H[M] extends grpc.handleUnaryCall<infer Request, infer Response>
    ? (request: Request) => Promise<Response>
    : never;
};

/** The sending side of a server-streaming call, as its handler sees it. */
export interface ResponseStream<Response> {
  /**
   * Sends one message. While the client's flow-control window is full this waits,
   * so a slow reader holds the handler back instead of the server queueing messages
   * without bound. Resolves false once the client has gone (cancelled, deadline
   * passed, connection lost): the handler should stop working and return.
   */
  send(message: Response): Promise<boolean>;
  /** Whether the client has gone. */
  readonly cancelled: boolean;
}

/**
 * A service's server-streaming methods (SnapshotMetadata), typed from the generated
 * handler types like `UnaryHandlers`: each takes its decoded request and the stream
 * to send its responses on, and resolves when it sent the last one. Throwing ends
 * the stream with the error's gRPC status (csi/errors.ts).
 */
export type StreamingHandlers<H> = {
  [M in keyof H as string extends M ? never : M]?: H[M] extends grpc.handleServerStreamingCall<infer Request, infer Response>
    ? (request: Request, stream: ResponseStream<Response>) => Promise<void>
    : never;
};

export interface CsiServices {
  Identity: UnaryHandlers<IdentityHandlers>;
  Controller?: UnaryHandlers<ControllerHandlers>;
  GroupController?: UnaryHandlers<GroupControllerHandlers>;
  Node?: UnaryHandlers<NodeHandlers>;
  SnapshotMetadata?: StreamingHandlers<SnapshotMetadataHandlers>;
}

/** Any service's method, as the server sees it: grpc decodes each request with that method's own definition. */
type Unary = (request: object) => Promise<object>;
type Streaming = (request: object, stream: ResponseStream<object>) => Promise<void>;

/** "unix:///run/csi/csi.sock", "unix:/run/csi/csi.sock" or a bare path → the socket path. */
export function socketPathOf(endpoint: string): string {
  const match = /^unix:(?:\/\/)?(\/.+)$/.exec(endpoint) ?? /^(\/.+)$/.exec(endpoint);
  if (!match) throw new ArborError('invalid-argument', `CSI endpoint ${JSON.stringify(endpoint)} is not unix:///ABSOLUTE/PATH`);
  return match[1];
}

/**
 * Serves the given CSI services over gRPC on a unix socket. Every call is logged
 * (method, outcome, duration; never its secrets) and every error becomes a gRPC
 * status in one place (csi/errors.ts). Methods not given answer UNIMPLEMENTED.
 */
export async function startCsiServer(endpoint: string, services: CsiServices, log: Log): Promise<{ socketPath: string; stop: () => Promise<void> }> {
  const socketPath = socketPathOf(endpoint);
  fs.mkdirSync(path.dirname(socketPath), { recursive: true });
  fs.rmSync(socketPath, { force: true });
  const server = new grpc.Server({ 'grpc.max_receive_message_length': 4 * 1024 * 1024 });
  const proto = csiProto().csi.v1;
  for (const [name, implementation] of Object.entries(services) as Array<[keyof CsiServices, Record<string, Unary | Streaming | undefined> | undefined]>) {
    if (!implementation) continue;
    const definition: grpc.ServiceDefinition = withEncoders(name, proto[name].service);
    const handlers: grpc.UntypedServiceImplementation = {};
    for (const [method, handler] of Object.entries(implementation)) {
      if (!(method in definition)) throw new Error(`${name}.${method} is not in csi.proto`);
      if (!handler) continue;
      const { requestStream, responseStream } = definition[method];
      if (requestStream) throw new Error(`${name}.${method} streams requests: the CSI server serves none`);
      handlers[method] = responseStream ? wrapStreaming(`${name}.${method}`, handler as Streaming, log) : wrap(`${name}.${method}`, handler as Unary, log);
    }
    server.addService(definition, handlers);
  }
  await new Promise<void>((resolve, reject) =>
    server.bindAsync(`unix://${socketPath}`, grpc.ServerCredentials.createInsecure(), (err) => (err ? reject(err) : resolve())),
  );
  fs.chmodSync(socketPath, 0o600);
  log.info('CSI server listening', { endpoint: `unix://${socketPath}`, services: Object.keys(services).filter((k) => services[k as keyof CsiServices]) });
  return {
    socketPath,
    stop: () =>
      new Promise<void>((resolve) => {
        server.tryShutdown(() => resolve());
        setTimeout(() => server.forceShutdown(), 5000).unref();
      }),
  };
}

/** The service's definition, with the responses csi/encode.ts encodes encoded there (protobufjs for what it leaves). */
export function withEncoders(name: string, definition: grpc.ServiceDefinition): grpc.ServiceDefinition {
  return Object.fromEntries(
    Object.entries(definition).map(([method, attrs]) => {
      const encode = responseEncoders[`${name}.${method}`];
      if (!encode) return [method, attrs];
      const protobufjs = attrs.responseSerialize;
      return [method, { ...attrs, responseSerialize: (response: object) => encode(response) ?? protobufjs(response) }];
    }),
  );
}

function wrap(method: string, handler: Unary, log: Log): grpc.handleUnaryCall<object, object> {
  return (call, callback) => {
    const started = Date.now();
    const timer = csiRequestSeconds.startTimer({ method });
    handler(call.request).then(
      (response) => {
        timer();
        csiRequests.inc({ method, code: 'OK' });
        log.debug('CSI call', { method, ms: Date.now() - started, request: redact(call.request) });
        callback(null, response);
      },
      (err: unknown) => {
        timer();
        callback(callFailed(method, started, err, call.request, log));
      },
    );
  };
}

/**
 * A server-streaming method: logged and counted like a unary call (with the number
 * of messages sent), its error sent as the stream's status, and a client that goes
 * away mid-stream logged as such, never answered.
 */
function wrapStreaming(method: string, handler: Streaming, log: Log): grpc.handleServerStreamingCall<object, object> {
  return (call) => {
    const started = Date.now();
    const timer = csiRequestSeconds.startTimer({ method });
    let messages = 0;
    // Whoever waits for the client to drain its window: woken when the client goes too (no drain follows a cancel).
    const waiting = new Set<() => void>();
    const gone = () => call.cancelled || call.destroyed;
    call.once('cancelled', () => {
      for (const wake of waiting) wake();
      waiting.clear();
    });
    const stream: ResponseStream<object> = {
      get cancelled() {
        return gone();
      },
      async send(message) {
        if (gone()) return false;
        messages++;
        if (call.write(message)) return true;
        await new Promise<void>((resolve) => {
          const wake = () => {
            call.off('drain', wake);
            waiting.delete(wake);
            resolve();
          };
          waiting.add(wake);
          call.on('drain', wake);
        });
        return !gone();
      },
    };
    const cancelled = () => {
      csiRequests.inc({ method, code: 'CANCELLED' });
      log.info('CSI call cancelled by the client', { method, ms: Date.now() - started, messages, request: redact(call.request) });
    };
    handler(call.request, stream).then(
      () => {
        timer();
        if (gone()) return cancelled();
        csiRequests.inc({ method, code: 'OK' });
        log.debug('CSI call', { method, ms: Date.now() - started, messages, request: redact(call.request) });
        call.end();
      },
      (err: unknown) => {
        timer();
        if (gone()) return cancelled();
        const status = callFailed(method, started, err, call.request, log, { messages });
        // grpc-js sends an 'error' event's status as the stream's trailers, after what was written.
        call.emit('error', status);
      },
    );
  };
}

/** A call's failure as its gRPC status: counted, and logged (as an error when it is the driver's fault). */
function callFailed(method: string, started: number, err: unknown, request: unknown, log: Log, extra: Record<string, unknown> = {}): grpc.ServiceError {
  const status = toGrpcError(err);
  csiRequests.inc({ method, code: grpc.status[status.code] });
  const level = status.code === grpc.status.INTERNAL || status.code === grpc.status.UNKNOWN ? 'error' : 'info';
  log[level]('CSI call failed', {
    method,
    ms: Date.now() - started,
    ...extra,
    code: grpc.status[status.code],
    error: status.details,
    request: redact(request),
  });
  return status;
}

/** The request without anything marked csi_secret (every `secrets` map in csi.proto). */
export function redact(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(redact);
  if (value && typeof value === 'object') {
    const out: Record<string, unknown> = {};
    for (const [key, inner] of Object.entries(value)) out[key] = key === 'secrets' ? '[redacted]' : redact(inner);
    return out;
  }
  return value;
}
