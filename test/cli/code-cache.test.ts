import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import vm from 'node:vm';
import { wrapped } from '../../cli/code-cache';
import { cliPath } from '../support/arbor-server';
import { ok } from '../support/run';

const dist = path.dirname(cliPath);
const bundle = path.join(dist, 'arbor-main.js');
const cache = path.join(dist, 'arbor-main.cache');

/** Runs the top level of the arbor-main.js in `bundleFile`'s directory in a fresh node, as the bin would but without the command; prints what V8 said of the cache. */
function cacheVerdict(bundleFile: string): string {
  const script = `const c = require(${JSON.stringify(path.join(dist, 'cli', 'code-cache.js'))});
const { script } = c.runBundle(c.bundleIn(${JSON.stringify(path.dirname(bundleFile))}), false);
process.stdout.write(script.cachedDataRejected === undefined ? 'not offered' : script.cachedDataRejected ? 'rejected' : 'used');
process.exit(0);`;
  return execFileSync(process.execPath, ['-e', script], { encoding: 'utf8' });
}

describe('the bin runs the bundle from the code cache the build wrote', function () {
  this.timeout(60_000);
  const scratch = path.join(dist, 'code-cache-test');

  before(() => fs.mkdirSync(scratch, { recursive: true }));
  after(() => fs.rmSync(scratch, { recursive: true, force: true }));

  it('the cache holds the bundle digest, V8 takes it, and the bin runs commands through it', async () => {
    const data = fs.readFileSync(cache);
    assert.ok(data.subarray(0, 32).equals(crypto.createHash('sha256').update(fs.readFileSync(bundle)).digest()), 'the cache was made from this bundle');
    assert.equal(cacheVerdict(bundle), 'used');
    assert.match(await ok(process.execPath, [cliPath, '--help']), /^usage: arbor /);
    assert.match(await ok(process.execPath, [cliPath, '--version']), /^arbor \d+\.\d+\.\d+/);
  });

  it('a bundle changed after the cache was made runs without it, even where V8 would take it (same length)', () => {
    // In dist/ (so its external modules resolve), one character of a comment changed.
    const source = fs.readFileSync(bundle, 'utf8');
    const changed = source.replace('//# sourceMappingURL=arbor-main.js.map', '//# sourceMappingURL=arbor-main.js.maq');
    assert.notEqual(changed, source);
    assert.equal(changed.length, source.length);
    const file = path.join(scratch, 'arbor-main.js');
    fs.writeFileSync(file, changed);
    fs.copyFileSync(cache, path.join(scratch, 'arbor-main.cache'));
    // V8 checks little more than the length, so on its own it would use the stale cache.
    assert.equal(new vm.Script(wrapped(changed), { filename: file, cachedData: fs.readFileSync(cache).subarray(32) }).cachedDataRejected, false);
    assert.equal(cacheVerdict(file), 'not offered');
  });

  it('without a cache file the bundle compiles as usual', () => {
    const file = path.join(scratch, 'arbor-main.js');
    fs.copyFileSync(bundle, file);
    fs.rmSync(path.join(scratch, 'arbor-main.cache'), { force: true });
    assert.equal(cacheVerdict(file), 'not offered');
  });
});
