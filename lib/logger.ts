import winston from 'winston';

/** The little the inner layers need of a logger; winston's satisfies it. */
export interface Log {
  debug(message: string, meta?: Record<string, unknown>): void;
  info(message: string, meta?: Record<string, unknown>): void;
  warn(message: string, meta?: Record<string, unknown>): void;
  error(message: string, meta?: Record<string, unknown>): void;
}

export const silentLog: Log = { debug() {}, info() {}, warn() {}, error() {} };

/**
 * `json`: one object per line, for `kubectl logs`, jq and log shippers (the default
 * when stderr is not a terminal). `text`: for a person at a terminal.
 */
export type LogFormat = 'json' | 'text';
export const logFormats: readonly LogFormat[] = ['json', 'text'];

/**
 * Log lines on stderr, each event with a timestamp and a component: JSON lines, or
 * with `format: 'text'` a line a person reads (`21:18:16.123 info  message key=value`).
 */
export function createLog(options: { level?: string; component?: string; format?: LogFormat; stream?: NodeJS.WritableStream } = {}): winston.Logger {
  return winston.createLogger({
    level: options.level ?? process.env.ARBOR_LOG_LEVEL ?? 'info',
    defaultMeta: options.component ? { component: options.component } : undefined,
    format: winston.format.combine(
      winston.format.timestamp(),
      winston.format.errors({ stack: false }),
      options.format === 'text' ? winston.format.printf(textLine) : winston.format.json(),
    ),
    transports: [new winston.transports.Stream({ stream: options.stream ?? process.stderr })],
  });
}

/** What the component says is known from the context at a terminal: left out, as are the level and time already shown. */
const textOmits = new Set(['level', 'message', 'timestamp', 'component']);

function textLine(info: winston.Logform.TransformableInfo): string {
  const at = typeof info.timestamp === 'string' ? new Date(info.timestamp) : new Date();
  const two = (n: number) => String(n).padStart(2, '0');
  // Local time, as the terminal's clock shows it.
  const time = `${two(at.getHours())}:${two(at.getMinutes())}:${two(at.getSeconds())}.${String(at.getMilliseconds()).padStart(3, '0')}`;
  const pairs = Object.entries(info)
    .filter(([key, value]) => !textOmits.has(key) && value !== undefined)
    .map(([key, value]) => `${key}=${textValue(value)}`);
  return [time, info.level.padEnd(5), String(info.message), ...pairs].join(' ');
}

/** A value as one word: bare when it has no space, quote or '=', else JSON. */
function textValue(value: unknown): string {
  if (typeof value === 'string') return /^[^\s"'=]+$/.test(value) ? value : JSON.stringify(value);
  if (typeof value === 'number' || typeof value === 'boolean') return String(value);
  return JSON.stringify(value);
}
