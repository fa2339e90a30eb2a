/**
 * Moving a volume to another store while it is in use: incremental pre-copy, as in
 * live migration of persistent storage. A full send of a first snapshot, then
 * rounds that each send only what changed since the last one (the tree diff makes
 * a round cost what changed), until a round is small; then the volume's writes are
 * held for one last round, and its connections are switched to the destination:
 * from then on the source's NBD server relays them there. The pause users see is
 * that last round, measured and reported.
 */
import { randomBytes } from 'node:crypto';
import { Transform, Writable } from 'node:stream';
import { Log } from '../lib/logger';
import { Progress } from '../lib/progress';
import { RelayExport } from '../node-plugin/relay/relay-export';
import { RoutedVolume } from '../node-plugin/relay/routed-volume';
import { StoreExports } from '../node-plugin/store-exports';
import { VolumeGate } from '../node-plugin/volume-gate';
import { ArborError } from '../store/errors';
import { OwnedElsewhere } from '../store/ownership';
import { SnapshotRecord, VolumeRecord } from '../store/records';
import { VolumeHandle } from '../store/store';
import { Session } from './session';
import { receiveSnapshot } from './stream/receive';
import { sendSnapshot } from './stream/send';

export interface MoveOptions {
  /** Pre-copy stops when a round changed at most this many bytes: the last round (the pause) then sends about that. */
  finalRoundBytes: number;
  /** Pre-copy rounds at most, before the last one, for a volume written faster than it can be sent. */
  maxRounds: number;
  /** The last round may hold writes this long; longer, it is cancelled and the volume stays where it was. */
  maxPauseMs: number;
  log: Log;
  /** Told after each round. */
  onRound?: (round: RoundReport) => void;
}

export const defaultMoveOptions = { finalRoundBytes: 64 * 1024 * 1024, maxRounds: 8, maxPauseMs: 5000 };

export interface RoundReport {
  round: number;
  kind: 'full' | 'incremental' | 'final';
  /** Bytes the round's stream covered (what changed). */
  changedBytes: number;
  streamBytes: number;
  /** Taking the round's snapshot: it commits the volume, which holds its writes meanwhile. */
  snapshotMs: number;
  ms: number;
}

export interface MoveReport {
  volume: string;
  sizeBytes: number;
  rounds: RoundReport[];
  /** How long writes were held (the last round and the switch); undefined when nothing used the volume. */
  pauseMs?: number;
  /** Connections switched to the destination. */
  switchedConnections: number;
  ms: number;
}

export interface MoveSource {
  session: Session;
  /** The source server's exports, when it serves the volume: its connections are switched. */
  exports?: StoreExports;
}

export interface MoveDestination {
  session: Session;
  /** The destination server's NBD socket: where the source relays the volume's connections. */
  nbdSocket?: string;
}

export async function moveVolume(source: MoveSource, destination: MoveDestination, name: string, options: MoveOptions): Promise<MoveReport> {
  const started = Date.now();
  const volume = await source.session.api.getVolume({ name });
  await checkMovable(source, destination, volume);
  const gate = source.exports?.gates.for(volume.id);
  if (gate && gate.users > 0 && !destination.nbdSocket) {
    throw new ArborError(
      'failed-precondition',
      `volume ${name} is in use (${gate.users} connections) and its users can only be switched to a running server: start 'arbor serve' on the destination (with its NBD socket) or name a server's socket with --to-nbd-socket, then move`,
    );
  }
  // Not served here: hold the volume for the whole move, so no other process can write it meanwhile.
  const holding = gate ? undefined : await holdVolume(source, volume);
  const move = new Move(source, destination, volume, options);
  try {
    const report = await move.run(gate);
    return { ...report, ms: Date.now() - started };
  } catch (err) {
    await move.undo();
    throw err;
  } finally {
    await holding?.release();
  }
}

async function holdVolume(source: MoveSource, volume: VolumeRecord): Promise<VolumeHandle | undefined> {
  if (!source.session.store) return undefined;
  try {
    return await source.session.store.acquireVolume({ id: volume.id });
  } catch (err) {
    if (err instanceof OwnedElsewhere) {
      throw new ArborError(
        'failed-precondition',
        `volume ${volume.name} is in use on node ${err.owner.nodeId}; move it from the server that serves it, or stop its users first`,
      );
    }
    throw err;
  }
}

