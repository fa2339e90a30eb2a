/**
 * Nodes and publications: what each CSI node plugin recorded about itself, and which
 * nodes each volume is published to (one key per volume, so that two nodes racing
 * to publish a single-node volume cannot both win a compare-and-swap).
 */
import { absent, del, put, unchanged } from './catalog/catalog';
import { StoreContext } from './context';
import { ArborError } from './errors';
import { NodeRecord, Publication, Publications, VolumeRecord, decodeNode, decodePublications, keys } from './records';

export interface PublishOptions {
  readOnly: boolean;
  /** Published to several nodes at once. */
  multiNode: boolean;
  /** Read-write on several nodes at once (a Block volume, e.g. while a VM live-migrates); needs multiNode. Absent: false. */
  multiNodeWriter?: boolean;
}

/** How the nodes a volume is published to share it; every publication of a volume shares it the same way. */
type Sharing = 'one node' | 'readers' | 'writers';

function sharingOf(publication: Publication): Sharing {
  if (!publication.multiNode) return 'one node';
  return publication.multiNodeWriter ? 'writers' : 'readers';
}

function describe(sharing: Sharing): string {
  return sharing === 'one node' ? 'for one node only' : `for ${sharing} on many nodes`;
}

export class PublicationRegistry {
  constructor(
    private readonly ctx: StoreContext,
    private readonly getVolume: (id: string) => Promise<VolumeRecord>,
  ) {}

  /** A node plugin announces itself, so a publication to an unknown node can be refused. */
  async registerNode(nodeId: string, info: { topology: Record<string, string> }): Promise<void> {
    if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/.test(nodeId)) throw new ArborError('invalid-argument', `node id ${JSON.stringify(nodeId)} is not valid`);
    await this.ctx.catalog.txn([], [put(keys.node(nodeId), { nodeId, ...info, registeredAt: new Date().toISOString() } satisfies NodeRecord)]);
  }

  async findNode(nodeId: string): Promise<NodeRecord | undefined> {
    const entry = await this.ctx.catalog.get(keys.node(nodeId));
    return entry && decodeNode(entry);
  }

  /** Where a volume is published. */
  async publications(volumeId: string): Promise<Publications> {
    const entry = await this.ctx.catalog.get(keys.publications(volumeId));
    return entry ? decodePublications(entry) : { nodes: {} };
  }

  /**
   * Records that a volume is published to a node. Nodes share a volume only in the
   * same way: a volume published for one node at a time cannot be published to a
   * second; one published for readers on many nodes takes no writer (they were
   * promised nothing changes), and one published for writers on many nodes (a Block
   * volume during a live migration) takes no publication that is not for writers.
   * Publishing again to the same node the same way is a no-op, another way a conflict.
   */
  async publish(volumeId: string, nodeId: string, options: PublishOptions): Promise<void> {
    const { catalog } = this.ctx;
    const volume = await this.getVolume(volumeId);
    // The admin socket checks readOnly and multiNode only: what it passes on is checked here.
    if (options.multiNodeWriter !== undefined && typeof options.multiNodeWriter !== 'boolean') {
      throw new ArborError('invalid-argument', `volume ${volume.name}: multiNodeWriter must be true or false`);
    }
    if (options.multiNodeWriter && !options.multiNode) {
      throw new ArborError('invalid-argument', `volume ${volume.name}: a publication for writers on many nodes is a multi-node one (multiNode: true)`);
    }
    const wanted: Publication = {
      readOnly: options.readOnly,
      multiNode: options.multiNode,
      multiNodeWriter: options.multiNodeWriter ?? false,
      publishedAt: new Date().toISOString(),
    };
    for (;;) {
      const entry = await catalog.get(keys.publications(volumeId));
      const current: Publications = entry ? decodePublications(entry) : { nodes: {} };
      const mine = current.nodes[nodeId];
      if (mine) {
        if (mine.readOnly === wanted.readOnly && sharingOf(mine) === sharingOf(wanted)) return;
        throw new ArborError(
          'already-exists',
          `volume ${volume.name} is already published to node ${nodeId} ${mine.readOnly ? 'read-only' : 'read-write'} ${describe(sharingOf(mine))}; unpublish it there to change that`,
        );
      }
      const clash = Object.entries(current.nodes).find(([, p]) => sharingOf(wanted) === 'one node' || sharingOf(p) !== sharingOf(wanted));
      if (clash) {
        const [otherNode, other] = clash;
        throw new ArborError(
          'failed-precondition',
          sharingOf(other) === 'one node'
            ? `volume ${volume.name} is published to node ${otherNode} for one node only; unpublish it there first`
            : `volume ${volume.name} is published to node ${otherNode} ${describe(sharingOf(other))}, so it cannot be published to node ${nodeId} ${describe(sharingOf(wanted))}; unpublish it from node ${otherNode} first`,
        );
      }
      current.nodes[nodeId] = wanted;
      // The volume's own key is compared too: a volume deleted meanwhile gets no publication.
      const volumeEntry = await catalog.get(keys.volume(volumeId));
      if (!volumeEntry) throw new ArborError('not-found', `volume ${volume.name} (${volumeId}) was deleted; there is nothing to publish`);
      const result = await catalog.txn(
        [entry ? unchanged(entry) : absent(keys.publications(volumeId)), unchanged(volumeEntry)],
        [put(keys.publications(volumeId), current)],
      );
      if (result.succeeded) return;
    }
  }

  /** Forgets a publication (all of them when `nodeId` is not given); unknown ones are fine. */
  async unpublish(volumeId: string, nodeId?: string): Promise<void> {
    for (;;) {
      const entry = await this.ctx.catalog.get(keys.publications(volumeId));
      if (!entry) return;
      const current = decodePublications(entry);
      if (nodeId !== undefined && !current.nodes[nodeId]) return;
      if (nodeId !== undefined) delete current.nodes[nodeId];
      const empty = nodeId === undefined || Object.keys(current.nodes).length === 0;
      const result = await this.ctx.catalog.txn([unchanged(entry)], [empty ? del(keys.publications(volumeId)) : put(keys.publications(volumeId), current)]);
      if (result.succeeded) return;
    }
  }
}
