import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { netlinkHelperPath } from '../../node-plugin/attach/nbd-netlink';

/** Runs the helper with nothing open but /dev/null on 0, 1 is a pipe, 2 a pipe. */
function helper(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const result = spawnSync(netlinkHelperPath, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

/**
 * arbor-nbd-netlink's command line: what the node plugin passes is checked before any
 * netlink request is made (the kernel side runs in the test node: test/kernel/).
 */
describe('arbor-nbd-netlink: its command line', () => {
  for (const [what, args, message] of [
    ['no command', [], /no command/],
    ['an unknown command', ['attach'], /unknown command 'attach'/],
    [
      'connect without a size',
      ['connect', '--block-size', '4096', '--server-flags', '1', '--fd', '1'],
      /connect needs --size, --block-size and --server-flags/,
    ],
    ['connect without sockets', ['connect', '--size', '4096', '--block-size', '4096', '--server-flags', '1'], /at least one --fd/],
    ['a descriptor that is not a socket', ['connect', '--size', '4096', '--block-size', '4096', '--server-flags', '1', '--fd', '0'], /--fd 0 is not a socket/],
    ['a descriptor that is not open', ['disconnect', '--index', '0', '--fd', '57'], /--fd 57 is not open/],
    ['a negative index', ['disconnect', '--index', '-1'], /--index needs a whole number, not '-1'/],
    ["an index past the kernel's range", ['disconnect', '--index', '4294967296'], /--index: '4294967296' is not a whole number up to 2147483647/],
    ['a size that is not a number', ['connect', '--size', '1GiB'], /--size: '1GiB' is not a whole number/],
    ['an empty identifier', ['reconfigure', '--index', '1', '--identifier', ''], /--identifier must be 1 to 256 bytes/],
    ['an option without its value', ['status', '--index'], /--index needs a value/],
    ['an unknown option', ['status', '--verbose', 'yes'], /unknown option --verbose/],
    ['a block size change on a live device', ['reconfigure', '--index', '1', '--block-size', '512'], /cannot change --block-size/],
  ] as const) {
    it(`refuses ${what} with status 2 and a usage message, before asking the kernel`, () => {
      const result = helper(...args);
      assert.equal(result.status, 2, `${args.join(' ')}: ${result.stdout}${result.stderr}`);
      assert.match(result.stderr, message);
      assert.match(result.stderr, /usage: arbor-nbd-netlink connect/);
      assert.equal(result.stdout, '', 'nothing on stdout: the plugin reads only JSON there');
    });
  }
});