async function checkMovable(source: MoveSource, destination: MoveDestination, volume: VolumeRecord): Promise<void> {
  const published = Object.keys((await source.session.api.publications(volume.id)).nodes);
  if (published.length > 0) {
    throw new ArborError(
      'failed-precondition',
      `volume ${volume.name} is published to node ${published.join(', ')} through CSI; a move switches NBD connections of 'arbor serve' only: unpublish it first`,
    );
  }
  if (await destination.session.api.findVolume({ name: volume.name })) {
    throw new ArborError('already-exists', `the destination already has a volume ${volume.name}; delete or rename it there first`);
  }
}

class Move {
  private readonly tag = randomBytes(4).toString('hex');
  private readonly rounds: RoundReport[] = [];
  /** The newest snapshot both stores hold: the next round's base. */
  private base?: SnapshotRecord;
  private switched = false;

  constructor(
    private readonly source: MoveSource,
    private readonly destination: MoveDestination,
    private readonly volume: VolumeRecord,
    private readonly options: MoveOptions,
  ) {}

  async run(gate: VolumeGate | undefined): Promise<Omit<MoveReport, 'ms'>> {
    const name = this.volume.name;
    let pauseMs: number | undefined;
    let switchedConnections = 0;
    if (!gate) {
      // Nothing serves the volume here: the caller holds it (no one else can write it), one copy is all.
      await this.round('full');
      this.switched = true;
    } else {
      await this.round('full');
      while (this.rounds.length <= this.options.maxRounds && this.rounds[this.rounds.length - 1].changedBytes > this.options.finalRoundBytes) {
        await this.round('incremental');
      }
      const held = Date.now();
      await gate.hold();
      try {
        await this.withDeadline(() => this.round('final'));
        if (this.destination.nbdSocket) {
          const route = await this.routeTo(this.destination.nbdSocket);
          switchedConnections = gate.users;
          gate.release(route);
          this.source.exports!.markMoved(name, {
            open: () => {
              route.retain();
              return route;
            },
          });
        }
        this.switched = true;
      } finally {
        if (!this.switched) gate.release();
      }
      pauseMs = Date.now() - held;
    }
    this.options.log.info('volume moved', { volume: name, rounds: this.rounds.length, pauseMs, switchedConnections });
    await this.cleanUp();
    return { volume: name, sizeBytes: this.volume.sizeBytes, rounds: this.rounds, pauseMs, switchedConnections };
  }

  /** Takes a snapshot on the source and sends it (whole, or what changed since the last round) to the destination. */
  private async round(kind: RoundReport['kind']): Promise<void> {
    const started = Date.now();
    const src = this.source.session.api;
    const snapshot = await src.createSnapshot({ id: this.volume.id }, `move-${this.tag}-${this.rounds.length + 1}`);
    const snapshotMs = Date.now() - started;
    const base = kind === 'full' ? undefined : this.base;
    let sent: { changedBytes: number; streamBytes: number };
    try {
      sent = await this.transfer(snapshot, base);
    } catch (err) {
      await src.deleteSnapshot({ id: snapshot.id }).catch(() => {});
      throw err;
    }
    const { changedBytes, streamBytes } = sent;
    const previous = this.base;
    this.base = snapshot;
    if (previous) await this.forgetSnapshot(previous.name);
    const report = { round: this.rounds.length + 1, kind, changedBytes, streamBytes, snapshotMs, ms: Date.now() - started };
    this.rounds.push(report);
    this.options.log.info('volume move round', { volume: this.volume.name, ...report });
    this.options.onRound?.(report);
  }

  private transfer(snapshot: SnapshotRecord, base: SnapshotRecord | undefined): Promise<{ changedBytes: number; streamBytes: number }> {
    const expired = this.pastDeadline();
    if (expired) return Promise.reject(expired);
    // Each chunk checks the deadline too: a round whose sender and receiver keep the
    // event loop busy between them may not let the timer run until it is over.
    const pipe = new Transform({
      highWaterMark: 8 * 1024 * 1024,
      transform: (chunk: Buffer, _encoding, done) => done(this.pastDeadline() ?? null, chunk),
    });
    this.cancel = (reason) => pipe.destroy(reason);
    const quiet = (): Progress => new Progress(discard, '');
    const sending = sendSnapshot(this.source.session, snapshot, base, pipe, quiet).then(
      (sent) => {
        pipe.end();
        return sent;
      },
      (err: Error) => {
        pipe.destroy(err);
        throw err;
      },
    );
    const receiving = receiveSnapshot(this.destination.session, pipe, { volume: this.volume.name, snapshot: snapshot.name }, quiet).catch((err: Error) => {
      pipe.destroy(err);
      throw err;
    });
    return Promise.all([sending, receiving])
      .then(([sent]) => ({ changedBytes: sent.coveredBytes, streamBytes: sent.streamBytes }))
      .catch((err: Error) => {
        // Cancelled past the deadline: say so, not what the broken pipe made of it.
        throw this.expired ?? err;
      })
      .finally(() => (this.cancel = undefined));
  }

