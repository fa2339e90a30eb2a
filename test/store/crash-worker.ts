/**
 * The crash test's child: runs a planned workload against a real data directory,
 * printing "ready" once the store is open and "done K" as each operation K returns,
 * until the parent kills it with SIGKILL.
 */
import fs from 'node:fs';
import { openDataDir } from '../../store/embedded';
import { CrashOp, stampedData } from '../support/crash-workload';

async function run(dataDir: string, planFile: string): Promise<void> {
  const ops = JSON.parse(fs.readFileSync(planFile, 'utf8')) as CrashOp[];
  const store = await openDataDir(dataDir);
  process.stdout.write('ready\n');
  for (const op of ops) {
    switch (op.t) {
      case 'write':
        await (await store.openVolume({ name: op.v })).write(op.offset, stampedData(op.k, op.offset, op.length), { fua: op.fua });
        break;
      case 'zero': {
        const volume = await store.openVolume({ name: op.v });
        if (op.hole) await volume.trim(op.offset, op.length);
        else await volume.writeZeroes(op.offset, op.length, { noHole: true });
        break;
      }
      case 'flush':
        await (await store.openVolume({ name: op.v })).flush();
        break;
      case 'snap':
        await store.createSnapshot({ name: op.v }, op.s);
        break;
      case 'clone':
        await store.cloneVolume(op.v, { snapshot: { name: op.s } });
        break;
      case 'delsnap':
        await store.deleteSnapshot({ name: op.s });
        break;
      case 'delvol':
        await store.deleteVolume({ name: op.v });
        break;
      case 'gc':
        await store.collectGarbage();
        break;
    }
    process.stdout.write(`done ${op.k}\n`);
  }
  process.stdout.write('finished\n');
  await store.close();
}

run(process.argv[2], process.argv[3]).catch((err) => {
  process.stdout.write(`error ${(err as Error).stack}\n`);
  process.exit(3);
});
