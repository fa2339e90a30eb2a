/**
 * Running the bundled program (dist/arbor-main.js) from V8's code cache.
 *
 * Compiling the 2 MB bundle is much of what a start of `arbor` costs before it does
 * anything, and a node plugin that restarts under attached disks should be back
 * quickly. `npm run bundle` runs this file, which compiles the bundle, runs its
 * top level (every module's set-up, not the command) and writes what V8 compiled to
 * dist/arbor-main.cache. The bin (cli/launcher.ts) then compiles with that cache.
 *
 * The cache is never written at run time: the package directory may be read-only.
 * It is used only with the very bundle it was made from: its first 32 bytes are the
 * bundle's SHA-256 (V8 itself checks little more than the source's length). V8
 * refuses it for another Node version or other V8 flags (`--cpu-prof`, say); without
 * a cache, or with one refused, the bundle compiles as it would anyway.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import Module from 'node:module';
import path from 'node:path';
import vm from 'node:vm';

const digestBytes = 32;

export interface Bundle {
  file: string;
  cacheFile: string;
}

/** dist/arbor-main.js and its cache, beside `dir` (dist/ for the bin, dist/cli/ for the build step). */
export function bundleIn(dir: string): Bundle {
  const file = path.join(dir, 'arbor-main.js');
  return { file, cacheFile: file.replace(/\.js$/, '.cache') };
}

/** The bundle's source as a CommonJS wrapper function, on the shebang's line (which becomes a comment, so line numbers stay). */
export function wrapped(source: string): string {
  const text = source.startsWith('#!') ? `//${source.slice(2)}` : source;
  return `(function (exports, require, module, __filename, __dirname) {${text}\n})`;
}

/**
 * Compiles the bundle (from the cache where it fits) and runs it as a CommonJS module.
 * With `asMain` the bundle is the program (`require.main` is its module, so the CLI
 * runs); without, only its modules' top level runs. Returns the script and the source
 * it was compiled from (read once).
 */
export function runBundle(bundle: Bundle, asMain: boolean): { script: vm.Script; source: Buffer } {
  const source = fs.readFileSync(bundle.file);
  const script = new vm.Script(wrapped(source.toString('utf8')), { filename: bundle.file, cachedData: matchingCache(bundle.cacheFile, source) });
  const mod = new Module(bundle.file, module);
  mod.filename = bundle.file;
  const require = Module.createRequire(bundle.file);
  if (asMain) require.main = mod;
  const wrapper = script.runInThisContext() as (...args: unknown[]) => void;
  wrapper.call(mod.exports, mod.exports, require, mod, bundle.file, path.dirname(bundle.file));
  return { script, source };
}

/** The V8 data of the cache file when it was made from exactly `source`; undefined otherwise. */
function matchingCache(cacheFile: string, source: Buffer): Buffer | undefined {
  let cache: Buffer;
  try {
    cache = fs.readFileSync(cacheFile);
  } catch {
    return undefined;
  }
  if (cache.length <= digestBytes || !cache.subarray(0, digestBytes).equals(digestOf(source))) return undefined;
  return cache.subarray(digestBytes);
}

function digestOf(source: Buffer): Buffer {
  return crypto.createHash('sha256').update(source).digest();
}

/** The build step: runs the bundle's top level, then writes the cache for it. Returns the cache's size in bytes. */
export function writeCodeCache(bundle: Bundle): number {
  const { script, source } = runBundle(bundle, false);
  const cache = Buffer.concat([digestOf(source), script.createCachedData()]);
  const partial = `${bundle.cacheFile}.tmp`;
  fs.writeFileSync(partial, cache);
  fs.renameSync(partial, bundle.cacheFile);
  return cache.length;
}

if (require.main === module) {
  writeCodeCache(bundleIn(path.join(__dirname, '..')));
  // The bundle's modules may have left handles open (timers, the metrics' collectors).
  process.exit(0);
}
