import fs from 'node:fs';
import path from 'node:path';
import { ArborError } from '../store/errors';
import { Attachment } from './attach/attacher';

/** What this node did for a volume, kept on disk so a restarted plugin can finish or undo it. */
export interface StagedVolume {
  volumeId: string;
  exportName: string;
  stagingPath: string;
  access: 'block' | 'mount';
  fsType?: string;
  readOnly: boolean;
  attachment: Attachment;
  /** Published target paths and whether each is read-only. */
  targets: Record<string, { readOnly: boolean }>;
}

/**
 * The node's record of staged volumes: one directory per volume under the state
 * directory, holding state.json (written atomically: temp file, fsync, rename) and
 * the attacher's private files.
 */
export class StagedVolumes {
  constructor(private readonly root: string) {
    fs.mkdirSync(path.join(root, 'volumes'), { recursive: true, mode: 0o700 });
  }

  workDir(volumeId: string): string {
    const dir = path.join(this.root, 'volumes', safe(volumeId));
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    return dir;
  }

  get(volumeId: string): StagedVolume | undefined {
    try {
      return JSON.parse(fs.readFileSync(this.file(volumeId), 'utf8')) as StagedVolume;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
  }

  save(state: StagedVolume): void {
    this.workDir(state.volumeId);
    const file = this.file(state.volumeId);
    const temp = `${file}.tmp`;
    const fd = fs.openSync(temp, 'w', 0o600);
    try {
      fs.writeSync(fd, JSON.stringify(state, null, 2));
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(temp, file);
  }

  remove(volumeId: string): void {
    fs.rmSync(path.join(this.root, 'volumes', safe(volumeId)), { recursive: true, force: true });
  }

  /** Every staged volume, in id order. */
  all(): StagedVolume[] {
    return fs
      .readdirSync(path.join(this.root, 'volumes'))
      .filter((dir) => fs.existsSync(path.join(this.root, 'volumes', dir, 'state.json')))
      .sort()
      .map((dir) => this.get(dir))
      .filter((state): state is StagedVolume => state !== undefined);
  }

  /**
   * When a process that served these volumes was last known alive (ms since the
   * epoch): the node plugin writes it every second and when it stops, so the next
   * one knows how long the devices have waited. Undefined before the first write.
   */
  lastAlive(): number | undefined {
    try {
      const at = Number(fs.readFileSync(path.join(this.root, 'alive'), 'utf8'));
      return Number.isFinite(at) && at > 0 ? at : undefined;
    } catch {
      return undefined;
    }
  }

  markAlive(at = Date.now()): void {
    const file = path.join(this.root, 'alive');
    fs.writeFileSync(`${file}.tmp`, String(at));
    fs.renameSync(`${file}.tmp`, file);
  }

  count(): number {
    return fs.readdirSync(path.join(this.root, 'volumes')).filter((d) => fs.existsSync(path.join(this.root, 'volumes', d, 'state.json'))).length;
  }

  private file(volumeId: string): string {
    return path.join(this.root, 'volumes', safe(volumeId), 'state.json');
  }
}

/** Volume ids come from the CO: keep them from naming anything outside our directory. */
function safe(volumeId: string): string {
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/.test(volumeId))
    throw new ArborError('not-found', `volume ${JSON.stringify(volumeId)} does not exist: it is not an Arbor volume id`);
  return volumeId;
}
