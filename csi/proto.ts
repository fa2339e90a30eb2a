import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { packagePath } from '../lib/package-root';
import type { ProtoGrpcType } from './generated/csi';

/**
 * The CSI services from our own csi.proto, loaded at run time with proto-loader:
 * the proto stays the one source of truth, and `npm run generate` turns it into the
 * TypeScript types under csi/generated at build time. Options match the generator's
 * (field names as in the proto, 64-bit integers as strings, enums as names,
 * defaults filled in, oneof fields named).
 */
export const protoPath = packagePath('csi', 'proto', 'csi.proto');

export const loaderOptions: protoLoader.Options = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

/**
 * How a client decodes int64 fields: as decimal strings (the generated types', and
 * what `arbor csi call` prints), or as numbers, exact below 2^53 (every size and time
 * here), as a Go client's int64 is. protobufjs makes a Long of each and then a
 * string of that: for a page of 500 snapshots that was half the client's decoding.
 * The server decodes requests one way only, the generated types' (strings).
 */
export type Int64As = 'string' | 'number';

const loaded = new Map<Int64As, ProtoGrpcType>();

/** The services, their messages decoded as the generated types say (or, for a client that asks, int64 fields as numbers). */
export function csiProto(int64: Int64As = 'string'): ProtoGrpcType {
  let proto = loaded.get(int64);
  if (!proto) {
    const options = int64 === 'number' ? { ...loaderOptions, longs: Number } : loaderOptions;
    proto = grpc.loadPackageDefinition(protoLoader.loadSync(protoPath, options)) as unknown as ProtoGrpcType;
    loaded.set(int64, proto);
  }
  return proto;
}

export const driverName = 'csi.arbor.dev';
/** The topology key: in embedded mode a volume lives on the node that holds the data directory. */
export const nodeTopologyKey = 'topology.csi.arbor.dev/node';
