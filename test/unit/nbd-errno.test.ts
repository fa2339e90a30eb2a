import assert from 'node:assert/strict';
import { CMD, NBD_EINVAL, NBD_EIO, NBD_ENOSPC } from '../../node-plugin/nbd/protocol';
import { errnoFor } from '../../node-plugin/nbd/transmission';
import { ArborError } from '../../store/errors';

/** An error as Node's fs gives one for a failed system call. */
function systemError(code: string, errno: number): NodeJS.ErrnoException {
  return Object.assign(new Error(`${code}: no space left on device, write`), { code, errno, syscall: 'write' });
}

describe('NBD error numbers for what the store throws', () => {
  it('a full disk under the store (ENOSPC, EDQUOT) is NBD_ENOSPC, saying what to do, for writes and for reads that had to write', () => {
    for (const [code, errno] of [
      ['ENOSPC', -28],
      ['EDQUOT', -122],
    ] as const) {
      for (const type of [CMD.WRITE, CMD.WRITE_ZEROES, CMD.TRIM, CMD.READ]) {
        const [error, message] = errnoFor(systemError(code, errno), type);
        assert.equal(error, NBD_ENOSPC, `${code} on command ${type}`);
        assert.match(message, new RegExp(`disk under the store is full \\(${code}\\): free space there or move volumes`));
      }
    }
  });

  it("other system errors stay EIO, and the store's own codes keep their numbers", () => {
    assert.deepEqual(errnoFor(Object.assign(new Error('EIO: i/o error, write'), { code: 'EIO', errno: -5 }), CMD.WRITE), [NBD_EIO, 'internal error']);
    assert.equal(errnoFor(new ArborError('out-of-range', 'past the end'), CMD.WRITE)[0], NBD_ENOSPC);
    assert.equal(errnoFor(new ArborError('out-of-range', 'past the end'), CMD.READ)[0], NBD_EINVAL);
  });

  it("a write the store refuses while its disk is full (resource-exhausted) is NBD_ENOSPC with the store's words", () => {
    const refused = new ArborError('resource-exhausted', "volume v: the node's disk under the store is full (ENOSPC), so writes are refused");
    assert.deepEqual(errnoFor(refused, CMD.WRITE), [NBD_ENOSPC, refused.message]);
    assert.deepEqual(errnoFor(refused, CMD.WRITE_ZEROES), [NBD_ENOSPC, refused.message]);
    assert.equal(errnoFor(refused, CMD.READ)[0], NBD_EIO);
  });
});
