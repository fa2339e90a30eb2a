import path from 'node:path';
import { Log } from '../lib/logger';
import { NbdClient, NbdError } from '../node-plugin/nbd/client';
import { CMD_FLAG, NBD_EINVAL, NBD_ENOSPC, NBD_EPERM } from '../node-plugin/nbd/protocol';
import { NbdExport } from '../node-plugin/nbd/export';
import { StoreExports } from '../node-plugin/store-exports';
import { Store } from '../store/store';
import { isDistributed, openStore, StoreLocation } from '../store/open';
import os from 'node:os';
import { ArborError } from '../store/errors';
import { RangeStatus } from '../store/tree';
import { AdminClient } from './admin/client';
import { StoreApi } from './admin/methods';

/** A volume (NAME) or snapshot (NAME@SNAP) opened for import or export. */
export type Image = Omit<NbdExport, 'cache' | 'description'> & { close(): Promise<void> };

/**
 * How a command reaches the store: opened here when no server holds the data
 * directory, or through a running `arbor serve` (its admin socket for management,
 * its NBD socket for data), so the CLI behaves the same either way.
 */
export interface Session {
  api: StoreApi;
  /** Set when talking to a running server. */
  serverPid?: number;
  /** The running server's NBD socket, if it serves one. */
  nbdSocket?: string;
  /** The running server's admin client, for the calls that are the server's own. */
  admin?: AdminClient;
  /** The store, when it is open in this process. */
  store?: Store;
  openImage(exportName: string): Promise<Image>;
  close(): Promise<void>;
}

export function adminSocketPath(dataDir: string): string {
  return path.join(dataDir, 'arbor.sock');
}

export async function openSession(location: StoreLocation, log: Log): Promise<Session> {
  // With etcd and S3 there is no process to go through: this one joins the store
  // (as its own node, with a private cache) and asks volumes' owners when it must.
  const admin = isDistributed(location) ? undefined : await AdminClient.connect(adminSocketPath(location.dataDir));
  if (admin) {
    const info = await admin.serverInfo();
    return {
      api: admin.api,
      serverPid: info.pid,
      nbdSocket: info.nbdSocket,
      admin,
      async openImage(exportName) {
        if (!info.nbdSocket) {
          throw new ArborError(
            'failed-precondition',
            `the server holding this data directory (pid ${info.pid}) serves no NBD socket; restart it with --nbd-socket, or stop it`,
          );
        }
        return remoteImage(await NbdClient.connect({ socketPath: info.nbdSocket, exportName }).catch((err) => rethrow(err, exportName)), exportName);
      },
      async close() {
        admin.close();
      },
    };
  }
  const store = await openStore(location, { log, nodeId: `cli-${os.hostname()}-${process.pid}`, ephemeralCache: true });
  return localSession(store, new StoreExports(store), () => store.close());
}

/** A session on a store open in this process (the CLI's own, or a server's for work it does itself). */
export function localSession(store: Store, exports: StoreExports, close: () => Promise<void>): Session {
  return {
    api: store,
    store,
    async openImage(exportName) {
      const exp = await exports.open(exportName);
      if (!exp) throw new ArborError('not-found', `${exportName.includes('@') ? 'snapshot' : 'volume'} ${exportName} does not exist`);
      // The export's own close lets go of the volume; keep it as the image's close.
      const release = exp.close?.bind(exp);
      return Object.assign(exp, { close: release ?? (async () => {}) });
    },
    close,
  };
}

function rethrow(err: unknown, exportName: string): never {
  if (err instanceof ArborError) throw err;
  throw new ArborError('not-found', `the server cannot serve ${exportName}: ${(err as Error).message}`);
}

/** NBD requests carry 32-bit lengths: a larger trim or zero goes as several. */
const largestRangeRequest = 1024 * 1024 * 1024;

async function inPieces(offset: number, length: number, fn: (offset: number, length: number) => Promise<void>): Promise<void> {
  for (let done = 0; done < length; done += largestRangeRequest) await fn(offset + done, Math.min(largestRangeRequest, length - done));
}

/** An export of the running server, reached over its NBD socket. */
function remoteImage(client: NbdClient, name: string): Image {
  const maxRequest = Math.min(client.blockSizes.maximum, 4 * 1024 * 1024);
  const call = async <T>(fn: () => Promise<T>): Promise<T> => {
    try {
      return await fn();
    } catch (err) {
      if (err instanceof NbdError) {
        const code =
          err.errno === NBD_EINVAL ? 'invalid-argument' : err.errno === NBD_ENOSPC ? 'out-of-range' : err.errno === NBD_EPERM ? 'read-only' : 'internal';
        throw new ArborError(code, `${name}: ${err.message}`);
      }
      throw err;
    }
  };
  return {
    name,
    sizeBytes: client.sizeBytes,
    preferredBlockBytes: client.blockSizes.preferred,
    readOnly: (client.transmissionFlags & 2) !== 0,
    async readInto(offset, target, targetOffset, length) {
      for (let done = 0; done < length; done += maxRequest) {
        const n = Math.min(maxRequest, length - done);
        (await call(() => client.read(offset + done, n))).copy(target, targetOffset + done);
      }
    },
    async write(offset, data, fua) {
      for (let done = 0; done < data.length; done += maxRequest) {
        const n = Math.min(maxRequest, data.length - done);
        await call(() => client.write(offset + done, data.subarray(done, done + n), fua ? CMD_FLAG.FUA : 0));
      }
    },
    flush: () => call(() => client.flush()),
    trim: (offset, length) => inPieces(offset, length, (at, n) => call(() => client.trim(at, n))),
    zero: (offset, length, options) =>
      inPieces(offset, length, (at, n) =>
        call(() => client.zero(at, n, (options.noHole ? CMD_FLAG.NO_HOLE : 0) | (options.fua ? CMD_FLAG.FUA : 0) | (options.fast ? CMD_FLAG.FAST_ZERO : 0))),
      ),
    async blockStatus(offset, length) {
      // The server may describe less than asked: ask again for the rest.
      const out: RangeStatus[] = [];
      for (let at = offset; at < offset + length;) {
        const ranges = await call(() => client.blockStatus(at, Math.min(offset + length - at, 0xffffffff - 0xfff)));
        for (const range of ranges) {
          const clipped = Math.min(range.length, offset + length - at);
          out.push({ ...range, length: clipped });
          at += clipped;
        }
      }
      return out;
    },
    close: () => client.disconnect(),
  };
}
