import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import path from 'node:path';
import type { ProtoGrpcType } from './generated/csi';

/**
 * The CSI services from our own csi.proto, loaded at run time with proto-loader:
 * the proto stays the one source of truth, and `npm run generate` turns it into the
 * TypeScript types under csi/generated at build time. Options match the generator's
 * (field names as in the proto, 64-bit integers as strings, enums as names,
 * defaults filled in, oneof fields named).
 */
export const protoPath = path.join(__dirname, '../../csi/proto/csi.proto');

export const loaderOptions: protoLoader.Options = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

let loaded: ProtoGrpcType | undefined;

export function csiProto(): ProtoGrpcType {
  loaded ??= grpc.loadPackageDefinition(protoLoader.loadSync(protoPath, loaderOptions)) as unknown as ProtoGrpcType;
  return loaded;
}

export const driverName = 'csi.arbor.dev';
/** The topology key: in embedded mode a volume lives on the node that holds the data directory. */
export const nodeTopologyKey = 'topology.csi.arbor.dev/node';
