import { unquoteName } from '../store/names';
import { parseArgs } from 'node:util';

export class UsageError extends Error {}

export type OptionSpec = { type: 'string' | 'boolean'; short?: string; value?: string; required?: boolean; description: string };

export interface CommandSpec<C> {
  /** The command words, e.g. ['volume', 'create']. */
  path: string[];
  /** Positional arguments, in order; a trailing '?' marks an optional one. */
  positionals: string[];
  options: Record<string, OptionSpec>;
  summary: string;
  run: (context: C, args: ParsedCommand) => Promise<void>;
}

export interface ParsedCommand {
  positionals: string[];
  values: Record<string, string | boolean | undefined>;
}

export const globalOptions: Record<string, OptionSpec> = {
  'data-dir': { type: 'string', value: 'DIR', description: "the embedded store's data directory (default: $ARBOR_DATA_DIR or ./arbor-data)" },
  store: {
    type: 'string',
    value: 'etcd://HOST:PORT[,...]/PREFIX',
    description: 'the distributed catalog in etcd (default: $ARBOR_STORE; none: the embedded data directory)',
  },
  blobs: {
    type: 'string',
    value: 's3://BUCKET/PREFIX?endpoint=URL&region=R',
    description: 'the distributed blobs in S3, with --store (default: $ARBOR_BLOBS); credentials from the AWS environment',
  },
  'etcd-ca': { type: 'string', value: 'FILE', description: 'CA bundle for etcds:// (TLS to etcd)' },
  'etcd-cert': { type: 'string', value: 'FILE', description: 'client certificate for etcd' },
  'etcd-key': { type: 'string', value: 'FILE', description: 'client key for --etcd-cert' },
  'cache-dir': { type: 'string', value: 'DIR', description: 'node-local cache of S3 blobs (default: <data-dir>/blob-cache)' },
  'cache-size': { type: 'string', value: 'SIZE', description: 'how much the blob cache may hold (default 4GiB)' },
  'lease-ttl': { type: 'string', value: 'DURATION', description: 'how long this node keeps its volumes after it stops answering etcd (default 10s)' },
  'log-level': { type: 'string', value: 'LEVEL', description: 'error, warn, info or debug (default: info for serve, node and controller, warn otherwise)' },
  'log-format': {
    type: 'string',
    value: 'FORMAT',
    description: 'text (a line a person reads) or json (one object a line); default: text on a terminal, json otherwise',
  },
  help: { type: 'boolean', short: 'h', description: 'show help' },
};

export function usageLine<C>(command: CommandSpec<C>): string {
  const parts = ['arbor', ...command.path];
  for (const name of command.positionals) parts.push(name.endsWith('?') ? `[${name.slice(0, -1)}]` : name);
  for (const [name, spec] of Object.entries(command.options)) {
    const text = spec.type === 'string' ? `--${name} ${spec.value ?? 'VALUE'}` : `--${name}`;
    parts.push(spec.required ? text : `[${text}]`);
  }
  return parts.join(' ');
}

export interface ParseResult<C> {
  command?: CommandSpec<C>;
  parsed?: ParsedCommand;
  /** The command words given when they name no command (for help). */
  words: string[];
  help: boolean;
}

/**
 * Finds the command named by the leading words (options may come before, between
 * or after them), then parses strictly: an unknown option, a missing value or a
 * wrong number of arguments is a UsageError naming what is wrong.
 */
