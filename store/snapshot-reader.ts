import { BlobStore } from './blobs/blobs';
import { ArborError } from './errors';
import { SnapshotRecord } from './records';
import { NodeSource, RangeStatus, TreeShape, readTree, treeStatus } from './tree';

/** Read-only access to a snapshot: its tree never changes, so no lock is needed. */
export class SnapshotReader {
  private readonly shape: TreeShape;

  constructor(
    readonly record: SnapshotRecord,
    private readonly nodes: NodeSource,
    private readonly blobs: BlobStore,
  ) {
    this.shape = { root: record.root, depth: record.depth, sizeBytes: record.sizeBytes, extentSizeBytes: record.extentSizeBytes };
  }

  get sizeBytes(): number {
    return this.record.sizeBytes;
  }

  get extentSizeBytes(): number {
    return this.record.extentSizeBytes;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const target = Buffer.allocUnsafe(length);
    await this.readInto(offset, target, 0, length);
    return target;
  }

  async readInto(offset: number, target: Buffer, targetOffset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
    await readTree(this.nodes, this.blobs, this.shape, offset, target, targetOffset, length);
  }

  async blockStatus(offset: number, length: number): Promise<RangeStatus[]> {
    this.checkRange(offset, length);
    return treeStatus(this.nodes, this.shape, offset, length);
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.record.sizeBytes) {
      throw new ArborError(
        'out-of-range',
        `snapshot ${this.record.volumeName}@${this.record.name}: ${length} bytes at offset ${offset} are outside its ${this.record.sizeBytes} bytes`,
      );
    }
  }
}
