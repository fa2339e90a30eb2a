/**
 * Blobs are never deleted when they leave a tree: they wait, twice.
 *
 * 1. A volume head drops a blob it owns from its live tree (an overwrite that went to
 *    a new blob, a trim, a replaced node). The committed tree may still use it, so it
 *    waits for the commit that replaces that tree: `AfterCommit`, one per volume.
 * 2. Freed after that commit, it may still be read by a collector pass that marks
 *    from an older cut, here or on another node: it waits for the pass to end:
 *    `AfterCollection`, one per store.
 *
 * Only then does the blob store delete it.
 */

/** Stage 1, one per volume head. */
export class AfterCommit {
  /** Dropped from the live tree since the last capture. */
  private dropped: number[] = [];
  /** Taken by a capture whose commit failed or committed nothing: they go with the next commit. */
  private retry: number[] = [];

  add(...ids: number[]): void {
    this.dropped.push(...ids);
  }

  /** Whether something waits for the next capture (a commit is needed to free it). */
  get pending(): boolean {
    return this.dropped.length > 0;
  }

  /** What a capture takes: its commit frees them. */
  takeForCapture(): number[] {
    return this.dropped.splice(0);
  }

  /** What a completed commit frees: its capture's, and those of earlier captures that could not free theirs. */
  takeForCommit(captured: number[]): number[] {
    return [...captured, ...this.retry.splice(0)];
  }

  /** A commit failed or committed nothing: these wait for the next one. */
  retryLater(ids: number[]): void {
    this.retry.push(...ids);
  }

  /** The head is gone or lost: what it held back is not its to free (or was freed with it). */
  forget(): number[] {
    return [...this.dropped.splice(0), ...this.retry.splice(0)];
  }
}

/**
 * Stage 2, one per store: frees held back while a collector pass may read the blobs.
 * `passRunning` says whether a pass runs here or (where the catalog is shared) on
 * another node; `release` deletes what waits once none does.
 */
export class AfterCollection {
  private held: number[] = [];

  constructor(
    private readonly passRunning: () => Promise<boolean>,
    private readonly deleteNow: (ids: number[]) => Promise<void>,
  ) {}

  /** Deletes the blobs at once, or holds them while a pass runs (or others wait already: they keep their order). */
  async free(ids: number[]): Promise<void> {
    if (ids.length === 0) return;
    if (this.held.length > 0 || (await this.passRunning())) {
      this.held.push(...ids);
      return;
    }
    await this.deleteNow(ids);
  }

  /** Deletes what waits, unless a pass still runs. */
  async release(): Promise<void> {
    if (this.held.length === 0 || (await this.passRunning())) return;
    await this.deleteNow(this.held.splice(0));
  }
}
