import { formatSize } from '../lib/units';
import { ArborError } from '../store/errors';
import { formatRef, parseRefText } from '../store/names';
import { Store, VolumeHandle } from '../store/store';
import { SnapshotReader } from '../store/snapshot-reader';
import { RangeStatus } from '../store/tree';
import { Volume } from '../store/volume';
import { ExportProvider, ExportSummary, NbdExport } from './nbd/export';
import { QosThrottle, QosThrottles } from './qos-throttle';
import { VolumeGate, VolumeGates } from './volume-gate';

/** A volume moved to another store: where its requests go now, shared by every connection. */
export interface MovedVolume {
  /** Another use of the shared route to the volume's new home (closed by the connection). */
  open(): NbdExport;
}

/**
 * The store's volumes and snapshots as NBD exports: a volume by its name
 * (read-write), a snapshot as NAME@SNAP (read-only), names quoted as store/names.ts
 * says ('@' as %40, '%' as %25). Every connection to a volume
 * shares its one open Volume, so a flush on any connection covers every write
 * completed on all of them (CAN_MULTI_CONN).
 */
export class StoreExports implements ExportProvider {
  /** Where a move (cli/move.ts) stops a volume's writes and then sends its requests. */
  readonly gates = new VolumeGates();
  private readonly moved = new Map<string, MovedVolume>();
  /** Each served volume's QoS limits, enforced across its connections. */
  readonly throttles: QosThrottles;

  constructor(
    private readonly store: Store,
    /** `qos: false` leaves the QoS check off the request path (bench:nbd measures what it costs). */
    private readonly options: { qos?: boolean } = {},
  ) {
    this.throttles = new QosThrottles((id, listener) => this.store.followVolumeQos(id, listener));
  }

  /** Clients that connect to `name` from now on reach the volume where it moved. */
  markMoved(name: string, to: MovedVolume): void {
    this.moved.set(name, to);
  }

  async open(name: string): Promise<NbdExport | undefined> {
    const ref = parseRefText(name);
    if (typeof ref === 'string') return undefined;
    if (ref.snapshot === undefined) {
      const record = await this.store.findVolume({ name: ref.volume });
      if (!record) return this.moved.get(name)?.open();
      // Each connection holds the volume; the last to close lets it go (where volumes have owners).
      const handle = await this.store.acquireVolume({ id: record.id });
      if (this.options.qos === false) return new VolumeExport(handle, this.gates.for(record.id));
      let throttle: QosThrottle;
      try {
        throttle = await this.throttles.acquire(record.id, record.name);
      } catch (err) {
        await handle.release();
        throw err;
      }
      return new VolumeExport(handle, this.gates.for(record.id), throttle, () => this.throttles.release(record.id));
    }
    const snapshot = await this.store.findSnapshot({ volume: { name: ref.volume }, name: ref.snapshot });
    if (!snapshot) return undefined;
    return new SnapshotExport(formatRef(ref.volume, ref.snapshot), await this.store.openSnapshot({ id: snapshot.id }));
  }

  async list(): Promise<ExportSummary[]> {
    const volumes = (await this.store.listVolumes()).map((v) => ({ name: formatRef(v.name), description: `volume, ${formatSize(v.sizeBytes)}` }));
    const snapshots = (await this.store.listSnapshots()).map((s) => ({
      name: formatRef(s.volumeName, s.name),
      description: `snapshot, ${formatSize(s.sizeBytes)}, read-only`,
    }));
    return [...volumes, ...snapshots];
  }
}

class VolumeExport implements NbdExport {
  readonly readOnly = false;
  private readonly volume: Volume;

  constructor(
    private readonly handle: VolumeHandle,
    private readonly gate: VolumeGate,
    private readonly throttle?: QosThrottle,
    private readonly releaseThrottle?: () => void,
  ) {
    this.volume = handle.volume;
    gate.users++;
  }

  close(): Promise<void> {
    this.gate.users--;
    this.releaseThrottle?.();
    return this.handle.release();
  }

  /**
   * Undefined: the request goes now; otherwise when the volume's QoS limits let it
   * (reads and writes cost one request and their bytes, trims and zeroes one request).
   * Once moved, the volume's new home enforces them.
   */
  private admit(bytes: number): Promise<void> | undefined {
    return this.throttle?.limited && !this.gate.movedTo ? this.throttle.admit(bytes) : undefined;
  }

  // Reads go to the volume until it has moved (while a move holds its writes it does not change).
  private get reader(): { readInto: NbdExport['readInto']; blockStatus: NbdExport['blockStatus'] } {
    return this.gate.movedTo ?? this.volume;
  }

