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
 * JSON lines on stderr, one object per event with a timestamp and a component, so
 * that `kubectl logs` output can be filtered with jq and shipped as is.
 */
export function createLog(options: { level?: string; component?: string } = {}): winston.Logger {
  return winston.createLogger({
    level: options.level ?? process.env.ARBOR_LOG_LEVEL ?? 'info',
    defaultMeta: options.component ? { component: options.component } : undefined,
    format: winston.format.combine(winston.format.timestamp(), winston.format.errors({ stack: false }), winston.format.json()),
    transports: [new winston.transports.Stream({ stream: process.stderr })],
  });
}
