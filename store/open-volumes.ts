/**
 * The volumes this process has open, and who uses each. A volume is opened once
 * however many users it has (NBD connections, CSI calls, owner requests); each use
 * is a handle, and where volumes have owners the last release commits the volume and
 * lets it go, so that another node can take it.
 */
import { Log } from '../lib/logger';
import { Ownership } from './ownership';
import { Volume } from './volume';

/** A counted use of an open volume; the last release lets it go where volumes have owners. */
export interface VolumeHandle {
  volume: Volume;
  release(): Promise<void>;
}

interface OpenVolume {
  volume: Volume;
  users: number;
  /** Opened with openVolume: kept until the store closes. */
  pinned: boolean;
}

export class OpenVolumes {
  private readonly open = new Map<string, OpenVolume>();
  private readonly opening = new Map<string, Promise<Volume>>();
  /** Volumes being let go: a new user waits, then opens afresh. */
  private readonly closing = new Map<string, Promise<void>>();

  constructor(
    /** Opens the volume for this process: takes ownership where there is any, reads its committed record. */
    private readonly openOne: (id: string) => Promise<Volume>,
    private readonly log: Log,
    private readonly ownership?: Ownership,
  ) {}

  /** A counted use of the volume, opened once and shared by every user. */
  async acquire(id: string): Promise<VolumeHandle> {
    const volume = await this.openShared(id);
    const entry = this.open.get(id)!;
    entry.users++;
    let released = false;
    return {
      volume,
      release: async () => {
        if (released) return;
        released = true;
        await this.release(id, volume);
      },
    };
  }

  /** Keeps the volume open until the store closes, whatever its users do. */
  pin(id: string): void {
    const entry = this.open.get(id);
    if (entry) entry.pinned = true;
  }

  get(id: string): Volume | undefined {
    return this.open.get(id)?.volume;
  }

  /** Open, opening or being let go: a transaction that assumes the volume detached must not run. */
  busy(id: string): boolean {
    return this.open.has(id) || this.opening.has(id) || this.closing.has(id);
  }

  /**
   * Lets go of the volume if this process has it open for no one (the embedded store
   * keeps a volume open after its last user), committing what it held, so that a
   * change made to its record from outside it (a received snapshot) meets no stale
   * open copy later. False while it has users, is pinned, or is being opened or let go.
   */
  async letGoUnused(id: string): Promise<boolean> {
    if (this.opening.has(id) || this.closing.has(id)) return false;
    const entry = this.open.get(id);
    if (!entry) return true;
    if (entry.users > 0 || entry.pinned) return false;
    await this.letGo(id, entry.volume);
    return true;
  }

  volumes(): Volume[] {
    return [...this.open.values()].map((entry) => entry.volume);
  }

  /** Resolves when no volume is being opened (the collector's cut may not race an open). */
  async settled(): Promise<void> {
    while (this.opening.size > 0) await Promise.allSettled([...this.opening.values()]);
  }

  /** The volume was deleted: nothing here refers to it any more. */
  forget(volume: Volume): void {
    if (this.open.get(volume.id)?.volume === volume) this.open.delete(volume.id);
  }

  /** The owner lease ended: nothing this process held is its own any more. */
  loseAll(reason: string): void {
    for (const { volume } of this.open.values()) volume.markLost(reason);
    this.open.clear();
  }

  /**
   * Commits every open volume and lets go of it (the store is closing). What fails is
   * logged and the close goes on to the next volume: without a catalog that answers,
   * every volume fails the same way, and the store must still close.
   */
  async closeAll(): Promise<void> {
    for (const { volume } of this.open.values()) {
      try {
        await volume.close();
      } catch (err) {
        this.log.warn('closing: a volume could not commit; it keeps what its last flush made durable', { volume: volume.name, error: (err as Error).message });
      }
      if (volume.guard)
        await this.ownership!.release(volume.guard).catch((err) =>
          this.log.warn('closing: the owner key of a volume could not be deleted; it goes when the owner lease ends', {
            volume: volume.name,
            error: (err as Error).message,
          }),
        );
    }
    this.open.clear();
  }

  private async openShared(id: string): Promise<Volume> {
    for (;;) {
      const closing = this.closing.get(id);
      if (closing) await closing;
      const open = this.open.get(id);
      if (open) return open.volume;
      let opening = this.opening.get(id);
      if (!opening) {
        opening = this.openOne(id)
          .then((volume) => {
            this.open.set(id, { volume, users: 0, pinned: false });
            return volume;
          })
          .finally(() => this.opening.delete(id));
        this.opening.set(id, opening);
      }
      const volume = await opening;
      if (!this.closing.has(id) && this.open.get(id)?.volume === volume) return volume;
    }
  }

  private async release(id: string, volume: Volume): Promise<void> {
    const entry = this.open.get(id);
    // A volume lost and opened again is a new object, counted afresh: this use was of the old one.
    if (!entry || entry.volume !== volume) return;
    if (--entry.users > 0) return;
    // The embedded store owns everything: volumes stay open. Elsewhere, let go.
    if (!this.ownership || entry.pinned) return;
    await this.letGo(id, volume);
  }

  /** Commits and closes the volume and gives up its ownership; a new user waits, then opens it afresh. */
  private letGo(id: string, volume: Volume): Promise<void> {
    const letGo = (async () => {
      try {
        if (volume.isOpen) await volume.close();
      } finally {
        this.open.delete(id);
        if (volume.guard)
          await this.ownership!.release(volume.guard).catch((err) =>
            this.log.warn('letting go of a volume failed; retrying in the background (the owner key ends with the owner lease in any case)', {
              volume: volume.name,
              error: (err as Error).message,
            }),
          );
      }
    })().finally(() => this.closing.delete(id));
    this.closing.set(id, letGo);
    return letGo;
  }
}
