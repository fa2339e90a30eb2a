import fs from 'node:fs';
import path from 'node:path';

const packageName = 'arbor-csi';

/**
 * The directory holding Arbor's package.json, found by walking up from this file.
 * Code runs from dist/<dir>/*.js (tests, `node dist/cli/main.js`) and from the one
 * bundled file dist/arbor-main.js (which the `arbor` bin runs), so paths to files shipped beside the
 * code (the proto, the native helper) start here, never at `__dirname`. Undefined
 * when Arbor runs outside its package.
 */
export const packageRoot: { dir: string; version: string } | undefined = findPackageRoot();

function findPackageRoot(): { dir: string; version: string } | undefined {
  for (let dir = __dirname; dir !== path.dirname(dir); dir = path.dirname(dir)) {
    try {
      const pkg = JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8')) as { name?: string; version?: string };
      if (pkg.name === packageName) return { dir, version: pkg.version ?? '0.0.0-unknown' };
    } catch {
      // No package.json here (or not ours): look further up.
    }
  }
  return undefined;
}

/** A path inside the package; throws, naming the file, when Arbor runs outside its package. */
export function packagePath(...parts: string[]): string {
  if (!packageRoot)
    throw new Error(`arbor cannot find its package directory (a package.json named ${packageName} above ${__dirname}), so not ${path.join(...parts)}`);
  return path.join(packageRoot.dir, ...parts);
}
