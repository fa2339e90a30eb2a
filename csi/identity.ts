import { packageVersion } from '../lib/version';
import { Unary } from './server';
import { driverName } from './proto';

export interface IdentityOptions {
  /** Whether this process serves the Controller (and GroupController) services. */
  controller: boolean;
  /** Ready when the store is open and answers. */
  ready: () => Promise<boolean>;
}

/** The CSI Identity service: who we are, what we offer, whether we are ready. */
export function identityService(options: IdentityOptions): Record<string, Unary> {
  return {
    async GetPluginInfo() {
      return { name: driverName, vendor_version: packageVersion(), manifest: {} };
    },
    async GetPluginCapabilities() {
      const capabilities: object[] = [{ volume_expansion: { type: 'ONLINE' } }];
      if (options.controller) {
        capabilities.push(
          { service: { type: 'CONTROLLER_SERVICE' } },
          { service: { type: 'VOLUME_ACCESSIBILITY_CONSTRAINTS' } },
          { service: { type: 'GROUP_CONTROLLER_SERVICE' } },
        );
      }
      return { capabilities };
    },
    async Probe() {
      return { ready: { value: await options.ready().catch(() => false) } };
    },
  };
}
