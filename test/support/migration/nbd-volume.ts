/**
 * The migrated volume as an NBD server holds it, read and written by Arbor's own NBD
 * client on a unix socket: for checking a volume no host file stands behind (an
 * Arbor volume), once the VMs are stopped.
 */
import { NbdClient } from '../../../node-plugin/nbd/client';
import { blockBytes } from './stamp';
import { NbdExport } from './vm';

export interface NbdVolume {
  /** Block `index` (4 KiB) as the server has it now. */
  readBlock: (index: number) => Promise<Buffer>;
  /** Writes a whole block and flushes it (for tests that damage the volume on purpose). */
  writeBlock: (index: number, data: Buffer) => Promise<void>;
  /** Ends the connection, if one was made. */
  close: () => Promise<void>;
}

/**
 * One connection to `disk`, made at the first read or write (not before: the server
 * may be restarted in between), and tried again at the next call if connecting failed.
 */
export function nbdVolume(disk: NbdExport): NbdVolume {
  let client: Promise<NbdClient> | undefined;
  const connection = async (): Promise<NbdClient> => {
    client ??= NbdClient.connect({ socketPath: disk.socketPath, exportName: disk.exportName });
    try {
      return await client;
    } catch (err) {
      client = undefined;
      throw new Error(`cannot read volume ${disk.exportName} through ${disk.socketPath}: ${(err as Error).message}`);
    }
  };
  const checkIndex = (index: number, sizeBytes: number) => {
    if (!Number.isInteger(index) || index < 0 || (index + 1) * blockBytes > sizeBytes)
      throw new Error(`block ${index} is not within volume ${disk.exportName} (${sizeBytes} bytes)`);
  };
  return {
    async readBlock(index) {
      const nbd = await connection();
      checkIndex(index, nbd.sizeBytes);
      return nbd.read(index * blockBytes, blockBytes);
    },
    async writeBlock(index, data) {
      if (data.length !== blockBytes) throw new Error(`a block is ${blockBytes} bytes, not ${data.length}`);
      const nbd = await connection();
      checkIndex(index, nbd.sizeBytes);
      await nbd.write(index * blockBytes, data);
      await nbd.flush();
    },
    async close() {
      const current = client;
      client = undefined;
      if (current) await (await current.catch(() => undefined))?.disconnect();
    },
  };
}
