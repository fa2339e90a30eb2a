import * as grpc from '@grpc/grpc-js';
import { Int64As, csiProto } from './proto';

type Call = (request?: object) => Promise<Record<string, unknown>>;
/** A server-streaming call (SnapshotMetadata): the response stream, to read or cancel. */
type StreamingCall = (request?: object) => grpc.ClientReadableStream<Record<string, unknown>>;

/** A CSI client over a plugin's gRPC socket, each service's methods as promises (for `arbor csi call`, tests and benchmarks). */
export interface CsiClient {
  identity: Record<string, Call>;
  controller: Record<string, Call>;
  group: Record<string, Call>;
  node: Record<string, Call>;
  metadata: Record<string, StreamingCall>;
  close(): void;
}

/** `int64`: how responses' int64 fields come back (csi/proto.ts), as strings unless asked. */
export function csiClient(socketPath: string, options: { int64?: Int64As } = {}): CsiClient {
  const proto = csiProto(options.int64).csi.v1;
  const address = `unix://${socketPath}`;
  const clients: grpc.Client[] = [];
  const wrap = (Service: grpc.ServiceClientConstructor): Record<string, Call> => {
    const client = new Service(address, grpc.credentials.createInsecure());
    clients.push(client);
    return new Proxy(
      {},
      {
        get:
          (_t, method: string) =>
          (request: object = {}) =>
            new Promise((resolve, reject) => {
              const fn = (client as unknown as Record<string, (r: object, cb: (e: grpc.ServiceError | null, v: Record<string, unknown>) => void) => void>)[
                method
              ];
              if (typeof fn !== 'function') return reject(new Error(`no method ${method}`));
              fn.call(client, request, (err, value) => (err ? reject(err) : resolve(value)));
            }),
      },
    );
  };
  const wrapStreaming = (Service: grpc.ServiceClientConstructor): Record<string, StreamingCall> => {
    const client = new Service(address, grpc.credentials.createInsecure());
    clients.push(client);
    return new Proxy(
      {},
      {
        get:
          (_t, method: string) =>
          (request: object = {}) => {
            const fn = (client as unknown as Record<string, (r: object) => grpc.ClientReadableStream<Record<string, unknown>>>)[method];
            if (typeof fn !== 'function') throw new Error(`no method ${method}`);
            return fn.call(client, request);
          },
      },
    );
  };
  return {
    identity: wrap(proto.Identity as unknown as grpc.ServiceClientConstructor),
    controller: wrap(proto.Controller as unknown as grpc.ServiceClientConstructor),
    group: wrap(proto.GroupController as unknown as grpc.ServiceClientConstructor),
    node: wrap(proto.Node as unknown as grpc.ServiceClientConstructor),
    metadata: wrapStreaming(proto.SnapshotMetadata as unknown as grpc.ServiceClientConstructor),
    close: () => clients.forEach((c) => c.close()),
  };
}

/** Every message of a server-streaming call, once it ended; its error (a grpc.ServiceError) if it failed. */
export function readAll<T = Record<string, unknown>>(stream: grpc.ClientReadableStream<Record<string, unknown>>): Promise<T[]> {
  return new Promise((resolve, reject) => {
    const messages: T[] = [];
    stream.on('data', (message: T) => messages.push(message));
    stream.on('error', reject);
    stream.on('end', () => resolve(messages));
  });
}

/** Asserts the call fails with this gRPC status; returns the error's message. */
export async function expectCode(promise: Promise<unknown>, code: grpc.status, what: string): Promise<string> {
  try {
    await promise;
  } catch (err) {
    const e = err as grpc.ServiceError;
    if (e.code !== code) throw new Error(`${what}: expected ${grpc.status[code]}, got ${grpc.status[e.code]} (${e.details})`);
    return e.details;
  }
  throw new Error(`${what}: expected ${grpc.status[code]}, but it succeeded`);
}

export const status = grpc.status;
