import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chartDir, helm, helmTemplate, parseDocuments, repoRoot, valuesArgs, yaml } from '../support/helm';
import { objectProblems } from './models';
import { ciValues, dataNode, defaults, distributed, embedded, kubevirt, namespace, render } from './rendered';

const clusterScoped = new Set([
  'Namespace',
  'CSIDriver',
  'StorageClass',
  'ClusterRole',
  'ClusterRoleBinding',
  'VolumeSnapshotClass',
  'VolumeGroupSnapshotClass',
  'StorageProfile',
  'SnapshotMetadataService',
]);

/**
 * Every values file CI uses: the chart's own ci/ files and the ones docs/ tell people
 * to use (a docs file that sets no store mode is layered on the embedded one, as the
 * docs say).
 */
function valuesSets(): string[][] {
  const ci = fs.readdirSync(path.join(chartDir, 'ci')).map((f) => [path.join('charts/arbor/ci', f)]);
  const docs = fs
    .readdirSync(path.join(repoRoot, 'docs/examples'))
    .filter((f) => /^values-.*\.yaml$/.test(f))
    .map((f) => path.join('docs/examples', f))
    .map((f) => (/^store:/m.test(fs.readFileSync(path.join(repoRoot, f), 'utf8')) ? [f] : ['docs/examples/values-embedded.yaml', f]));
  return [...ci, ...docs];
}

