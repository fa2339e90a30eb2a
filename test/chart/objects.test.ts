import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { globalOptions, parseCommandLine } from '../../cli/args';
import { commands } from '../../cli/main';
import { driverName } from '../../csi/proto';
import { parseQosParameters } from '../../store/qos';
import { helmTemplate, K8sObject } from '../support/helm';
import { objectProblems } from './models';
import { tempDir } from '../support/tmp';
import {
  all,
  ciValues,
  Container,
  container,
  controller,
  dataNode,
  defaults,
  distributed,
  embedded,
  env,
  flag,
  flags,
  kubevirt,
  mountAt,
  mountHolding,
  namespace,
  nodePlugin,
  nodePlugins,
  one,
  PodSpec,
  port,
  relayPlugin,
  render,
  volume,
  Workload,
} from './rendered';

/** The controller and every node plugin DaemonSet (embedded mode has two: the data node's and the relaying one). */
const workloads = (objects: K8sObject[]) => [controller(objects), ...nodePlugins(objects)];

/** The plugin container (`arbor`) and the socket it serves CSI on. */
function pluginSocket(pod: PodSpec): string {
  const endpoint = flag(container(pod, 'arbor'), 'csi-endpoint');
  assert.match(endpoint, /^unix:\/\/\//);
  return endpoint.slice('unix://'.length);
}

function hostPathOf(pod: PodSpec, c: Container, mountPath: string): string {
  const v = volume(pod, mountAt(c, mountPath).name);
  assert.ok(v.hostPath, `${c.name}'s ${mountPath} is not a hostPath`);
  return v.hostPath.path;
}

describe('the objects the chart renders', function () {
  this.timeout(120_000);

  describe('one driver name everywhere', () => {
    it(`names ${driverName} (csi/proto.ts) in the CSIDriver, StorageClasses, snapshot classes and kubelet paths`, () => {
      const objects = render({ valuesFiles: ['charts/arbor/ci/distributed-values.yaml'] });
      assert.equal(one(objects, 'CSIDriver').metadata.name, driverName);
      for (const sc of all(objects, 'StorageClass')) assert.equal(sc.provisioner, driverName, sc.metadata.name);
      for (const kind of ['VolumeSnapshotClass', 'VolumeGroupSnapshotClass']) assert.equal(one(objects, kind).driver, driverName, kind);
      const pod = nodePlugin(objects).spec.template.spec;
      const registrar = container(pod, 'node-driver-registrar');
      assert.equal(path.basename(path.dirname(flag(registrar, 'kubelet-registration-path'))), driverName);
      assert.equal(path.basename(hostPathOf(pod, container(pod, 'arbor'), '/csi')), driverName);
      const everyMention = JSON.stringify(objects).match(/csi\.[a-z]+\.dev/g) ?? [];
      assert.deepEqual([...new Set(everyMention)], [driverName]);
    });

    it('declares what the driver does: attach, persistent volumes, fsGroup applied to the filesystem', () => {
      const spec = one(defaults(), 'CSIDriver').spec as Record<string, unknown>;
      assert.equal(spec.attachRequired, true, 'Arbor publishes volumes (ControllerPublishVolume)');
      assert.deepEqual(spec.volumeLifecycleModes, ['Persistent']);
      assert.equal(spec.fsGroupPolicy, 'File');
      assert.equal(typeof spec.podInfoOnMount, 'boolean');
    });
  });

  describe('sockets and mounts', () => {
    for (const [mode, objects] of [
      ['embedded', embedded],
      ['distributed', distributed],
    ] as const) {
      it(`(${mode}) every sidecar dials the socket its plugin listens on, through the same volume`, () => {
        for (const workload of workloads(objects())) {
          const pod = workload.spec.template.spec;
          const socket = pluginSocket(pod);
          const plugin = mountHolding(pod, container(pod, 'arbor'), socket);
          const sidecars = pod.containers.filter((c) => c.name !== 'arbor');
          assert.ok(sidecars.length >= 2, workload.metadata.name);
          for (const sidecar of sidecars) {
            assert.equal(flag(sidecar, 'csi-address'), socket, `${workload.metadata.name}/${sidecar.name}`);
            const theirs = mountHolding(pod, sidecar, socket);
            assert.equal(theirs.volume.name, plugin.volume.name, `${sidecar.name} mounts another volume at the socket`);
            assert.equal(theirs.mount.mountPath, plugin.mount.mountPath);
          }
        }
      });
    }

    it('registers with the kubelet the host path of the socket the node plugin listens on', () => {
      const pod = nodePlugin(defaults()).spec.template.spec;
      const socket = pluginSocket(pod);
      const { mount, volume: socketVolume } = mountHolding(pod, container(pod, 'arbor'), socket);
      assert.ok(socketVolume.hostPath, 'the node socket lives in a hostPath the kubelet can reach');
      const hostSocket = path.join(socketVolume.hostPath.path, path.relative(mount.mountPath, socket));
      const registrar = container(pod, 'node-driver-registrar');
      assert.equal(flag(registrar, 'kubelet-registration-path'), hostSocket);
      assert.equal(hostSocket, `/var/lib/kubelet/plugins/${driverName}/csi.sock`);
      assert.equal(hostPathOf(pod, registrar, '/registration'), '/var/lib/kubelet/plugins_registry');
    });

    it('mounts what the node plugin needs: /dev, /sys, the kubelet directory (Bidirectional), its state, the NBD socket', () => {
      for (const ds of [...nodePlugins(embedded()), ...nodePlugins(distributed())]) {
        const pod = ds.spec.template.spec;
        const plugin = container(pod, 'arbor');
        assert.equal(plugin.securityContext?.privileged, true);
        assert.equal(plugin.securityContext?.runAsUser, 0);
        // Linux 6.1 serves the nbd netlink family in the host's network namespace only (the kernel suite shows it).
        assert.equal(pod.hostNetwork, true, 'the node plugin configures the nbd driver over netlink from the host network namespace');
        assert.equal(pod.dnsPolicy, 'ClusterFirstWithHostNet', 'on the host network the plugin still resolves cluster Services');
        assert.equal(hostPathOf(pod, plugin, '/dev'), '/dev');
        assert.equal(hostPathOf(pod, plugin, '/sys'), '/sys');
        const kubelet = mountAt(plugin, '/var/lib/kubelet');
        assert.equal(kubelet.mountPropagation, 'Bidirectional');
        assert.equal(hostPathOf(pod, plugin, '/var/lib/kubelet'), '/var/lib/kubelet');
        const stateDir = flag(plugin, 'state-dir');
        assert.equal(hostPathOf(pod, plugin, stateDir), stateDir, 'the state directory survives plugin restarts');
        const nbd = mountHolding(pod, plugin, flag(plugin, 'nbd-socket'));
        assert.ok(nbd.volume.emptyDir, 'the NBD socket is pod-local');
        assert.equal(flag(plugin, 'node-id'), '$(NODE_NAME)');
        assert.equal(flag(plugin, 'dead-connection-timeout'), '300s', 'I/O waits for a restarted plugin (docs/install.md, Upgrade)');
        assert.equal(env(plugin, 'NODE_NAME')?.valueFrom?.fieldRef?.fieldPath, 'spec.nodeName');
        // Only the plugin (and the module loader) are privileged.
        for (const c of [...pod.containers, ...(pod.initContainers ?? [])].filter((c) => c.name !== 'arbor' && c.name !== 'load-nbd')) {
          assert.notEqual(c.securityContext?.privileged, true, c.name);
          assert.equal(c.securityContext?.allowPrivilegeEscalation, false, c.name);
        }
      }
    });

    it('moves every kubelet path with node.kubeletDir', () => {
      const objects = render({ set: { 'store.embedded.nodeName': dataNode, 'node.kubeletDir': '/var/lib/k0s/kubelet' } });
      const ds = nodePlugin(objects);
      const pod = ds.spec.template.spec;
      assert.equal(flag(container(pod, 'node-driver-registrar'), 'kubelet-registration-path'), `/var/lib/k0s/kubelet/plugins/${driverName}/csi.sock`);
      assert.equal(hostPathOf(pod, container(pod, 'node-driver-registrar'), '/registration'), '/var/lib/k0s/kubelet/plugins_registry');
      assert.equal(mountAt(container(pod, 'arbor'), '/var/lib/k0s/kubelet').mountPropagation, 'Bidirectional');
      assert.doesNotMatch(JSON.stringify(ds), /\/var\/lib\/kubelet/);
    });

    it('loads the nbd module in an init container that cannot stop the plugin from starting', () => {
      const pod = nodePlugin(defaults()).spec.template.spec;
      const init = (pod.initContainers ?? []).find((c) => c.name === 'load-nbd');
      assert.ok(init);
      assert.deepEqual(init.command?.slice(0, 2), ['/bin/sh', '-c']);
      assert.match(init.command?.[2] ?? '', /^modprobe nbd nbds_max=256 \|\| echo /);
      assert.equal(hostPathOf(pod, init, '/lib/modules'), '/lib/modules');
      assert.equal(mountAt(init, '/lib/modules').readOnly, true);
      const without = nodePlugin(render({ set: { 'store.embedded.nodeName': dataNode, 'node.loadNbdModule': false } })).spec.template.spec;
      assert.equal(without.initContainers, undefined);
      assert.ok(!(without.volumes ?? []).some((v) => v.hostPath?.path === '/lib/modules'));
    });
  });

  describe('embedded mode: one node holds the store', () => {
    const pinnedTo = (w: Workload) =>
      w.spec.template.spec.affinity?.nodeAffinity?.requiredDuringSchedulingIgnoredDuringExecution?.nodeSelectorTerms.flatMap((t) => t.matchFields ?? []);

    // Before every node could attach every volume, the node plugin ran on the data node only.
    it('runs the controller and the node plugin that holds the store on store.embedded.nodeName, and a relaying plugin on every other node, by node name', () => {
      const objects = embedded();
      for (const w of [controller(objects), nodePlugin(objects)]) {
        assert.deepEqual(pinnedTo(w), [{ key: 'metadata.name', operator: 'In', values: [dataNode] }], w.metadata.name);
      }
      assert.deepEqual(pinnedTo(relayPlugin(objects)), [{ key: 'metadata.name', operator: 'NotIn', values: [dataNode] }]);
      assert.equal(nodePlugins(objects).length, 2);
    });

    it('gives the controller and the node plugin the same data directory on the host, and one controller', () => {
      const objects = embedded();
      const [ctrl, ds] = [controller(objects), nodePlugin(objects)];
      const ctrlPod = ctrl.spec.template.spec;
      const nodePod = ds.spec.template.spec;
      const dataDir = flag(container(nodePod, 'arbor'), 'data-dir');
      assert.equal(flag(container(ctrlPod, 'arbor'), 'data-dir'), dataDir);
      assert.equal(hostPathOf(nodePod, container(nodePod, 'arbor'), dataDir), dataDir);
      assert.equal(hostPathOf(ctrlPod, container(ctrlPod, 'arbor'), dataDir), dataDir);
      // Volumes used to carry the data node as their topology (--node-id); every node attaches them now.
      assert.ok(!flags(container(ctrlPod, 'arbor')).has('node-id'), 'volumes are pinned to no node: the controller reports no topology');
      assert.equal(ctrl.spec.replicas, 1);
      assert.equal(ctrl.spec.strategy?.type, 'Recreate', 'never two controllers, even during an upgrade');
      assert.equal(ctrlPod.securityContext?.runAsUser, 0, 'the admin socket is root-only');
      assert.ok(!flags(container(ctrlPod, 'arbor')).has('store'));
    });

    // WaitForFirstConsumer while volumes lived on the data node only.
    it('binds volumes at once (Immediate): every node can attach them', () => {
      for (const sc of all(embedded(), 'StorageClass')) assert.equal(sc.volumeBindingMode, 'Immediate', sc.metadata.name);
      const chosen = all(
        render({ set: { 'store.embedded.nodeName': dataNode, 'storageClasses.block.volumeBindingMode': 'WaitForFirstConsumer' } }),
        'StorageClass',
      );
      assert.deepEqual(
        chosen.map((sc) => sc.volumeBindingMode),
        ['WaitForFirstConsumer', 'Immediate'],
      );
    });
  });

  describe('distributed mode: etcd and S3', () => {
    it('gives every Arbor process the same --store and --blobs, built from the values', () => {
      const objects = distributed();
      const args = workloads(objects).map((w) => container(w.spec.template.spec, 'arbor'));
      for (const c of args) {
        assert.equal(
          flag(c, 'store'),
          'etcds://etcd-0.etcd.storage.svc:2379,etcd-1.etcd.storage.svc:2379,etcd-2.etcd.storage.svc:2379/arbor/prod',
          'etcds:// when the etcd TLS Secret is set',
        );
        const blobs = new URL(flag(c, 'blobs'));
        assert.equal(blobs.protocol, 's3:');
        assert.equal(blobs.host, 'arbor-blobs');
        assert.equal(blobs.pathname, '/prod');
        assert.equal(blobs.searchParams.get('endpoint'), 'https://rgw.storage.svc:8443');
        assert.equal(blobs.searchParams.get('region'), 'default');
        assert.ok(!flags(c).has('data-dir'), 'no embedded data directory');
      }
    });

    it('takes credentials only from Secrets and mounts the TLS files the flags name', () => {
      for (const w of workloads(distributed())) {
        const pod = w.spec.template.spec;
        const c = container(pod, 'arbor');
        const user = c.securityContext?.runAsUser ?? pod.securityContext?.runAsUser;
        assert.ok(
          user === 0 || pod.securityContext?.fsGroup !== undefined,
          `${w.metadata.name} runs as ${user} without an fsGroup: it cannot read its 0400 Secret files`,
        );
        assert.deepEqual(env(c, 'AWS_ACCESS_KEY_ID')?.valueFrom?.secretKeyRef, { name: 'arbor-s3', key: 'AWS_ACCESS_KEY_ID' });
        assert.deepEqual(env(c, 'AWS_SECRET_ACCESS_KEY')?.valueFrom?.secretKeyRef, { name: 'arbor-s3', key: 'AWS_SECRET_ACCESS_KEY' });
        assert.deepEqual(env(c, 'ETCD_USERNAME')?.valueFrom?.secretKeyRef, { name: 'arbor-etcd-auth', key: 'username' });
        assert.deepEqual(env(c, 'ETCD_PASSWORD')?.valueFrom?.secretKeyRef, { name: 'arbor-etcd-auth', key: 'password' });
        for (const e of c.env ?? []) {
          if (/KEY|SECRET|PASSWORD|USERNAME/.test(e.name)) assert.equal(e.value, undefined, `${e.name} is written in the manifest`);
        }
        assert.equal(env(c, 'NODE_EXTRA_CA_CERTS')?.value, env(c, 'AWS_CA_BUNDLE')?.value, 'Node.js trusts the S3 CA too');
        const files = [flag(c, 'etcd-ca'), flag(c, 'etcd-cert'), flag(c, 'etcd-key'), env(c, 'AWS_CA_BUNDLE')?.value ?? ''];
        for (const file of files) {
          const { mount, volume: v } = mountHolding(pod, c, file);
          assert.ok(v.secret, `${file} is not in a Secret volume`);
          assert.equal(mount.readOnly, true);
          assert.ok(
            (v.secret.items ?? []).some((item) => item.path === path.relative(mount.mountPath, file)),
            `${file} is not one of the Secret's items`,
          );
        }
      }
    });

    it('runs the node plugin on every node with a blob cache, and replicated controllers that elect a leader', () => {
      const objects = distributed();
      const ds = nodePlugin(objects);
      assert.equal(ds.spec.template.spec.affinity, undefined, 'not pinned to a node');
      const plugin = container(ds.spec.template.spec, 'arbor');
      assert.equal(flag(plugin, 'cache-size'), '20GiB');
      const cache = mountHolding(ds.spec.template.spec, plugin, flag(plugin, 'cache-dir'));
      assert.equal(cache.volume.emptyDir?.sizeLimit, '20Gi');
      const ctrl = controller(objects);
      assert.equal(ctrl.spec.replicas, 3);
      assert.equal(ctrl.spec.strategy?.type, 'RollingUpdate');
      assert.equal(ctrl.spec.template.spec.securityContext?.runAsNonRoot, true);
      // Every replica serves snapshot metadata (read-only, nothing to elect); the others act on the cluster and elect a leader.
      const electing = ctrl.spec.template.spec.containers.filter((c) => c.name.startsWith('csi-') && c.name !== 'csi-snapshot-metadata');
      for (const c of electing) assert.ok(flags(c).has('leader-election'), c.name);
      for (const sc of all(objects, 'StorageClass')) assert.equal(sc.volumeBindingMode, 'Immediate', sc.metadata.name);
    });
  });

  describe('the command lines', () => {
    /** Flags for NBD between nodes (every node attaches every volume). */
    const nodeToNodeFlags = ['tls-ca', 'relay-to', 'relay-admin', 'admin-listen', 'nbd-advertise'];

    /** Parses a container's args with arbor's own parser and command table. */
    function parse(c: Container) {
      const argv = (c.args ?? []).map((a) => a.replace('$(NODE_NAME)', dataNode).replace('$(HOST_IP)', '192.0.2.10'));
      return parseCommandLine(argv, commands);
    }

    it('passes every flag for NBD between nodes, and arbor node knows each', () => {
      const nodeCommand = commands.find((c) => c.path[0] === 'node')!;
      for (const f of nodeToNodeFlags) assert.ok(f in globalOptions || f in nodeCommand.options, `arbor node has no --${f}`);
      const passed = new Set(
        [...nodePlugins(embedded()), ...nodePlugins(distributed())].flatMap((w) => [...flags(container(w.spec.template.spec, 'arbor')).keys()]),
      );
      for (const f of nodeToNodeFlags) assert.ok(passed.has(f), `the chart passes no --${f}`);
    });

    it('passes only flags `arbor node` and `arbor controller` accept (embedded)', () => {
      for (const w of workloads(embedded())) {
        const parsed = parse(container(w.spec.template.spec, 'arbor'));
        assert.ok(parsed.command && parsed.parsed, `${w.metadata.name}: no command`);
        assert.equal(parsed.command.path[0], w.kind === 'Deployment' ? 'controller' : 'node');
      }
    });

    it('passes only flags arbor accepts (distributed)', function () {
      const nodeCommand = commands.find((c) => c.path[0] === 'node');
      if (!('store' in globalOptions) && !(nodeCommand && 'store' in nodeCommand.options)) {
        // The distributed backends (--store, --blobs, --etcd-*, --cache-*) arrive with their own issue.
        this.skip();
      }
      for (const w of workloads(distributed())) {
        const c = container(w.spec.template.spec, 'arbor');
        parse(c);
        // And the URLs parse with Arbor's own parsers, where they are built.
        const etcd = path.join(__dirname, '../../store/catalog/etcd.js');
        const s3 = path.join(__dirname, '../../store/blobs/s3-url.js');
        if (fs.existsSync(etcd)) {
          const { parseStoreUrl } = require(etcd) as { parseStoreUrl(url: string): { endpoints: string[]; prefix: string } };
          assert.deepEqual(parseStoreUrl(flag(c, 'store')), {
            endpoints: ['https://etcd-0.etcd.storage.svc:2379', 'https://etcd-1.etcd.storage.svc:2379', 'https://etcd-2.etcd.storage.svc:2379'],
            prefix: '/arbor/prod/arbor/',
          });
        }
        if (fs.existsSync(s3)) {
          const { parseBlobsUrl } = require(s3) as { parseBlobsUrl(url: string, env: NodeJS.ProcessEnv): unknown };
          assert.deepEqual(parseBlobsUrl(flag(c, 'blobs'), {}), {
            bucket: 'arbor-blobs',
            prefix: 'prod/',
            endpoint: 'https://rgw.storage.svc:8443',
            region: 'default',
          });
        }
      }
    });

    it('runs the controller sidecars with the flags Arbor needs', () => {
      const pod = controller(defaults()).spec.template.spec;
      const provisioner = flags(container(pod, 'csi-provisioner'));
      for (const f of ['extra-create-metadata', 'leader-election']) assert.ok(provisioner.has(f), f);
      assert.equal(provisioner.get('feature-gates'), 'Topology=true');
      assert.equal(provisioner.get('default-fstype'), 'ext4');
      for (const name of ['csi-provisioner', 'csi-attacher', 'csi-snapshotter', 'csi-resizer']) {
        assert.equal(flag(container(pod, name), 'timeout'), '60s', name);
        assert.ok(flags(container(pod, name)).has('leader-election'), name);
      }
      assert.equal(flag(container(pod, 'csi-snapshotter'), 'feature-gates'), 'CSIVolumeGroupSnapshot=false');
      const withGroups = controller(distributed()).spec.template.spec;
      assert.equal(flag(container(withGroups, 'csi-snapshotter'), 'feature-gates'), 'CSIVolumeGroupSnapshot=true');
      const noSnapshots = render({ set: { 'store.embedded.nodeName': dataNode, 'snapshots.enabled': false } });
      assert.ok(!controller(noSnapshots).spec.template.spec.containers.some((c) => c.name === 'csi-snapshotter'));
      assert.equal(all(noSnapshots, 'VolumeSnapshotClass').length, 0);
    });

    it('lets the provisioner and snapshotter reach the API server fast enough to clone hundreds of VM disks at once, from values', () => {
      const pod = controller(defaults()).spec.template.spec;
      // 50 clones took 22 s at the sidecars' default 5 requests/s, Arbor's share ~150 ms: the defaults must be well above that.
      for (const [name, workers] of [
        ['csi-provisioner', 100],
        ['csi-snapshotter', 50],
      ] as const) {
        const sidecar = container(pod, name);
        assert.ok(Number(flag(sidecar, 'kube-api-qps')) >= 100, name);
        assert.ok(Number(flag(sidecar, 'kube-api-burst')) >= 2 * Number(flag(sidecar, 'kube-api-qps')), name);
        assert.equal(flag(sidecar, 'worker-threads'), String(workers), name);
      }
      const tuned = controller(
        render({
          set: {
            'store.embedded.nodeName': dataNode,
            'sidecars.provisioner.kubeApiQps': 300,
            'sidecars.provisioner.kubeApiBurst': 600,
            'sidecars.provisioner.workerThreads': 200,
            'sidecars.snapshotter.kubeApiQps': 20,
            'sidecars.snapshotter.kubeApiBurst': 40,
            'sidecars.snapshotter.workerThreads': 5,
          },
        }),
      ).spec.template.spec;
      const provisioner = flags(container(tuned, 'csi-provisioner'));
      assert.deepEqual([provisioner.get('kube-api-qps'), provisioner.get('kube-api-burst'), provisioner.get('worker-threads')], ['300', '600', '200']);
      const snapshotter = flags(container(tuned, 'csi-snapshotter'));
      assert.deepEqual([snapshotter.get('kube-api-qps'), snapshotter.get('kube-api-burst'), snapshotter.get('worker-threads')], ['20', '40', '5']);
      // Values without them (an older chart's, kept by `helm upgrade --reuse-values`): the sidecars' own defaults, no empty flag.
      const unset = controller(
        render({ set: { 'store.embedded.nodeName': dataNode, 'sidecars.provisioner.kubeApiQps': 'null', 'sidecars.snapshotter.workerThreads': 'null' } }),
      ).spec.template.spec;
      assert.ok(!flags(container(unset, 'csi-provisioner')).has('kube-api-qps'));
      assert.equal(flag(container(unset, 'csi-provisioner'), 'kube-api-burst'), '200');
      assert.ok(!flags(container(unset, 'csi-snapshotter')).has('worker-threads'));
      // The attacher and resizer act per attachment or resize, not per clone: left at their own defaults.
      for (const name of ['csi-attacher', 'csi-resizer']) assert.ok(!flags(container(pod, name)).has('kube-api-qps'), name);
    });

    it('pins every image to a version, and lets values override each one', () => {
      for (const w of workloads(defaults())) {
        for (const c of [...w.spec.template.spec.containers, ...(w.spec.template.spec.initContainers ?? [])]) {
          assert.match(c.image, /^[a-z0-9./-]+(:v?\d+\.\d+\.\d+|@sha256:[0-9a-f]{64})$/, `${c.name}: ${c.image}`);
          if (c.name !== 'arbor' && c.name !== 'load-nbd') assert.match(c.image, /^registry\.k8s\.io\/sig-storage\//, c.name);
        }
      }
      const mirrored = render({
        set: {
          'store.embedded.nodeName': dataNode,
          'sidecars.provisioner.image.repository': 'mirror.example/csi-provisioner',
          'sidecars.provisioner.image.tag': 'v9.9.9',
          'image.digest': `sha256:${'a'.repeat(64)}`,
        },
      });
      const pod = controller(mirrored).spec.template.spec;
      assert.equal(container(pod, 'csi-provisioner').image, 'mirror.example/csi-provisioner:v9.9.9');
      assert.equal(container(pod, 'arbor').image, `ghcr.io/arbor-csi/arbor@sha256:${'a'.repeat(64)}`);
    });
  });

  describe('health, resources and metrics', () => {
    it("probes each plugin through its own livenessprobe sidecar's port", () => {
      const seen = new Set<number>();
      for (const w of workloads(defaults())) {
        const pod = w.spec.template.spec;
        const plugin = container(pod, 'arbor');
        const probePort = plugin.livenessProbe?.httpGet?.port;
        assert.equal(typeof probePort, 'string', 'a named port');
        const healthPort = Number(flag(container(pod, 'liveness-probe'), 'health-port'));
        assert.equal(port(plugin, probePort as string), healthPort);
        assert.equal(plugin.livenessProbe?.httpGet?.path, '/healthz');
        seen.add(healthPort);
      }
      assert.equal(seen.size, 2, 'the controller and the node use different health ports');
    });

    it('gives every container requests and a memory limit, and no CPU limit', () => {
      for (const w of [...workloads(defaults()), ...workloads(distributed())]) {
        for (const c of [...w.spec.template.spec.containers, ...(w.spec.template.spec.initContainers ?? [])]) {
          assert.ok(c.resources?.requests?.cpu && c.resources.requests.memory, `${w.metadata.name}/${c.name} requests`);
          assert.ok(c.resources?.limits?.memory, `${w.metadata.name}/${c.name} memory limit`);
          assert.equal(c.resources?.limits?.cpu, undefined, `${w.metadata.name}/${c.name} CPU limit`);
        }
      }
    });

    it('runs the node plugin as node-critical and the controller as cluster-critical', () => {
      const objects = defaults();
      assert.equal(nodePlugin(objects).spec.template.spec.priorityClassName, 'system-node-critical');
      assert.equal(controller(objects).spec.template.spec.priorityClassName, 'system-cluster-critical');
    });

    it('serves metrics on the named port the scrape annotations and the ServiceMonitor point at', () => {
      const objects = distributed();
      const services = all(objects, 'Service').filter((s) => s.metadata.labels?.['arbor.dev/metrics'] === 'true');
      assert.equal(services.length, 2);
      const monitor = one(objects, 'ServiceMonitor');
      const monitorSpec = monitor.spec as {
        selector: { matchLabels: Record<string, string> };
        endpoints: { port: string }[];
        namespaceSelector: { matchNames: string[] };
      };
      assert.deepEqual(monitorSpec.namespaceSelector.matchNames, [namespace]);
      assert.deepEqual(monitor.metadata.labels?.release, 'prometheus');
      for (const [w, expected] of [
        [controller(objects), 9820],
        [nodePlugin(objects), 9821],
      ] as const) {
        const pod = w.spec.template;
        const plugin = container(pod.spec, 'arbor');
        assert.equal(flag(plugin, 'metrics-listen'), `0.0.0.0:${expected}`);
        assert.equal(port(plugin, 'metrics'), expected);
        assert.equal(pod.metadata.annotations?.['prometheus.io/port'], String(expected));
        assert.equal(pod.metadata.annotations?.['prometheus.io/scrape'], 'true');
        const service = services.find((s) => {
          const selector = (s.spec as { selector: Record<string, string> }).selector;
          return Object.entries(selector).every(([k, v]) => pod.metadata.labels[k] === v);
        });
        assert.ok(service, `no Service selects ${w.metadata.name}'s pods`);
        const servicePorts = (service.spec as { ports: { name: string; targetPort: string }[] }).ports;
        assert.deepEqual(
          servicePorts.map((p) => [p.name, p.targetPort]),
          [['metrics', 'metrics']],
        );
        assert.ok(
          Object.entries(monitorSpec.selector.matchLabels).every(([k, v]) => service.metadata.labels?.[k] === v),
          `the ServiceMonitor does not select ${service.metadata.name}`,
        );
        assert.ok(monitorSpec.endpoints.some((e) => e.port === 'metrics'));
      }
      const quiet = render({ set: { 'store.embedded.nodeName': dataNode, 'metrics.enabled': false } });
      for (const w of workloads(quiet)) {
        assert.ok(!flags(container(w.spec.template.spec, 'arbor')).has('metrics-listen'));
        assert.equal(w.spec.template.metadata.annotations?.['prometheus.io/scrape'], undefined);
      }
    });
  });

  describe('RBAC: least privilege', () => {
    type Rule = { apiGroups: string[]; resources: string[]; verbs: string[] };
    const rulesOf = (o: K8sObject) => (o.rules as Rule[]) ?? [];
    /** resource → verbs, from a role's rules. */
    const grants = (o: K8sObject) => {
      const out: Record<string, string[]> = {};
      for (const rule of rulesOf(o))
        for (const group of rule.apiGroups) for (const resource of rule.resources) out[`${group}/${resource}`] = [...rule.verbs].sort();
      return out;
    };
    const verbs = (...v: string[]) => v.sort();

    it("grants each controller sidecar exactly the rules of its upstream rbac.yaml, nothing to read Secrets and nothing with '*'", () => {
      const objects = distributed();
      const controllerName = controller(objects).metadata.name;
      const expected: Record<string, Record<string, string[]>> = {
        provisioner: {
          '/persistentvolumes': verbs('get', 'list', 'watch', 'create', 'patch', 'delete'),
          '/persistentvolumeclaims': verbs('get', 'list', 'watch', 'update'),
          'storage.k8s.io/storageclasses': verbs('get', 'list', 'watch'),
          '/events': verbs('list', 'watch', 'create', 'update', 'patch'),
          'snapshot.storage.k8s.io/volumesnapshots': verbs('get', 'list'),
          'snapshot.storage.k8s.io/volumesnapshotcontents': verbs('get', 'list'),
          'storage.k8s.io/csinodes': verbs('get', 'list', 'watch'),
          '/nodes': verbs('get', 'list', 'watch'),
          'storage.k8s.io/volumeattachments': verbs('get', 'list', 'watch'),
          'storage.k8s.io/volumeattributesclasses': verbs('get', 'list', 'watch'),
        },
        attacher: {
          '/persistentvolumes': verbs('get', 'list', 'watch', 'patch'),
          'storage.k8s.io/csinodes': verbs('get', 'list', 'watch'),
          'storage.k8s.io/volumeattachments': verbs('get', 'list', 'watch', 'patch'),
          'storage.k8s.io/volumeattachments/status': verbs('patch'),
        },
        snapshotter: {
          '/events': verbs('list', 'watch', 'create', 'update', 'patch'),
          'snapshot.storage.k8s.io/volumesnapshotclasses': verbs('get', 'list', 'watch'),
          'snapshot.storage.k8s.io/volumesnapshotcontents': verbs('get', 'list', 'watch', 'update', 'patch'),
          'snapshot.storage.k8s.io/volumesnapshotcontents/status': verbs('update', 'patch'),
          'groupsnapshot.storage.k8s.io/volumegroupsnapshotclasses': verbs('get', 'list', 'watch'),
          'groupsnapshot.storage.k8s.io/volumegroupsnapshotcontents': verbs('get', 'list', 'watch', 'update', 'patch'),
          'groupsnapshot.storage.k8s.io/volumegroupsnapshotcontents/status': verbs('update', 'patch'),
        },
        'snapshot-metadata': {
          'cbt.storage.k8s.io/snapshotmetadataservices': verbs('get', 'list', 'watch'),
          'authentication.k8s.io/tokenreviews': verbs('create'),
          'authorization.k8s.io/subjectaccessreviews': verbs('create'),
          'snapshot.storage.k8s.io/volumesnapshots': verbs('get', 'list'),
          'snapshot.storage.k8s.io/volumesnapshotcontents': verbs('get', 'list'),
        },
        resizer: {
          '/persistentvolumes': verbs('get', 'list', 'watch', 'patch'),
          '/persistentvolumeclaims': verbs('get', 'list', 'watch'),
          '/pods': verbs('get', 'list', 'watch'),
          '/persistentvolumeclaims/status': verbs('patch'),
          '/events': verbs('list', 'watch', 'create', 'update', 'patch'),
          'storage.k8s.io/volumeattributesclasses': verbs('get', 'list', 'watch'),
        },
      };
      const clusterRoles = all(objects, 'ClusterRole');
      assert.deepEqual(
        clusterRoles.map((r) => r.metadata.name).sort(),
        Object.keys(expected)
          .map((s) => `${controllerName}-${s}`)
          .sort(),
      );
      for (const [sidecar, rules] of Object.entries(expected)) {
        assert.deepEqual(grants(one(objects, 'ClusterRole', `${controllerName}-${sidecar}`)), rules, sidecar);
      }
      for (const role of [...clusterRoles, ...all(objects, 'Role')]) {
        for (const rule of rulesOf(role)) {
          for (const word of [...rule.apiGroups, ...rule.resources, ...rule.verbs]) assert.notEqual(word, '*', role.metadata.name);
          assert.ok(!rule.resources.includes('secrets'), `${role.metadata.name} reads Secrets`);
          if (role.kind === 'ClusterRole') assert.ok(!rule.resources.includes('leases'), 'leases are namespaced');
        }
      }
      assert.ok(!all(embedded(), 'ClusterRole').some((r) => r.metadata.name.endsWith('-snapshot-metadata')), 'snapshot metadata rights only with the sidecar');
      const embeddedSnapshotter = grants(one(embedded(), 'ClusterRole', `${controllerName}-snapshotter`));
      assert.ok(!Object.keys(embeddedSnapshotter).some((k) => k.startsWith('groupsnapshot')), 'group snapshot rights only with group snapshots');
    });

    it('keeps leader election to Leases in the release namespace, and binds only the controller', () => {
      const objects = defaults();
      const ctrl = controller(objects);
      const role = one(objects, 'Role');
      assert.deepEqual(grants(role), { 'coordination.k8s.io/leases': verbs('get', 'watch', 'list', 'delete', 'update', 'create') });
      assert.equal(role.metadata.namespace, namespace);
      const roleNames = new Set([...all(objects, 'ClusterRole'), role].map((r) => `${r.kind}/${r.metadata.name}`));
      for (const binding of [...all(objects, 'ClusterRoleBinding'), ...all(objects, 'RoleBinding')]) {
        const subjects = binding.subjects as { kind: string; name: string; namespace: string }[];
        assert.deepEqual(subjects, [{ kind: 'ServiceAccount', name: ctrl.spec.template.spec.serviceAccountName, namespace }], binding.metadata.name);
        const ref = binding.roleRef as { kind: string; name: string };
        assert.ok(roleNames.has(`${ref.kind}/${ref.name}`), `${binding.metadata.name} binds a role the chart does not render`);
      }
      const nodePod = nodePlugin(objects).spec.template.spec;
      assert.equal(nodePod.automountServiceAccountToken, false, 'the node plugin gets no API token');
      const nodeAccount = one(objects, 'ServiceAccount', nodePod.serviceAccountName);
      assert.equal(nodeAccount.automountServiceAccountToken, false);
    });
  });

  describe('storage classes and KubeVirt', () => {
    it('offers a Block class and a Filesystem class with parameters Arbor accepts', () => {
      const objects = defaults();
      const classes = all(objects, 'StorageClass');
      assert.deepEqual(
        classes.map((c) => c.metadata.name),
        ['arbor-block', 'arbor-fs'],
      );
      for (const sc of classes) {
        assert.equal(sc.allowVolumeExpansion, true);
        assert.equal(sc.reclaimPolicy, 'Delete');
        const parameters = sc.parameters as Record<string, string>;
        for (const key of Object.keys(parameters))
          assert.ok(
            ['extentSize', 'fsType', 'mkfsOptions'].includes(key) || key.startsWith('csi.storage.k8s.io/'),
            `${sc.metadata.name}: CreateVolume refuses parameter ${key}`,
          );
        assert.equal(parameters.extentSize, '64KiB');
      }
      assert.equal((classes[0].parameters as Record<string, string>)['csi.storage.k8s.io/fstype'], undefined, 'the block class formats nothing');
      assert.equal((classes[1].parameters as Record<string, string>)['csi.storage.k8s.io/fstype'], 'ext4');
      const tuned = all(
        render({
          set: { 'store.embedded.nodeName': dataNode, 'storageClasses.filesystem.fsType': 'xfs', 'storageClasses.filesystem.mkfsOptions': '-m reflink=0' },
        }),
        'StorageClass',
      )[1];
      assert.deepEqual(tuned.parameters, { 'csi.storage.k8s.io/fstype': 'xfs', extentSize: '64KiB', mkfsOptions: '-m reflink=0' });
    });

    it('creates the VolumeAttributesClasses the values list, for its driver, with parameters ModifyVolume takes; none by default', () => {
      assert.deepEqual(all(defaults(), 'VolumeAttributesClass'), []);
      const dir = tempDir();
      try {
        const values = path.join(dir.dir, 'classes.yaml');
        fs.writeFileSync(
          values,
          [
            'volumeAttributesClasses:',
            '  - { name: arbor-silver, maxIops: 1000000, maxBandwidth: 100MiB }',
            '  - { name: arbor-gold, maxIops: "10000", burstSeconds: 2.5 }',
            '  - { name: arbor-wide, maxBandwidth: 1GiB/s }',
          ].join('\n'),
        );
        const objects = render({ valuesFiles: [ciValues.embedded, values] });
        const classes = all(objects, 'VolumeAttributesClass') as unknown as Array<K8sObject & { driverName: string; parameters: Record<string, string> }>;
        assert.deepEqual(
          classes.map((c) => [c.metadata.name, c.driverName, c.parameters]),
          [
            ['arbor-silver', driverName, { maxIops: '1000000', maxBandwidth: '100MiB' }],
            ['arbor-gold', driverName, { maxIops: '10000', burstSeconds: '2.5' }],
            ['arbor-wide', driverName, { maxBandwidth: '1GiB/s' }],
          ],
          'numbers print as integers (never 1e+06)',
        );
        for (const c of classes) {
          assert.deepEqual(objectProblems(c), []);
          assert.ok(Object.keys(parseQosParameters(c.parameters)).length > 0, `${c.metadata.name}: ModifyVolume takes its parameters`);
        }
        const bad = path.join(dir.dir, 'bad.yaml');
        fs.writeFileSync(bad, 'volumeAttributesClasses:\n  - { name: burst-only, burstSeconds: 1 }\n');
        const refused = helmTemplate({ namespace, valuesFiles: [ciValues.embedded, bad] });
        assert.notEqual(refused.status, 0, 'a class without a limit is refused');
        assert.match(refused.stderr, /missing property 'maxIops'/);
      } finally {
        dir.cleanup();
      }
    });

    it('describes the block class to CDI: ReadWriteMany Block first (VMs live-migrate), CSI clones, golden images as snapshots', () => {
      const objects = kubevirt();
      const profile = one(objects, 'StorageProfile');
      const block = one(objects, 'StorageClass', 'arbor-block');
      assert.equal(profile.metadata.name, block.metadata.name, 'CDI matches profiles to classes by name');
      const spec = profile.spec as {
        claimPropertySets: { accessModes: string[]; volumeMode: string }[];
        cloneStrategy: string;
        dataImportCronSourceFormat: string;
        snapshotClass: string;
      };
      // Before live migration the first set was ReadWriteOnce Block, and no set offered ReadWriteMany.
      assert.deepEqual(spec.claimPropertySets[0], { accessModes: ['ReadWriteMany'], volumeMode: 'Block' }, 'CDI gives VM disks the first set');
      assert.deepEqual(spec.claimPropertySets, [
        { accessModes: ['ReadWriteMany'], volumeMode: 'Block' },
        { accessModes: ['ReadWriteOnce'], volumeMode: 'Block' },
        { accessModes: ['ReadWriteOnce'], volumeMode: 'Filesystem' },
      ]);
      for (const set of spec.claimPropertySets)
        if (set.volumeMode === 'Filesystem') assert.ok(!set.accessModes.includes('ReadWriteMany'), 'Arbor refuses ReadWriteMany Filesystem volumes');
      assert.equal(spec.cloneStrategy, 'csi-clone');
      assert.equal(spec.dataImportCronSourceFormat, 'snapshot');
      assert.equal(spec.snapshotClass, one(objects, 'VolumeSnapshotClass').metadata.name);
      assert.match(profile.metadata.annotations?.['helm.sh/hook'] ?? '', /post-install/);
      assert.equal(block.metadata.annotations?.['storageclass.kubevirt.io/is-default-virt-class'], 'true');
      assert.equal(one(objects, 'VolumeSnapshotClass').metadata.annotations?.['snapshot.storage.kubernetes.io/is-default-class'], 'true');
      assert.equal(all(defaults(), 'StorageProfile').length, 0, 'no StorageProfile unless asked (it needs CDI)');
    });

    it('labels the namespace for the privileged node plugin when it creates it', () => {
      const ns = one(kubevirt(), 'Namespace');
      assert.equal(ns.metadata.name, namespace);
      for (const mode of ['enforce', 'audit', 'warn']) assert.equal(ns.metadata.labels?.[`pod-security.kubernetes.io/${mode}`], 'privileged');
      assert.equal(all(defaults(), 'Namespace').length, 0);
    });
  });
});
