import { BlobStore } from './blobs/blobs';
import { MapNode, checkNode } from './map-node';
import { nodeCacheMaxNodes, nodeSizeBytes } from './limits';

/**
 * Clean map nodes shared by every tree in the store, least recently used evicted
 * first. A clean node's bytes equal its blob's, so dropping one loses nothing.
 * Dirty nodes never live here: each volume pins its own until they are written.
 */
export class NodeCache {
  private readonly nodes = new Map<number, MapNode>();

  constructor(
    private readonly blobs: BlobStore,
    private readonly maxNodes = nodeCacheMaxNodes,
  ) {}

  get(id: number): MapNode | undefined {
    const node = this.nodes.get(id);
    if (node !== undefined) {
      this.nodes.delete(id);
      this.nodes.set(id, node);
    }
    return node;
  }

  async load(id: number): Promise<MapNode> {
    const cached = this.get(id);
    if (cached) return cached;
    const node = Buffer.allocUnsafe(nodeSizeBytes);
    await this.blobs.read(id, 0, node, 0, nodeSizeBytes);
    checkNode(node, id);
    // Another load of the same node may have finished while this one waited.
    return this.get(id) ?? this.set(id, node);
  }

  set(id: number, node: MapNode): MapNode {
    this.nodes.delete(id);
    this.nodes.set(id, node);
    if (this.nodes.size > this.maxNodes) this.nodes.delete(this.nodes.keys().next().value as number);
    return node;
  }

  delete(id: number): void {
    this.nodes.delete(id);
  }
}
