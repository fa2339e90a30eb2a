import assert from 'node:assert/strict';
import { parseCommandLine, UsageError } from '../../cli/args';
import { commands } from '../../cli/main';

describe('CLI argument parsing', () => {
  it('finds the command with global options before, between or after the words', () => {
    for (const argv of [
      ['--data-dir', '/d', 'volume', 'create', 'a', '--size', '1G'],
      ['volume', '--data-dir', '/d', 'create', 'a', '--size', '1G'],
      ['volume', 'create', 'a', '--size', '1G', '--data-dir', '/d'],
    ]) {
      const result = parseCommandLine(argv, commands);
      assert.deepEqual(result.command?.path, ['volume', 'create']);
      assert.deepEqual(result.parsed?.positionals, ['a']);
      assert.equal(result.parsed?.values['data-dir'], '/d');
      assert.equal(result.parsed?.values.size, '1G');
    }
  });

  it('says which option is unknown, which argument is missing or extra, and which option is required', () => {
    const expect = (argv: string[], pattern: RegExp) =>
      assert.throws(
        () => parseCommandLine(argv, commands),
        (err) => err instanceof UsageError && pattern.test(err.message),
      );
    expect(['volume', 'create', 'a', '--size', '1G', '--frob'], /--frob/);
    expect(['volume', 'create', '--size', '1G'], /missing NAME/);
    expect(['volume', 'rm', 'a', 'b'], /unexpected argument 'b'/);
    expect(['volume', 'create', 'a'], /--size is required/);
    expect(['volume', 'resize', 'a', '--size'], /--size/);
    expect(['volume', 'frobnicate'], /volume takes: create, list/);
    expect(['launch'], /'launch' is not a command/);
  });

  it('help is asked for with --help or no command', () => {
    assert.ok(parseCommandLine([], commands).help);
    const result = parseCommandLine(['volume', 'create', '--help'], commands);
    assert.ok(result.help);
    assert.deepEqual(result.command?.path, ['volume', 'create']);
  });
});
