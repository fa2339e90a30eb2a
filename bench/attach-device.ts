/**
 * Run inside the test node by bench:attach (`node dist/bench/attach-device.js`):
 * attaches an NBD server's export to the guest's kernel through the attacher Arbor's
 * node plugin uses (netlink, the same block size, connections and flags), so that
 * nbdkit and qemu-nbd are measured through the very path Arbor's volumes take.
 *
 *   attach SOCKET EXPORT WORKDIR   prints the attachment as JSON
 *   detach ATTACHMENT-JSON
 */
import fs from 'node:fs';
import { Attachment } from '../node-plugin/attach/attacher';
import { KernelAttacher } from '../node-plugin/attach/kernel';
import { runBenchmark } from './support';

runBenchmark(async () => {
  const [command, ...args] = process.argv.slice(2);
  const attacher = new KernelAttacher();
  if (command === 'attach' && args.length === 3) {
    const [socketPath, exportName, workDir] = args;
    fs.mkdirSync(workDir, { recursive: true, mode: 0o700 });
    console.log(JSON.stringify(await attacher.attach({ socketPath, exportName, volumeId: `bench-${exportName || 'default'}`, readOnly: false, workDir })));
  } else if (command === 'detach' && args.length === 1) {
    await attacher.detach(JSON.parse(args[0]) as Attachment);
  } else {
    throw new Error('usage: attach-device.js attach SOCKET EXPORT WORKDIR | detach ATTACHMENT-JSON');
  }
});
