import fs from 'node:fs';
import path from 'node:path';

/** The version in package.json, found from the compiled file's place in dist/. */
export function packageVersion(): string {
  for (let dir = __dirname; dir !== path.dirname(dir); dir = path.dirname(dir)) {
    const candidate = path.join(dir, 'package.json');
    if (fs.existsSync(candidate)) {
      const pkg = JSON.parse(fs.readFileSync(candidate, 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 'arbor-csi' && pkg.version) return pkg.version;
    }
  }
  return '0.0.0-unknown';
}