export function parseCommandLine<C>(argv: string[], commands: CommandSpec<C>[]): ParseResult<C> {
  const takesValue = new Set<string>();
  for (const command of [{ options: globalOptions }, ...commands]) {
    for (const [name, spec] of Object.entries(command.options)) {
      if (spec.type !== 'string') continue;
      takesValue.add(`--${name}`);
      if (spec.short) takesValue.add(`-${spec.short}`);
    }
  }
  const words: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const token = argv[i];
    if (token === '--') break;
    if (token.startsWith('-')) {
      if (takesValue.has(token)) i++;
      continue;
    }
    words.push(token);
  }
  let command: CommandSpec<C> | undefined;
  for (const candidate of commands) {
    const matches = candidate.path.every((word, i) => words[i] === word);
    if (matches && (!command || candidate.path.length > command.path.length)) command = candidate;
  }
  const helpAsked = argv.includes('--help') || argv.includes('-h');
  if (!command) {
    if (helpAsked || words.length === 0) return { words, help: true };
    const known = commands.filter((c) => c.path[0] === words[0]);
    if (known.length > 0) {
      throw new UsageError(`'${words.slice(0, 2).join(' ')}' is not a command; ${words[0]} takes: ${known.map((c) => c.path.slice(1).join(' ')).join(', ')}`);
    }
    throw new UsageError(`'${words[0]}' is not a command; run 'arbor --help' for the list`);
  }
  if (helpAsked) return { command, words, help: true };
  const options = { ...globalOptions, ...command.options };
  let result;
  try {
    result = parseArgs({
      args: argv,
      options: Object.fromEntries(
        Object.entries(options).map(([name, spec]) => [name, spec.short ? { type: spec.type, short: spec.short } : { type: spec.type }]),
      ),
      allowPositionals: true,
      strict: true,
    });
  } catch (err) {
    throw new UsageError(`${(err as Error).message.replace(/\. To specify a positional.*$/s, '')}\nusage: ${usageLine(command)}`);
  }
  const positionals = result.positionals.slice(command.path.length);
  const min = command.positionals.filter((p) => !p.endsWith('?')).length;
  if (positionals.length < min) {
    throw new UsageError(`missing ${command.positionals[positionals.length]}\nusage: ${usageLine(command)}`);
  }
  if (positionals.length > command.positionals.length) {
    throw new UsageError(`unexpected argument '${positionals[command.positionals.length]}'\nusage: ${usageLine(command)}`);
  }
  for (const [name, spec] of Object.entries(command.options)) {
    if (spec.required && result.values[name] === undefined) throw new UsageError(`--${name} is required\nusage: ${usageLine(command)}`);
  }
  return {
    command,
    words,
    help: false,
    parsed: { positionals: positionals.map((text, i) => unquoteArgument(command.positionals[i], text)), values: result.values },
  };
}

/** Positionals that are one volume name, written as store/names.ts quotes it (NAME@SNAP ones are parsed by cli/refs.ts). */
const volumeNamePositionals = new Set(['NAME', 'NAME?', 'NEWNAME']);

function unquoteArgument(label: string, text: string): string {
  if (!volumeNamePositionals.has(label)) return text;
  const name = unquoteName(text);
  if (name === undefined) {
    throw new UsageError(`${label.replace('?', '')} ${JSON.stringify(text)} is not a volume name: write an '@' inside a name as %40 and a '%' as %25`);
  }
  return name;
}

export function helpText<C>(commands: CommandSpec<C>[], only?: CommandSpec<C>): string {
  const lines: string[] = [];
  const shown = only ? [only] : commands;
  lines.push(only ? `usage: ${usageLine(only)}` : 'usage: arbor [--data-dir DIR] COMMAND ...', '');
  for (const command of shown) {
    lines.push(only ? command.summary : `  ${usageLine(command).slice('arbor '.length)}\n      ${command.summary}`);
    if (only) {
      const options = Object.entries({ ...command.options, ...globalOptions });
      if (options.length) lines.push('', 'options:');
      const labels = options.map(([name, spec]) => `  --${name}${spec.type === 'string' ? ` ${spec.value ?? 'VALUE'}` : ''}`);
      const width = Math.max(28, ...labels.map((label) => label.length + 2));
      options.forEach(([, spec], i) => lines.push(labels[i].padEnd(width) + spec.description));
    }
  }
  if (!only) {
    lines.push('', 'global options:');
    for (const [name, spec] of Object.entries(globalOptions)) {
      const value = spec.type === 'string' ? ` ${spec.value}` : '';
      lines.push(`  --${name}${value}`.padEnd(28) + spec.description);
    }
    lines.push(
      '',
      'sizes take units: 512MiB, 10GiB, 1T (powers of 1024), 1GB (powers of 1000), or bytes.',
      'exit status: 0 on success, 1 when the operation failed, 2 on a usage error.',
    );
  }
  return lines.join('\n') + '\n';
}
