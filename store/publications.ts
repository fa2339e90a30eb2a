/**
 * Nodes and publications: what each CSI node plugin recorded about itself, and which
 * nodes each volume is published to (one key per volume, so that two nodes racing
 * to publish a single-node volume cannot both win a compare-and-swap).
 */
import { absent, del, put, unchanged } from './catalog/catalog';
import { StoreContext } from './context';
import { ArborError } from './errors';
import { NodeRecord, Publications, VolumeRecord, decodeNode, decodePublications, keys } from './records';

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
   * Records that a volume is published to a node. A volume published for one node
   * at a time cannot be published to a second; publishing again to the same node
   * with the same read-only setting is a no-op, with another it is a conflict.
   */
  async publish(volumeId: string, nodeId: string, options: { readOnly: boolean; multiNode: boolean }): Promise<void> {
    const { catalog } = this.ctx;
    const volume = await this.getVolume(volumeId);
    for (;;) {
      const entry = await catalog.get(keys.publications(volumeId));
      const current: Publications = entry ? decodePublications(entry) : { nodes: {} };
      const mine = current.nodes[nodeId];
      if (mine) {
        if (mine.readOnly === options.readOnly && mine.multiNode === options.multiNode) return;
        throw new ArborError(
          'already-exists',
          `volume ${volume.name} is already published to node ${nodeId} ${mine.readOnly ? 'read-only' : 'read-write'}; unpublish it to change that`,
        );
      }
      const others = Object.entries(current.nodes);
      const exclusive = others.find(([, p]) => !p.multiNode) ?? (options.multiNode ? undefined : others[0]);
      if (exclusive) {
        throw new ArborError('failed-precondition', `volume ${volume.name} is published to node ${exclusive[0]} for one node only; unpublish it there first`);
      }
      current.nodes[nodeId] = { readOnly: options.readOnly, multiNode: options.multiNode, publishedAt: new Date().toISOString() };
      const result = await catalog.txn(
        [
          entry ? unchanged(entry) : absent(keys.publications(volumeId)),
          { key: keys.volume(volumeId), modRevision: (await catalog.get(keys.volume(volumeId)))?.modRevision ?? 0 },
        ],
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
