import { formatRate, formatSize } from './units';

const redrawEveryMs = 100;
const barWidth = 30;

/**
 * A progress bar on a terminal (redrawn in place at most ten times a second) and
 * nothing otherwise; the caller prints the final line either way.
 */
export class Progress {
  private readonly started = Date.now();
  private lastDraw = 0;
  private done = 0;

  constructor(
    private readonly stream: NodeJS.WriteStream | NodeJS.WritableStream,
    private readonly label: string,
    private readonly total?: number,
  ) {}

  private get enabled(): boolean {
    return (this.stream as NodeJS.WriteStream).isTTY === true;
  }

  advance(bytes: number): void {
    this.done += bytes;
    const now = Date.now();
    if (!this.enabled || now - this.lastDraw < redrawEveryMs) return;
    this.lastDraw = now;
    const elapsed = now - this.started;
    let line = `${this.label} ${formatSize(this.done)}`;
    if (this.total) {
      const fraction = Math.min(1, this.done / this.total);
      const filled = Math.round(fraction * barWidth);
      const remainingMs = fraction > 0 ? (elapsed / fraction) * (1 - fraction) : 0;
      line = `${this.label} [${'#'.repeat(filled)}${'-'.repeat(barWidth - filled)}] ${(fraction * 100).toFixed(0).padStart(3)}% ${formatSize(this.done)}/${formatSize(this.total)} ${formatRate(this.done, elapsed)} ETA ${Math.ceil(remainingMs / 1000)}s`;
    } else {
      line += ` ${formatRate(this.done, elapsed)}`;
    }
    this.stream.write(`\r${line}\x1b[K`);
  }

  /** Clears the bar and returns "N bytes (size) in T s (rate)". */
  finish(): string {
    if (this.enabled && this.lastDraw > 0) this.stream.write('\r\x1b[K');
    const elapsed = Date.now() - this.started;
    return `${this.done} bytes (${formatSize(this.done)}) in ${(elapsed / 1000).toFixed(2)} s (${formatRate(this.done, elapsed)})`;
  }

  get bytes(): number {
    return this.done;
  }
}
