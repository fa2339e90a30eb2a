import { Lru } from '../lib/lru';
import { BlobStore } from './blobs/blobs';
import { MapNode, checkNode } from './map-node';
import { nodeCacheMaxBytes } from './limits';
import { nodeBytesOf } from './partial';

/**
 * Clean map nodes shared by every tree in the store, least recently used evicted
 * first. A clean node's bytes equal its blob's, so dropping one loses nothing.
 * Dirty nodes never live here: each volume pins its own until they are written.
 */
export class NodeCache {
  private readonly nodes: Lru<number, MapNode>;
  /** Reads in flight: concurrent misses of one node share one read. */
  private readonly loading = new Map<number, Promise<MapNode>>();

  constructor(
    private readonly blobs: BlobStore,
    maxBytes = nodeCacheMaxBytes,
  ) {
    // Weighed by bytes: a wide leaf (store/partial.ts) is 16 KiB or more, not one page.
    this.nodes = new Lru({ capacity: maxBytes, weigh: (node) => node.length });
  }

  get(id: number): MapNode | undefined {
    return this.nodes.get(id);
  }

  load(id: number): Promise<MapNode> {
    const cached = this.nodes.get(id);
    if (cached) return Promise.resolve(cached);
    let loading = this.loading.get(id);
    if (!loading) {
      loading = this.read(id).finally(() => this.loading.delete(id));
      this.loading.set(id, loading);
    }
    return loading;
  }

  set(id: number, node: MapNode): MapNode {
    return this.nodes.set(id, node);
  }

  delete(id: number): void {
    this.nodes.delete(id);
  }

  private async read(id: number): Promise<MapNode> {
    const bytes = nodeBytesOf(id);
    const node = Buffer.allocUnsafe(bytes);
    await this.blobs.read(id, 0, node, 0, bytes);
    checkNode(node, id);
    // A node written back meanwhile (set) is the newer copy of the same bytes: keep it.
    return this.nodes.get(id) ?? this.nodes.set(id, node);
  }
}