  get name(): string {
    return this.volume.name;
  }

  get description(): string {
    return `volume ${this.volume.name}`;
  }

  get sizeBytes(): number {
    return this.volume.sizeBytes;
  }

  get preferredBlockBytes(): number {
    return this.volume.extentSizeBytes;
  }

  readInto(offset: number, target: Buffer, targetOffset: number, length: number): Promise<void> {
    const wait = this.admit(length);
    if (wait) return wait.then(() => this.reader.readInto(offset, target, targetOffset, length));
    return this.reader.readInto(offset, target, targetOffset, length);
  }

  /** Only where nothing stands in the way: the volume served here, and its QoS limits (if any) letting the read go now. */
  readIntoNow(offset: number, target: Buffer, targetOffset: number, length: number): boolean {
    const throttle = this.throttle;
    if (this.gate.movedTo || (throttle !== undefined && !throttle.mayGoNow(length))) return false;
    if (!this.volume.readIntoNow(offset, target, targetOffset, length)) return false;
    throttle?.charge(length);
    return true;
  }

  /** Only with the gate open (a write done at once is complete before any hold can begin) and the QoS limits letting it go now. */
  writeNow(offset: number, data: Buffer): boolean {
    const throttle = this.throttle;
    if (!this.gate.open || (throttle !== undefined && !throttle.mayGoNow(data.length))) return false;
    if (!this.volume.writeNow(offset, data)) return false;
    throttle?.charge(data.length);
    return true;
  }

  write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    const wait = this.admit(data.length);
    if (wait) return wait.then(() => this.writeAdmitted(offset, data, fua));
    return this.writeAdmitted(offset, data, fua);
  }

  private writeAdmitted(offset: number, data: Buffer, fua: boolean): Promise<void> {
    return this.gate.change(
      () => this.volume.write(offset, data, { fua }),
      (moved) => moved.write(offset, data, fua),
    );
  }

  flush(): Promise<void> {
    return this.gate.change(
      () => this.volume.flush(),
      (moved) => moved.flush(),
    );
  }

  trim(offset: number, length: number): Promise<void> {
    const wait = this.admit(0);
    if (wait) return wait.then(() => this.trimNow(offset, length));
    return this.trimNow(offset, length);
  }

  private trimNow(offset: number, length: number): Promise<void> {
    return this.gate.change(
      () => this.volume.trim(offset, length),
      (moved) => moved.trim(offset, length),
    );
  }

  zero(offset: number, length: number, options: { noHole: boolean; fua: boolean; fast: boolean }): Promise<void> {
    const wait = this.admit(0);
    if (wait) return wait.then(() => this.zeroNow(offset, length, options));
    return this.zeroNow(offset, length, options);
  }

  private zeroNow(offset: number, length: number, options: { noHole: boolean; fua: boolean; fast: boolean }): Promise<void> {
    return this.gate.change(
      () => this.volume.writeZeroes(offset, length, options),
      (moved) => moved.zero(offset, length, options),
    );
  }

  blockStatus(offset: number, length: number): Promise<RangeStatus[]> {
    return this.reader.blockStatus(offset, length);
  }

  async cache(offset: number, length: number): Promise<void> {
    // Walking the map loads its nodes; data stays where the page cache has it.
    await this.reader.blockStatus(offset, length);
  }
}

class SnapshotExport implements NbdExport {
  readonly readOnly = true;

  constructor(
    readonly name: string,
    private readonly snapshot: SnapshotReader,
  ) {}

  get description(): string {
    return `snapshot ${this.name} (read-only)`;
  }

  get sizeBytes(): number {
    return this.snapshot.sizeBytes;
  }

  get preferredBlockBytes(): number {
    return this.snapshot.extentSizeBytes;
  }

  readInto(offset: number, target: Buffer, targetOffset: number, length: number): Promise<void> {
    return this.snapshot.readInto(offset, target, targetOffset, length);
  }

  async write(): Promise<void> {
    throw readOnly(this.name);
  }

  async flush(): Promise<void> {}

  async trim(): Promise<void> {
    throw readOnly(this.name);
  }

  async zero(): Promise<void> {
    throw readOnly(this.name);
  }

  blockStatus(offset: number, length: number): Promise<RangeStatus[]> {
    return this.snapshot.blockStatus(offset, length);
  }

  async cache(offset: number, length: number): Promise<void> {
    await this.snapshot.blockStatus(offset, length);
  }
}

function readOnly(name: string): ArborError {
  return new ArborError('read-only', `snapshot ${name} is read-only; clone it to write`);
}
