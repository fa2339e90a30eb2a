import { packageVersion } from '../lib/version';
import type { IdentityHandlers } from './generated/csi/v1/Identity';
import type { PluginCapability } from './generated/csi/v1/PluginCapability';
import { UnaryHandlers } from './server';
import { driverName } from './proto';

export interface IdentityOptions {
  /** Whether this process serves the Controller (and GroupController) services. */
  controller: boolean;
  /** Whether this process serves the SnapshotMetadata service (only where it holds the store: controller/snapshot-metadata.ts). */
  snapshotMetadata?: boolean;
  /** Ready when the store is open and answers. */
  ready: () => Promise<boolean>;
}

/** The CSI Identity service: who we are, what we offer, whether we are ready. */
export function identityService(options: IdentityOptions): UnaryHandlers<IdentityHandlers> {
  return {
    async GetPluginInfo() {
      return { name: driverName, vendor_version: packageVersion(), manifest: {} };
    },
    async GetPluginCapabilities() {
      const capabilities: PluginCapability[] = [{ volume_expansion: { type: 'ONLINE' } }];
      if (options.controller) {
        capabilities.push(
          { service: { type: 'CONTROLLER_SERVICE' } },
          { service: { type: 'VOLUME_ACCESSIBILITY_CONSTRAINTS' } },
          { service: { type: 'GROUP_CONTROLLER_SERVICE' } },
        );
      }
      if (options.snapshotMetadata) capabilities.push({ service: { type: 'SNAPSHOT_METADATA_SERVICE' } });
      return { capabilities };
    },
    async Probe() {
      return { ready: { value: await options.ready().catch(() => false) } };
    },
  };
}
