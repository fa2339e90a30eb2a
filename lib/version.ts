import { packageRoot } from './package-root';

/** The version in package.json. */
export function packageVersion(): string {
  return packageRoot?.version ?? '0.0.0-unknown';
}
