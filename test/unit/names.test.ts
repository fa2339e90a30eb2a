import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { validateAttachRequest } from '../../node-plugin/attach/attacher';
import { nbdUri } from '../../node-plugin/attach/userspace';
import { formatRef, hiddenNamePrefix, nameProblem, parseRefText, quoteName, unquoteName, validateName } from '../../store/names';
import { isArborError } from '../../store/errors';
import { bannedNames, specNames } from '../support/names';
import { tempDir } from '../support/tmp';

describe('names as the CSI spec allows them', () => {
  it('accepts every spec-valid name, up to 128 bytes of UTF-8 whatever the characters', () => {
    for (const name of specNames) assert.equal(nameProblem(name), undefined, JSON.stringify(name));
    assert.equal(Buffer.byteLength('😀'.repeat(32)), 128);
  });

  it('refuses 129 bytes, the empty name, each banned control character and lone surrogates, naming the field and the rule', () => {
    assert.match(nameProblem('é'.repeat(64) + 'a')!, /129 bytes in UTF-8, more than 128/);
    assert.match(nameProblem('')!, /empty/);
    for (const name of bannedNames) assert.match(nameProblem(name)!, /control character U\+00[0-9A-F]{2}, which the CSI spec bans/, JSON.stringify(name));
    assert.match(nameProblem('a\ud800b')!, /lone surrogate/);
    assert.match(nameProblem('a\udc00')!, /lone surrogate/);
    try {
      validateName('x'.repeat(129), 'snapshot', 'name');
      assert.fail('accepted');
    } catch (err) {
      assert.ok(isArborError(err, 'invalid-argument'));
      assert.match(
        (err as Error).message,
        /^name "x+" is not a valid snapshot name: it is 129 bytes .*; a name is 1 to 128 bytes of UTF-8 without the control characters/,
      );
    }
  });

  it('hidden names start with a banned character: no valid name is one', () => {
    assert.ok(nameProblem(`${hiddenNamePrefix}receive-0123`));
  });

  it("quotes only '@' and '%', so names without them are written as they are", () => {
    assert.equal(quoteName('vm-1.disk_2'), 'vm-1.disk_2');
    assert.equal(quoteName('a@b%c'), 'a%40b%25c');
    assert.equal(formatRef('vm@prod', '50%@daily'), 'vm%40prod@50%25%40daily');
    for (const name of specNames) {
      assert.equal(unquoteName(quoteName(name)), name);
      assert.deepEqual(parseRefText(formatRef(name)), { volume: name });
      assert.deepEqual(parseRefText(formatRef(name, name)), { volume: name, snapshot: name });
    }
    assert.equal(unquoteName('a%40B%2f'), undefined, "'%' before anything but 25 or 40");
    assert.equal(unquoteName('a%4'), undefined);
    assert.equal(unquoteName('100%'), undefined);
    assert.equal(unquoteName('a%40b'), 'a@b');
    assert.equal(unquoteName('a@b'), undefined, "a raw '@'");
    assert.match(parseRefText('a@b@c') as string, /more than one '@'/);
    assert.match(parseRefText('a@') as string, /empty/);
    assert.match(parseRefText('@b') as string, /empty/);
  });

  it('the node plugin attaches any quoted name: the attach request passes and the nbdfuse URI encodes it', () => {
    const dir = tempDir();
    try {
      const workDir = path.join(dir.dir, 'work');
      fs.mkdirSync(workDir);
      for (const name of specNames) {
        validateAttachRequest({ exportName: formatRef(name), volumeId: 'vol-1', readOnly: false, socketPath: '/run/arbor/nbd.sock', workDir });
        validateAttachRequest({ exportName: formatRef(name, name), volumeId: 'vol-1', readOnly: true, socketPath: '/run/arbor/nbd.sock', workDir });
        const uri = new URL(nbdUri({ exportName: formatRef(name), socketPath: '/run/arbor/nbd.sock' }));
        assert.equal(decodeURIComponent(uri.pathname.slice(1)), formatRef(name));
      }
      assert.equal(nbdUri({ exportName: 'vm-1', socketPath: '/run/nbd.sock' }), 'nbd+unix:///vm-1?socket=/run/nbd.sock', 'old names unchanged');
      assert.equal(
        nbdUri({ exportName: 'vm-1@snap.2', socketPath: '/run/nbd.sock' }),
        'nbd+unix:///vm-1@snap.2?socket=/run/nbd.sock',
        'old snapshot names unchanged',
      );
      assert.equal(nbdUri({ exportName: formatRef('a@b %', 'c'), socketPath: '/run/nbd.sock' }), 'nbd+unix:///a%2540b%20%2525@c?socket=/run/nbd.sock');
      assert.throws(
        () => validateAttachRequest({ exportName: 'a@b@c', volumeId: 'vol-1', readOnly: true, socketPath: '/run/nbd.sock', workDir }),
        /is not a volume name or NAME@SNAP/,
      );
      assert.throws(
        () => validateAttachRequest({ exportName: 'bad\u0001', volumeId: 'vol-1', readOnly: true, socketPath: '/run/nbd.sock', workDir }),
        /control character U\+0001/,
      );
    } finally {
      dir.cleanup();
    }
  });
});