  /** Stops the transfer in progress (the last round ran out of time). */
  private cancel?: (reason: Error) => void;
  private expired?: ArborError;
  /** When the last round must be over (Date.now()), while it runs. */
  private deadline?: number;

  /** The last round's error once it has run past its deadline (undefined before). */
  private pastDeadline(): ArborError | undefined {
    if (this.deadline !== undefined && Date.now() >= this.deadline) this.expire();
    return this.expired;
  }

  private expire(): ArborError {
    this.expired ??= new ArborError(
      'aborted',
      `the last round of moving ${this.volume.name} took longer than the longest pause allowed (${this.options.maxPauseMs} ms): cancelled, the volume stays on the source; move it when it is written less, or allow a longer pause`,
    );
    return this.expired;
  }

  /**
   * Runs the last round; past the longest pause allowed, cancels it (the volume then
   * stays where it was). A round that completes, however late, is kept: its pause
   * has been paid, and switching is then the shortest way out of it.
   */
  private async withDeadline(fn: () => Promise<void>): Promise<void> {
    const limit = this.options.maxPauseMs;
    this.deadline = Date.now() + limit;
    // For a round that waits (on the destination, say) with no chunk going through the pipe.
    const timer = setTimeout(() => this.cancel?.(this.expire()), limit);
    try {
      await fn();
    } finally {
      clearTimeout(timer);
      this.deadline = undefined;
    }
  }

  private async routeTo(socketPath: string): Promise<RoutedVolume> {
    const name = this.volume.name;
    const log = this.options.log;
    const route = new RoutedVolume(
      name,
      async () => {
        const relay = await RelayExport.open(name, { socketPath }, { connections: 2, requestTimeoutMs: 30_000, log });
        if (!relay) throw new ArborError('not-found', `the destination server at ${socketPath} does not serve volume ${name}`);
        return { backend: relay, local: false };
      },
      { retryMs: 30_000, log },
      () => {},
    );
    // The gate's own use: the route stays for as long as this server runs, and goes with its store.
    route.retain();
    this.source.session.store?.onClosed(() => void route.close());
    await route.ready();
    return route;
  }

  /** After the switch: the source forgets the volume and both stores the move's snapshots. */
  private async cleanUp(): Promise<void> {
    const attempt = async (what: string, fn: () => Promise<unknown>): Promise<void> => {
      await fn().catch((err: Error) => this.options.log.warn(`after moving ${this.volume.name}: could not ${what}`, { error: err.message }));
    };
    if (this.base) await this.forgetSnapshot(this.base.name);
    await attempt('delete the source volume', () => this.source.session.api.deleteVolume({ id: this.volume.id }));
  }

  private async forgetSnapshot(snapshotName: string): Promise<void> {
    for (const api of [this.source.session.api, this.destination.session.api]) {
      await api.deleteSnapshot({ volume: { name: this.volume.name }, name: snapshotName }).catch((err: Error) => {
        this.options.log.warn('a volume move could not delete its snapshot', { volume: this.volume.name, snapshot: snapshotName, error: err.message });
      });
    }
  }

  /** A move that failed before the switch: the destination's copy and the move's snapshots go; the volume stays where it was. */
  async undo(): Promise<void> {
    if (this.switched) return;
    if (this.base) await this.forgetSnapshot(this.base.name);
    const copy = await this.destination.session.api.findVolume({ name: this.volume.name });
    if (copy) await this.destination.session.api.deleteVolume({ id: copy.id }).catch(() => {});
  }
}

const discard = new Writable({
  write(_chunk, _encoding, done) {
    done();
  },
});
