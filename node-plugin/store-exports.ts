import { formatSize } from '../lib/units';
import { ArborError } from '../store/errors';
import { Store, VolumeHandle } from '../store/store';
import { SnapshotReader } from '../store/snapshot-reader';
import { RangeStatus } from '../store/tree';
import { Volume } from '../store/volume';
import { ExportProvider, ExportSummary, NbdExport } from './nbd/export';

/**
 * The store's volumes and snapshots as NBD exports: a volume by its name
 * (read-write), a snapshot as NAME@SNAP (read-only). Every connection to a volume
 * shares its one open Volume, so a flush on any connection covers every write
 * completed on all of them (CAN_MULTI_CONN).
 */
export class StoreExports implements ExportProvider {
  constructor(private readonly store: Store) {}

  async open(name: string): Promise<NbdExport | undefined> {
    const at = name.indexOf('@');
    if (at < 0) {
      const record = await this.store.findVolume({ name });
      // Each connection holds the volume; the last to close lets it go (where volumes have owners).
      return record && new VolumeExport(await this.store.acquireVolume({ id: record.id }));
    }
    const snapshot = await this.store.findSnapshot({ name: name.slice(at + 1) });
    if (!snapshot || snapshot.volumeName !== name.slice(0, at)) return undefined;
    return new SnapshotExport(name, await this.store.openSnapshot({ id: snapshot.id }));
  }

  async list(): Promise<ExportSummary[]> {
    const volumes = (await this.store.listVolumes()).map((v) => ({ name: v.name, description: `volume, ${formatSize(v.sizeBytes)}` }));
    const snapshots = (await this.store.listSnapshots()).map((s) => ({
      name: `${s.volumeName}@${s.name}`,
      description: `snapshot, ${formatSize(s.sizeBytes)}, read-only`,
    }));
    return [...volumes, ...snapshots];
  }
}

class VolumeExport implements NbdExport {
  readonly readOnly = false;
  private readonly volume: Volume;

  constructor(private readonly handle: VolumeHandle) {
    this.volume = handle.volume;
  }

  close(): Promise<void> {
    return this.handle.release();
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
    return this.volume.readInto(offset, target, targetOffset, length);
  }

  write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    return this.volume.write(offset, data, { fua });
  }

  flush(): Promise<void> {
    return this.volume.flush();
  }

  trim(offset: number, length: number): Promise<void> {
    return this.volume.trim(offset, length);
  }

  zero(offset: number, length: number, options: { noHole: boolean; fua: boolean; fast: boolean }): Promise<void> {
    return this.volume.writeZeroes(offset, length, options);
  }

  blockStatus(offset: number, length: number): Promise<RangeStatus[]> {
    return this.volume.blockStatus(offset, length);
  }

  async cache(offset: number, length: number): Promise<void> {
    // Walking the map loads its nodes; data stays where the page cache has it.
    await this.volume.blockStatus(offset, length);
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