describe('the Helm chart (charts/arbor) with the real helm binary', function () {
  this.timeout(120_000);

  describe('helm lint --strict', () => {
    for (const files of valuesSets()) {
      it(`passes with ${files.join(' + ')}`, () => {
        const result = helm(['lint', '--strict', chartDir, '--namespace', namespace, ...valuesArgs({ valuesFiles: files })]);
        assert.equal(result.status, 0, result.stdout + result.stderr);
        assert.doesNotMatch(result.stdout, /\[(WARNING|ERROR)\]/, result.stdout);
      });
    }

    it('covers both store modes and the KubeVirt options among its values files', () => {
      const text = valuesSets()
        .flat()
        .map((f) => fs.readFileSync(path.join(repoRoot, f), 'utf8'))
        .join('\n');
      assert.match(text, /mode: embedded/);
      assert.match(text, /mode: distributed/);
      assert.match(text, /storageProfile:\s*\n\s*enabled: true/);
    });
  });

  describe('helm template', () => {
    const renderings: [string, () => ReturnType<typeof render>][] = [
      ['values.yaml as shipped (plus the data node)', defaults],
      ['embedded mode', embedded],
      ['distributed mode with every option', distributed],
      ['the KubeVirt options', kubevirt],
      [
        'everything optional turned off',
        () =>
          render({
            set: {
              'store.embedded.nodeName': dataNode,
              'snapshots.enabled': false,
              'metrics.enabled': false,
              'node.loadNbdModule': false,
              'storageClasses.block.enabled': false,
            },
          }),
      ],
    ];
    for (const [what, objects] of renderings) {
      it(`renders ${what}: every object is a kind the cluster knows, with no unknown or mistyped field`, () => {
        const rendered = objects();
        assert.ok(rendered.length >= 10, `only ${rendered.length} objects`);
        const problems = rendered.flatMap((o) => objectProblems(o));
        assert.deepEqual(problems, []);
      });
    }

    it('puts every namespaced object in the release namespace and names each object once', () => {
      for (const objects of [defaults(), distributed(), kubevirt()]) {
        const seen = new Set<string>();
        for (const o of objects) {
          if (clusterScoped.has(o.kind)) assert.equal(o.metadata.namespace, undefined, `${o.kind}/${o.metadata.name} is cluster-scoped`);
          else assert.equal(o.metadata.namespace, namespace, `${o.kind}/${o.metadata.name} namespace`);
          const key = `${o.kind}/${o.metadata.name}`;
          assert.ok(!seen.has(key), `${key} rendered twice`);
          seen.add(key);
        }
      }
    });

    it('labels every object with the chart, release and component, as strings', () => {
      for (const o of distributed()) {
        const labels = o.metadata.labels ?? {};
        for (const key of [
          'app.kubernetes.io/name',
          'app.kubernetes.io/instance',
          'app.kubernetes.io/managed-by',
          'helm.sh/chart',
          'app.kubernetes.io/component',
        ]) {
          assert.equal(typeof labels[key], 'string', `${o.kind}/${o.metadata.name} label ${key}`);
        }
        for (const [key, value] of Object.entries({ ...labels, ...(o.metadata.annotations ?? {}) })) {
          assert.equal(typeof value, 'string', `${o.kind}/${o.metadata.name} ${key} is not a string`);
        }
      }
    });

    it('writes no scalar that YAML 1.1 (the API server) and YAML 1.2 read differently', () => {
      // Kubernetes reads 0644 as octal and yes/no/on/off as booleans; js-yaml does not.
      for (const file of Object.values(ciValues)) {
        const result = helmTemplate({ namespace, valuesFiles: [file] });
        const ambiguous = result.stdout.split('\n').filter((line) => /:\s+(0[0-7]+|yes|no|on|off|y|n|Yes|No|On|Off)\s*(#.*)?$/.test(line));
        assert.deepEqual(ambiguous, [], file);
      }
    });
  });

  describe('refuses values that would not work, saying which and why', () => {
    const node = { 'store.embedded.nodeName': dataNode };
    const distributedBase = {
      'store.mode': 'distributed',
      'store.distributed.etcd.endpoints[0]': 'etcd:2379',
      'store.distributed.s3.bucket': 'arbor',
      'store.distributed.s3.credentialsSecret.name': 's3',
    };
    const cases: [string, Record<string, string | number | boolean>, RegExp][] = [
      ['a store mode that does not exist', { ...node, 'store.mode': 'bogus' }, /\/store\/mode.*one of 'embedded', 'distributed'/],
      ['embedded mode without the data node', {}, /store\.embedded\.nodeName/],
      ['two controllers on the embedded store', { ...node, 'controller.replicas': 2 }, /controller\.replicas=2 with store\.mode=embedded/],
      ['a node affinity that would move the embedded store', { ...node, 'node.affinity.podAffinity.x': 'y' }, /node\.affinity with store\.mode=embedded/],
      ['a misspelled top-level key', { ...node, storageClass: 'x' }, /additional properties 'storageClass' not allowed/],
      ['a misspelled nested key', { ...node, 'controller.replica': 2 }, /\/controller.*additional properties 'replica' not allowed/],
      ['an extent size that is not a power of two', { ...node, 'storageClasses.block.extentSize': '3KiB' }, /\/storageClasses\/block\/extentSize/],
      ['a filesystem Arbor does not format', { ...node, 'storageClasses.filesystem.fsType': 'btrfs' }, /\/storageClasses\/filesystem\/fsType/],
      [
        'mkfs options that are not options',
        { ...node, 'storageClasses.filesystem.mkfsOptions': 'lazy_itable_init=0' },
        /\/storageClasses\/filesystem\/mkfsOptions/,
      ],
      ['a relative kubelet directory', { ...node, 'node.kubeletDir': 'var/lib/kubelet' }, /\/node\/kubeletDir/],
      ['a dead-connection timeout without a unit', { ...node, 'node.deadConnectionTimeout': '300' }, /\/node\/deadConnectionTimeout/],
      ['a log level Arbor does not have', { ...node, logLevel: 'verbose' }, /\/logLevel/],
      ['an empty sidecar tag', { ...node, 'sidecars.provisioner.image.tag': '' }, /\/sidecars\/provisioner\/image\/tag/],
      ['no worker threads for the provisioner', { ...node, 'sidecars.provisioner.workerThreads': 0 }, /\/sidecars\/provisioner\/workerThreads/],
      ['an API rate for the snapshotter that is not a number', { ...node, 'sidecars.snapshotter.kubeApiQps': 'fast' }, /\/sidecars\/snapshotter\/kubeApiQps/],
      ['distributed mode without etcd', { 'store.mode': 'distributed' }, /store\.distributed\.etcd\.endpoints/],
      [
        'an etcd endpoint given as a URL',
        { ...distributedBase, 'store.distributed.etcd.endpoints[0]': 'http://etcd:2379' },
        /\/store\/distributed\/etcd\/endpoints\/0/,
      ],
      ['distributed mode without a bucket', { ...distributedBase, 'store.distributed.s3.bucket': '' }, /store\.distributed\.s3\.bucket/],
      [
        'S3 credentials without a Secret',
        { ...distributedBase, 'store.distributed.s3.credentialsSecret.name': '' },
        /credentialsSecret\.name.*never go in values/,
      ],
      [
        'S3 credentials written in values',
        { ...distributedBase, 'store.distributed.s3.accessKeyId': 'AKIA0000' },
        /additional properties 'accessKeyId' not allowed/,
      ],
      ['a cache size without a unit', { ...distributedBase, 'store.distributed.cache.size': '10' }, /\/store\/distributed\/cache\/size/],
      [
        'a StorageProfile without snapshots',
        { ...node, 'kubevirt.storageProfile.enabled': true, 'snapshots.enabled': false },
        /kubevirt\.storageProfile\.enabled.*snapshots\.enabled=true/,
      ],
      [
        'group snapshots without the snapshotter',
        { ...node, 'groupSnapshots.enabled': true, 'snapshots.enabled': false },
        /groupSnapshots\.enabled needs snapshots\.enabled/,
      ],
      [
        'a ServiceMonitor without metrics',
        { ...node, 'metrics.enabled': false, 'metrics.serviceMonitor.enabled': true },
        /metrics\.serviceMonitor\.enabled needs metrics\.enabled/,
      ],
      [
        'two default StorageClasses',
        { ...node, 'storageClasses.block.isDefaultClass': true, 'storageClasses.filesystem.isDefaultClass': true },
        /one default StorageClass/,
      ],
      ['two node ports that collide', { ...node, 'node.metricsPort': 9809 }, /node\.healthPort, node\.registrarHealthPort and node\.metricsPort must differ/],
      ['an NBD port the node plugin listens on already', { ...node, 'node.nbdPort': 9821 }, /node\.nbdPort=9821 is also one of node\.healthPort/],
      ['an NBD port below 1024', { ...node, 'node.nbdPort': 809 }, /\/node\/nbdPort/],
      ["an admin port that is the data node's NBD port", { ...node, 'store.embedded.adminPort': 10809 }, /store\.embedded\.adminPort=10809 is also one of/],
      ['generated certificates valid for no time', { ...node, 'tls.generated.validityDays': 0 }, /\/tls\/generated\/validityDays/],
      ['a TLS Secret name that cannot be a Secret', { ...node, 'tls.secretName': 'Arbor_TLS' }, /\/tls\/secretName/],
      ['a misspelled TLS key', { ...node, 'tls.secret': 'arbor-tls' }, /\/tls.*additional properties 'secret' not allowed/],
    ];
    for (const [what, set, message] of cases) {
      it(`refuses ${what}`, () => {
        const result = helmTemplate({ namespace, set });
        assert.notEqual(result.status, 0, `rendered anyway:\n${result.stdout.slice(0, 400)}`);
        assert.match(result.stderr, message);
      });
    }

    it('refuses the defaults of the chart before NBD between nodes (what `helm upgrade --reuse-values` renders with), saying how to upgrade', () => {
      // --reuse-values replaces the new chart's values.yaml with the old release's: the keys this chart added are missing.
      const copy = fs.mkdtempSync(path.join(os.tmpdir(), 'arbor-chart-'));
      try {
        fs.cpSync(chartDir, copy, { recursive: true });
        const values = yaml().load(fs.readFileSync(path.join(copy, 'values.yaml'), 'utf8')) as {
          tls?: unknown;
          node: { nbdPort?: number };
          store: { embedded: { adminPort?: number } };
        };
        delete values.tls;
        delete values.node.nbdPort;
        delete values.store.embedded.adminPort;
        fs.writeFileSync(path.join(copy, 'values.yaml'), JSON.stringify(values));
        const result = helm(['template', 'arbor', copy, '--namespace', namespace, '--set', `store.embedded.nodeName=${dataNode}`]);
        assert.notEqual(result.status, 0, 'rendered anyway');
        assert.match(result.stderr, /validate\.yaml.*the values lack tls, node\.nbdPort or store\.embedded\.adminPort.*--reset-then-reuse-values/s);
      } finally {
        fs.rmSync(copy, { recursive: true, force: true });
      }
    });
  });

  describe('NOTES.txt', () => {
    it('tells the admin what was installed and gives a PVC to try that is valid', () => {
      const result = helm(['install', 'arbor', chartDir, '--dry-run=client', '--namespace', namespace, ...valuesArgs({ valuesFiles: [ciValues.kubevirt] })]);
      assert.equal(result.status, 0, result.stderr);
      const notes = result.stdout.slice(result.stdout.indexOf('NOTES:'));
      assert.ok(notes.length > 'NOTES:'.length, 'no NOTES in the output');
      for (const text of [
        'csi.arbor.dev',
        'Store: embedded',
        dataNode,
        'StorageClass arbor-block',
        'StorageClass arbor-fs',
        'VolumeSnapshotClass arbor-snapshot',
        'StorageProfile arbor-block',
        'kubectl get csinodes',
      ]) {
        assert.ok(notes.includes(text), `NOTES do not mention ${text}`);
      }
      const heredoc = /<<'YAML'\n([\s\S]*?)\n\s*YAML\n/.exec(notes);
      assert.ok(heredoc, 'NOTES hold no example to apply');
      const manifests = parseDocuments(heredoc[1].replace(/^ {2}/gm, ''));
      assert.deepEqual(
        manifests.map((m) => (m as { kind: string }).kind),
        ['PersistentVolumeClaim', 'Pod'],
      );
      assert.deepEqual(
        manifests.flatMap((m) => objectProblems(m)),
        [],
      );
      assert.match(heredoc[1], /storageClassName: arbor-fs/);
    });

    it('names the relaying node plugins, the Service they reach the data node through, and the certificates', () => {
      const result = helm(['install', 'arbor', chartDir, '--dry-run=client', '--namespace', namespace, ...valuesArgs({ valuesFiles: [ciValues.embedded] })]);
      assert.equal(result.status, 0, result.stderr);
      const notes = result.stdout.slice(result.stdout.indexOf('NOTES:'));
      for (const text of [
        'DaemonSet arbor-node (the data node) and arbor-node-relay (every other node)',
        'Service arbor-data',
        'Secret arbor-nbd-tls',
        '3650 days',
      ]) {
        assert.ok(notes.includes(text), `NOTES do not mention ${text}`);
      }
      const given = helm([
        'install',
        'arbor',
        chartDir,
        '--dry-run=client',
        '--namespace',
        namespace,
        ...valuesArgs({ valuesFiles: [ciValues.embedded], set: { 'tls.secretName': 'mine' } }),
      ]);
      assert.match(given.stdout, /Secret mine \(yours\)/);
    });

    it('describes the distributed store when that is the mode', () => {
      const result = helm(['install', 'arbor', chartDir, '--dry-run=client', '--namespace', namespace, ...valuesArgs({ valuesFiles: [ciValues.distributed] })]);
      assert.equal(result.status, 0, result.stderr);
      assert.match(result.stdout, /Store: distributed/);
      assert.match(result.stdout, /s3:\/\/arbor-blobs\/prod/);
      assert.match(result.stdout, /\(3 replicas\)/);
    });
  });
});
