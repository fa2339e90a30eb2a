/**
 * The collector's coordination: one pass at a time (per store, and where processes
 * share the catalog, per cluster: the `gc/pass` key), the consistent cut it marks
 * from, and the frees held back while any pass may still read what they free.
 * Mark and sweep themselves are in gc.ts.
 */
import { Log } from '../lib/logger';
import { gcFreedBlobs, gcLastSeconds, gcRuns } from '../lib/metrics';
import { BlobIdAllocator, committedMarks } from './allocator';
import { classOf, serialOf } from './blob-id';
import { absent, del, put } from './catalog/catalog';
import { StoreContext } from './context';
import { decode, shape, string } from './decode';
import { AfterCollection } from './deferred-frees';
import { ArborError } from './errors';
import { GcReport, GcRoot, markAndSweep } from './gc';
import { OpenVolumes } from './open-volumes';
import { Ownership } from './ownership';
import { decodeSnapshot, decodeVolume, keys } from './records';

/** Present while a collector pass runs somewhere (where processes share the catalog). */
const gcPassKey = 'gc/pass';

export class Collector {
  private pass?: Promise<GcReport>;
  /** The last pass this process completed: when it ended and what it found (for `arbor status`). */
  lastPass?: { endedAt: number; report: GcReport };
  private passHere = false;
  /** Set while the cut is taken: no volume may open until it is. */
  private cutting?: Promise<void>;
  readonly frees: AfterCollection;

  constructor(
    private readonly ctx: StoreContext,
    private readonly volumes: OpenVolumes,
    private readonly log: Log,
    private readonly ownership?: Ownership,
  ) {
    // A collector elsewhere may be marking from a cut that still reaches freed blobs:
    // its key was written before it listed the roots, so if the key is absent now
    // (after our commit), any later pass lists roots that no longer reach them.
    this.frees = new AfterCollection(
      async () => this.passHere || (this.ownership !== undefined && (await this.ctx.catalog.get(gcPassKey)) !== undefined),
      (ids) => this.ctx.blobs.delete(ids),
    );
  }

  /** Waits while a cut is being taken (a volume opening now would miss it). */
  async cutTaken(): Promise<void> {
    if (this.cutting) await this.cutting;
  }

  /**
   * One mark-and-sweep pass. It starts on a consistent cut: every open volume held
   * and committed, the allocator's watermark read, the catalog's roots listed; then
   * marking and sweeping run while volumes take writes again. Blobs that volumes free
   * meanwhile are held back until the pass ends, so every node the mark reads exists.
   */
  collect(nodeId: string | undefined): Promise<GcReport> {
    this.pass ??= this.runPass(nodeId).finally(() => (this.pass = undefined));
    return this.pass;
  }

  /** Waits for a pass that runs, whatever its outcome. */
  async idle(): Promise<void> {
    await this.pass?.catch(() => {});
  }

  private async runPass(nodeId: string | undefined): Promise<GcReport> {
    this.passHere = true;
    // Where processes share the catalog: one collector at a time, announced by a key
    // that lives with this process's lease; while it is there, every process holds its frees.
    const lease = this.ownership ? await this.ownership.currentLease() : undefined;
    try {
      if (lease && !(await this.ctx.catalog.txn([absent(gcPassKey)], [put(gcPassKey, { nodeId, startedAt: new Date().toISOString() }, lease)])).succeeded) {
        const running = await this.ctx.catalog.get(gcPassKey);
        const by = running ? decode(running, 'a collector pass record', shape<{ nodeId: string }>({ nodeId: string })).nodeId : 'another node';
        throw new ArborError('busy', `node ${by} is collecting garbage now; try again when it is done`);
      }
      try {
        const { roots, allocatedAfter, aboveWatermark } = await this.takeCut();
        const report = await markAndSweep(this.ctx, roots, allocatedAfter, aboveWatermark);
        this.log.info('garbage collected', { ...report });
        this.lastPass = { endedAt: Date.now(), report };
        gcRuns.inc();
        gcFreedBlobs.inc(report.freedBlobs);
        gcLastSeconds.set(report.durationMs / 1000);
        return report;
      } finally {
        if (lease) await this.ctx.catalog.txn([], [del(gcPassKey)]).catch(() => {});
      }
    } finally {
      this.passHere = false;
      await this.frees.release();
    }
  }

  /**
   * The roots to mark from and, for any id, whether the pass must leave it alone
   * (`allocatedAfter`: it may be in a tree not committed yet) and whether no root of
   * the cut can reach it (`aboveWatermark`: handed out after every committed tree).
   */
  private async takeCut(): Promise<{ roots: GcRoot[]; allocatedAfter: (id: number) => boolean; aboveWatermark: (id: number) => boolean }> {
    let cutTaken!: () => void;
    this.cutting = new Promise((resolve) => (cutTaken = resolve));
    const releases: Array<() => void> = [];
    try {
      await this.volumes.settled();
      const volumes = this.volumes.volumes().sort((a, b) => (a.id < b.id ? -1 : 1));
      for (const volume of volumes) releases.push(await volume.hold());
      for (const volume of volumes) await volume.flushWhileHeld();
      const local = await this.ctx.ids.watermark();
      let allocatedAfter = local;
      let aboveWatermark = local;
      if (this.ownership) {
        // Other processes hand out ids too: anything at or above the committed marks
        // (read first), or inside a batch some process still holds (listed after), may
        // be in a tree not committed yet. Committed trees only reach ids below the marks.
        const marks = await committedMarks(this.ctx.catalog);
        const held = await BlobIdAllocator.recordedBatches(this.ctx.catalog, (await this.ownership.currentLease()).id);
        aboveWatermark = (id) => serialOf(id) >= marks[classOf(id)];
        allocatedAfter = (id) => local(id) || aboveWatermark(id) || held(id);
      }
      const records = [...(await this.ctx.catalog.list(keys.volumes)).map(decodeVolume), ...(await this.ctx.catalog.list(keys.snapshots)).map(decodeSnapshot)];
      return { roots: records.map((r) => ({ root: r.root, depth: r.depth })), allocatedAfter, aboveWatermark };
    } finally {
      for (const release of releases) release();
      this.cutting = undefined;
      cutTaken();
    }
  }
}
