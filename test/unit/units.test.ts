import assert from 'node:assert/strict';
import { formatSize, parseDuration, parseSize, UnitError } from '../../lib/units';

describe('sizes and durations', () => {
  it('reads binary and decimal units and plain bytes', () => {
    assert.equal(parseSize('512MiB'), 512 * 1024 ** 2);
    assert.equal(parseSize('10GiB'), 10 * 1024 ** 3);
    assert.equal(parseSize('1T'), 1024 ** 4);
    assert.equal(parseSize('1g'), 1024 ** 3);
    assert.equal(parseSize('1GB'), 1e9);
    assert.equal(parseSize('4096'), 4096);
    assert.equal(parseSize('1.5K'), 1536);
  });

  it('refuses what is not a whole number of bytes, naming the input', () => {
    for (const bad of ['', 'ten', '1.3', '5 parsecs', '-1G', '1e3']) {
      assert.throws(
        () => parseSize(bad, '--size'),
        (err) => err instanceof UnitError && err.message.includes('--size'),
      );
    }
  });

  it('prints sizes in binary units', () => {
    assert.equal(formatSize(0), '0 B');
    assert.equal(formatSize(1536), '1.50 KiB');
    assert.equal(formatSize(64 * 1024 ** 3), '64 GiB');
  });

  it('reads durations', () => {
    assert.equal(parseDuration('500ms'), 500);
    assert.equal(parseDuration('30s'), 30000);
    assert.equal(parseDuration('10m'), 600000);
    assert.throws(() => parseDuration('10'), UnitError);
  });
});
