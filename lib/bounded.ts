/** Work with a bound on how much of it runs at once. */

/** `items` in consecutive runs of at most `size` (a request's or a transaction's bound). */
export function chunksOf<T>(items: readonly T[], size: number): T[][] {
  const chunks: T[][] = [];
  for (let i = 0; i < items.length; i += size) chunks.push(items.slice(i, i + size));
  return chunks;
}

/** Runs the tasks with at most `limit` in flight; rejects with the first failure after all settle. */
export async function runBounded(tasks: Array<() => Promise<void>>, limit: number): Promise<void> {
  let next = 0;
  let failure: unknown;
  const worker = async (): Promise<void> => {
    while (next < tasks.length) {
      const task = tasks[next++];
      try {
        await task();
      } catch (err) {
        failure ??= err;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, tasks.length) }, worker));
  if (failure !== undefined) throw failure;
}

export type Settled = { outcome: 'done' } | { outcome: 'failed'; error: unknown } | { outcome: 'timed out' };

/**
 * Waits for `work` until `deadline` (ms since the epoch; Infinity waits as long as it
 * takes). Past the deadline the work goes on unawaited: the caller gives up on it.
 */
export async function settleBy(work: Promise<unknown>, deadline: number): Promise<Settled> {
  const settled = work.then(
    (): Settled => ({ outcome: 'done' }),
    (error: unknown): Settled => ({ outcome: 'failed', error }),
  );
  if (deadline === Infinity) return settled;
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<Settled>((resolve) => (timer = setTimeout(() => resolve({ outcome: 'timed out' }), Math.max(0, deadline - Date.now()))));
  try {
    return await Promise.race([settled, timedOut]);
  } finally {
    clearTimeout(timer);
  }
}
