/**
 * A migration from one NBD server to another: the source VM opens the volume on one
 * server's unix socket, the target VM on another's (two nodes of a cluster, each
 * serving the same volume), and the volume is checked through a third (or either)
 * once both VMs are stopped. For embedded mode (a data node and a relay node) and
 * distributed mode (any two nodes) alike.
 */
import { MigrationRun, runMigration, RunMigrationOptions } from './migrate';
import { nbdVolume } from './nbd-volume';

export interface MigrationBetweenServersOptions extends Omit<RunMigrationOptions, 'disk' | 'targetDisk' | 'readBlock'> {
  /** The volume's export name, the same on every server. */
  exportName: string;
  /** Where the source VM opens the volume (the source node's socket). */
  sourceSocket: string;
  /** Where the target VM opens it (the target node's socket). */
  targetSocket: string;
  /** Where the volume is read once both VMs are stopped; connected only then, so the server may have restarted. */
  verifySocket: string;
  /** Both VMs' disks wait this long for their server to come back (vm.ts, NbdExport). */
  reconnectDelaySeconds?: number;
}

/** `runMigration` with each VM on its own server's socket, the volume read back through Arbor's NBD client. */
export async function runMigrationBetweenServers(options: MigrationBetweenServersOptions): Promise<MigrationRun> {
  const { exportName, sourceSocket, targetSocket, verifySocket, reconnectDelaySeconds, ...rest } = options;
  const volume = nbdVolume({ socketPath: verifySocket, exportName });
  try {
    return await runMigration({
      ...rest,
      disk: { socketPath: sourceSocket, exportName, reconnectDelaySeconds },
      targetDisk: { socketPath: targetSocket, exportName, reconnectDelaySeconds },
      readBlock: volume.readBlock,
    });
  } finally {
    await volume.close();
  }
}
