import { NbdExport } from './nbd/export';

/**
 * What stands between a served volume's connections and the volume, so that a
 * move (cli/move.ts) can stop its writes for a moment and then send every request
 * somewhere else: open (requests go to the local volume), held (writes, trims,
 * zeroes and flushes wait; reads go on, the volume no longer changes) or moved
 * (every request goes to the volume's new home).
 *
 * Holding waits until the changes already sent to the volume have completed, so a
 * snapshot taken while held has every change any client was told had completed.
 */
export class VolumeGate {
  /** Connections using the volume through this gate. */
  users = 0;
  private changesInFlight = 0;
  private drained?: () => void;
  private held?: { released: Promise<void>; release: () => void };
  private target?: NbdExport;

  /** Where requests go when the volume has moved; undefined while it is served here. */
  get movedTo(): NbdExport | undefined {
    return this.target;
  }

  /** Changes go to the local volume at once: neither held nor moved. */
  get open(): boolean {
    return !this.target && !this.held;
  }

  /** Runs a change on the local volume, or (held) once released, or (moved) on the new home. */
  change(local: () => Promise<void>, moved: (target: NbdExport) => Promise<void>): Promise<void> {
    if (this.target) return moved(this.target);
    if (this.held) return this.held.released.then(() => this.change(local, moved));
    this.changesInFlight++;
    return local().finally(() => {
      if (--this.changesInFlight === 0) this.drained?.();
    });
  }

  /** Stops changes: resolves when those in flight have completed. */
  async hold(): Promise<void> {
    if (this.held || this.target) throw new Error('the volume is already held or moved');
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    this.held = { released, release };
    if (this.changesInFlight > 0) await new Promise<void>((resolve) => (this.drained = resolve));
    this.drained = undefined;
  }

  /** Lets changes go again: to the local volume, or (`movedTo`) to the volume's new home. */
  release(movedTo?: NbdExport): void {
    if (movedTo) this.target = movedTo;
    const held = this.held;
    this.held = undefined;
    held?.release();
  }
}

/** One gate per volume id, for as long as the server runs. */
export class VolumeGates {
  private readonly gates = new Map<string, VolumeGate>();

  for(volumeId: string): VolumeGate {
    let gate = this.gates.get(volumeId);
    if (!gate) this.gates.set(volumeId, (gate = new VolumeGate()));
    return gate;
  }
}
