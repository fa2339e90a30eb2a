import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { openDataDir } from '../../store/embedded';
import { Random } from '../support/random';
import { tempDir } from '../support/tmp';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

/** Disk space the directory really uses (du counts allocated blocks, not file sizes). */
function diskUsage(dir: string): number {
  return Number(execFileSync('du', ['-s', '-B1', dir], { encoding: 'utf8' }).split('\t')[0]);
}

describe('space: disk usage follows written data, not volume size', function () {
  this.timeout(120_000);

  it('64 MiB written to a 64 GiB volume, its snapshot and a clone use about 64 MiB, and nothing once deleted', async () => {
    const dir = tempDir();
    try {
      const store = await openDataDir(dir.dir);
      const empty = diskUsage(dir.dir);
      await store.createVolume('big', { sizeBytes: 64 * GiB });
      const big = await store.openVolume({ name: 'big' });
      const rng = new Random(1);
      for (let i = 0; i < 16; i++) await big.write(i * 4 * GiB, rng.bytes(4 * MiB));
      await big.flush();
      const written = diskUsage(dir.dir) - empty;
      assert.ok(written >= 64 * MiB && written < 72 * MiB, `64 MiB written takes ${written} bytes`);
      await store.createSnapshot({ name: 'big' }, 'snap');
      await store.cloneVolume('clone', { snapshot: { name: 'snap' } });
      await (await store.openVolume({ name: 'clone' })).write(0, rng.bytes(4 * MiB));
      await store.collectGarbage();
      const shared = diskUsage(dir.dir) - empty;
      assert.ok(shared < written + 6 * MiB, `snapshot and clone share the data: ${shared} bytes after overwriting 4 MiB of the clone`);
      await store.deleteVolume({ name: 'clone' });
      await store.deleteVolume({ name: 'big' });
      await store.deleteSnapshot({ name: 'snap' });
      await store.collectGarbage();
      assert.deepEqual(await store.ctx.blobs.list(), []);
      await store.close();
      const left = diskUsage(dir.dir);
      assert.ok(left < empty + 1 * MiB, `after deleting everything the directory holds ${left} bytes (empty: ${empty})`);
    } finally {
      dir.cleanup();
    }
  });
});
