import path from 'node:path';
import { Log } from '../lib/logger';
import { StoreLocation } from '../store/open';
import { openSession, Session } from './session';

/** What a command gets: its streams, where the store is, and a way to reach it. */
export interface CliContext {
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream;
  stdin: NodeJS.ReadableStream;
  dataDir: string;
  /** The store the command works on: the data directory, or etcd and S3. */
  location: StoreLocation;
  log: Log;
  /**
   * Reaches the store for the duration of `fn`: through the running server when one
   * holds the data directory, otherwise by opening it here (and closing it after,
   * committing everything).
   */
  withSession<T>(fn: (session: Session) => Promise<T>): Promise<T>;
}

export function defaultDataDir(env: NodeJS.ProcessEnv, cwd: string): string {
  return path.resolve(cwd, env.ARBOR_DATA_DIR ?? 'arbor-data');
}

export function sessionOpener(location: StoreLocation, log: Log): CliContext['withSession'] {
  return async (fn) => {
    const session = await openSession(location, log);
    try {
      return await fn(session);
    } finally {
      await session.close();
    }
  };
}
