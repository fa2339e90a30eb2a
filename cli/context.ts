import path from 'node:path';
import { Log } from '../lib/logger';
import { openDataDir } from '../store/embedded';
import { Store } from '../store/store';

/** What a command gets: its streams, where the store is, and a way to open it. */
export interface CliContext {
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream;
  stdin: NodeJS.ReadableStream;
  dataDir: string;
  log: Log;
  /** Opens the store for the duration of `fn` and closes it after, committing everything. */
  withStore<T>(fn: (store: Store) => Promise<T>): Promise<T>;
}

export function defaultDataDir(env: NodeJS.ProcessEnv, cwd: string): string {
  return path.resolve(cwd, env.ARBOR_DATA_DIR ?? 'arbor-data');
}

export function embeddedStoreOpener(dataDir: string, log: Log): CliContext['withStore'] {
  return async (fn) => {
    const store = await openDataDir(dataDir, log);
    try {
      return await fn(store);
    } finally {
      await store.close();
    }
  };
}
