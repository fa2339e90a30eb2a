import fs from 'node:fs';
import path from 'node:path';

const packageName = 'arbor-csi';
/** null until looked up; undefined when there is none. */
let found: { dir: string; version: string } | undefined | null = null;

/**
 * The directory holding Arbor's package.json, found by walking up from this file.
 * Code runs from dist/<dir>/*.js (tests, `node dist/cli/main.js`) and from the one
 * bundled file dist/arbor.js (the `arbor` bin), so paths to files shipped beside the
 * code (the proto, the native helper) start here, never at `__dirname`.
 */
export function packageRoot(): { dir: string; version: string } | undefined {
  if (found !== null) return found;
  found = undefined;
  for (let dir = __dirname; dir !== path.dirname(dir); dir = path.dirname(dir)) {
    try {
      const pkg = JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8')) as { name?: string; version?: string };
      if (pkg.name === packageName) {
        found = { dir, version: pkg.version ?? '0.0.0-unknown' };
        break;
      }
    } catch {
      // No package.json here (or not ours): look further up.
    }
  }
  return found;
}

/** A path inside the package; throws, naming the file, when Arbor runs outside its package. */
export function packagePath(...parts: string[]): string {
  const root = packageRoot();
  if (!root) throw new Error(`arbor cannot find its package directory (a package.json named ${packageName} above ${__dirname}), so not ${path.join(...parts)}`);
  return path.join(root.dir, ...parts);
}
