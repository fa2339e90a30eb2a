import { randomBytes } from 'node:crypto';
import { Catalog, Op } from '../catalog/catalog';
import { Check, count, decode, shape, string } from '../decode';
import { chunksOf, runBounded } from '../../lib/bounded';
import { maxCatalogOpsPerTxn, s3PackIndexReadConcurrency } from '../limits';

/** Where a packed blob's bytes are: which pack object, and where in it. */
export interface PackedAt {
  pack: string;
  offset: number;
  length: number;
}

const packedShape: Check<PackedAt> = shape<PackedAt>({ pack: string, offset: count, length: count });

const prefix = 'blob-packs/';
const keyOf = (id: number) => `${prefix}${id.toString(16).padStart(12, '0')}`;

/**
 * Which blobs live inside a pack object (several blobs of one commit uploaded in one
 * PUT), kept in the catalog beside the trees that name them: one key per packed blob,
 * `blob-packs/<id>`, holding the pack's name and the blob's place in it, written by the
 * commit that first names the blob. A blob that has no key here is an object of its own.
 */
export class PackIndex {
  constructor(private readonly catalog: Catalog) {}

  /**
   * The puts that record a pack's members, to ride in the transaction of the commit
   * whose tree names them: a packed blob is found exactly when that tree is there.
   */
  static recordOps(members: Array<{ id: number } & PackedAt>): Op[] {
    return members.map(({ id, pack, offset, length }) => ({ type: 'put', key: keyOf(id), value: JSON.stringify({ pack, offset, length } satisfies PackedAt) }));
  }

  /** Where blob `id` is packed, or undefined when it is not. */
  async locate(id: number): Promise<PackedAt | undefined> {
    const entry = await this.catalog.get(keyOf(id));
    return entry && decode(entry, 'a packed blob', packedShape);
  }

  /**
   * Which of `ids` are packed, and where: one read of `maxCatalogOpsPerTxn` keys at a
   * time, a few at once, instead of a read per blob.
   */
  async locateMany(ids: number[]): Promise<Map<number, PackedAt>> {
    const found = new Map<number, PackedAt>();
    await runBounded(
      chunksOf(ids, maxCatalogOpsPerTxn).map((chunk) => async () => {
        const entries = await this.catalog.getMany(chunk.map(keyOf));
        entries.forEach((entry, i) => entry && found.set(chunk[i], decode(entry, 'a packed blob', packedShape)));
      }),
      s3PackIndexReadConcurrency,
    );
    return found;
  }

  /** Forgets the blobs' places (those that have none are ignored); their packs go once nothing uses them (`packsInUse`). */
  async forget(ids: number[]): Promise<void> {
    for (const chunk of chunksOf(ids, maxCatalogOpsPerTxn)) {
      await this.catalog.txn(
        [],
        chunk.map((id): Op => ({ type: 'delete', key: keyOf(id) })),
      );
    }
  }

  /** Every packed blob, with its pack. */
  async all(): Promise<Array<{ id: number; pack: string }>> {
    return (await this.catalog.list(prefix)).map((entry) => ({
      id: parseInt(entry.key.slice(prefix.length), 16),
      pack: decode(entry, 'a packed blob', packedShape).pack,
    }));
  }
}

/** A pack's name: its first blob's id and 4 random bytes (a pack made again after its plan expired gets a new name). */
export function newPackName(firstId: number): string {
  return `${firstId.toString(16).padStart(12, '0')}-${randomBytes(4).toString('hex')}`;
}

/** The object key of a pack, beside the blobs' keys (which `idOfKey` never confuses with it). */
export function packKey(blobsPrefix: string, name: string): string {
  return `${blobsPrefix}packs/${name}`;
}

/** The pack a key names, or undefined for a key that is not a pack of ours. */
export function packOfKey(blobsPrefix: string, key: string): string | undefined {
  const match = /^packs\/([0-9a-f]{12}-[0-9a-f]{8})$/.exec(key.slice(blobsPrefix.length));
  return key.startsWith(blobsPrefix) && match ? match[1] : undefined;
}
