import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { driverName } from '../../csi/proto';
import { helm, helmTemplate, K8sObject, RenderOptions, valuesArgs, chartDir } from '../support/helm';
import { helmTemplateInCluster } from './fake-api';
import { objectProblems } from './models';
import { all, container, controller, dataNode, defaults, distributed, flag, mountAt, namespace, one, port, volume } from './rendered';

const secretName = 'arbor-snapshot-metadata-tls';
const sidecarName = 'csi-snapshot-metadata';

/** The throwaway CA of the distributed CI values (a real certificate: the chart only passes it on). */
function ciCaCert(): string {
  const values = fs.readFileSync(path.join(chartDir, 'ci/distributed-values.yaml'), 'utf8');
  const pem = /-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/.exec(values);
  assert.ok(pem, 'the distributed CI values carry no CA');
  return pem[0].replace(/^ +/gm, '');
}

/** Renders with extra values given as a file (a PEM does not survive --set). */
function renderWith(values: Record<string, unknown>, options: RenderOptions = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'arbor-values-'));
  try {
    const file = path.join(dir, 'values.yaml');
    fs.writeFileSync(file, JSON.stringify(values));
    return helmTemplate({ namespace, ...options, valuesFiles: [...(options.valuesFiles ?? []), file] });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

const embeddedOn = (extra: Record<string, unknown> = {}) => ({
  store: { embedded: { nodeName: dataNode } },
  snapshotMetadata: { enabled: true, tls: { secretName, caCert: ciCaCert() }, ...extra },
});

function renderedOk(values: Record<string, unknown>): K8sObject[] {
  const result = renderWith(values);
  assert.equal(result.status, 0, result.stderr);
  return result.objects;
}

type SnapshotMetadataService = K8sObject & { spec: { address: string; caCert: string; audience: string } };
type Service = K8sObject & { spec: { selector: Record<string, string>; ports: { name: string; port: number; targetPort: string }[] } };

describe('the chart: changed-block tracking (snapshotMetadata)', function () {
  this.timeout(120_000);

  it('is off by default: no sidecar, Service, SnapshotMetadataService or rights', () => {
    const objects = defaults();
    assert.ok(!controller(objects).spec.template.spec.containers.some((c) => c.name === sidecarName));
    assert.equal(all(objects, 'SnapshotMetadataService').length, 0);
    assert.ok(!all(objects, 'Service').some((s) => s.metadata.name.endsWith('-snapshot-metadata')));
    assert.ok(!all(objects, 'ClusterRole').some((r) => r.metadata.name.endsWith('-snapshot-metadata')));
  });

  for (const [mode, objects] of [
    ['embedded', () => renderedOk(embeddedOn())],
    ['distributed', distributed],
  ] as const) {
    describe(`${mode} mode, turned on`, () => {
      it('renders only objects the cluster knows, with no unknown or mistyped field', () => {
        assert.deepEqual(
          objects().flatMap((o) => objectProblems(o)),
          [],
        );
      });

      it('runs the sidecar beside the controller, on its CSI socket, with the TLS files of the Secret', () => {
        const pod = controller(objects()).spec.template.spec;
        const sidecar = container(pod, sidecarName);
        assert.equal(sidecar.image, 'registry.k8s.io/sig-storage/csi-snapshot-metadata:v1.1.0');
        // The socket the plugin serves, through the same volume.
        const plugin = container(pod, 'arbor');
        const socket = flag(plugin, 'csi-endpoint').slice('unix://'.length);
        assert.equal(flag(sidecar, 'csi-address'), socket);
        const dir = path.dirname(socket);
        assert.equal(mountAt(sidecar, dir).name, mountAt(plugin, dir).name);
        // Its certificate and key, from the Secret the values name.
        for (const [f, key] of [
          ['tls-cert', 'tls.crt'],
          ['tls-key', 'tls.key'],
        ]) {
          const file = flag(sidecar, f);
          const mount = mountAt(sidecar, path.dirname(file));
          assert.equal(mount.readOnly, true);
          const secret = volume(pod, mount.name).secret;
          assert.equal(secret?.secretName, secretName);
          assert.ok(
            secret?.items?.some((i) => i.key === key && i.path === path.basename(file)),
            `${f} is ${key} of the Secret`,
          );
        }
        assert.equal(flag(sidecar, 'port'), String(port(sidecar, 'snapshot-meta')));
        assert.equal(flag(sidecar, 'http-endpoint'), `:${port(sidecar, 'snapshot-http')}`);
        const readiness = (sidecar as { readinessProbe?: { httpGet?: { path: string; port: string } } }).readinessProbe;
        assert.deepEqual(readiness?.httpGet, { path: '/health', port: 'snapshot-http' });
        assert.equal(flag(sidecar, 'timeout'), '60s');
        const ports = pod.containers.flatMap((c) => (c.ports ?? []).map((p) => p.containerPort));
        assert.equal(new Set(ports).size, ports.length, `ports shared in the controller pod: ${ports.join(', ')}`);
      });

      it('announces the Service in a SnapshotMetadataService named after the driver: its address, CA and audience', () => {
        const rendered = objects();
        const sms = one(rendered, 'SnapshotMetadataService') as SnapshotMetadataService;
        assert.equal(sms.apiVersion, 'cbt.storage.k8s.io/v1beta1');
        assert.equal(sms.metadata.name, driverName);
        assert.equal(sms.metadata.namespace, undefined, 'cluster-scoped');
        const service = one(rendered, 'Service', 'arbor-snapshot-metadata') as Service;
        assert.equal(service.metadata.namespace, namespace);
        const [servicePort] = service.spec.ports;
        assert.equal(sms.spec.address, `arbor-snapshot-metadata.${namespace}.svc:${servicePort.port}`);
        assert.equal(servicePort.port, 6443);
        // The Service leads to the controller pods' sidecar port.
        const pod = controller(rendered).spec.template;
        assert.ok(
          Object.entries(service.spec.selector).every(([k, v]) => pod.metadata.labels[k] === v),
          'the Service selects the controller pods',
        );
        assert.equal(servicePort.targetPort, 'snapshot-meta');
        port(container(pod.spec, sidecarName), 'snapshot-meta');
        // The CA, base64 as the CRD's []byte field wants it: a certificate backup tools can load.
        const ca = new X509Certificate(Buffer.from(sms.spec.caCert, 'base64'));
        assert.ok(ca.ca, 'caCert is a CA certificate');
        assert.equal(Buffer.from(sms.spec.caCert, 'base64').toString().trim(), ciCaCert().trim());
        // One audience, the same in the sidecar's check and in what tools are told to ask for.
        assert.equal(sms.spec.audience, mode === 'embedded' ? driverName : 'backup.example.com');
        assert.equal(flag(container(pod.spec, sidecarName), 'audience'), sms.spec.audience);
      });

      it('binds the sidecar’s rights to the controller’s account', () => {
        const rendered = objects();
        const role = one(rendered, 'ClusterRole', 'arbor-controller-snapshot-metadata');
        const binding = one(rendered, 'ClusterRoleBinding', 'arbor-controller-snapshot-metadata');
        assert.deepEqual((binding.roleRef as { name: string }).name, role.metadata.name);
        assert.deepEqual(binding.subjects, [{ kind: 'ServiceAccount', name: controller(rendered).spec.template.spec.serviceAccountName, namespace }]);
      });
    });
  }

  it('takes another audience, API version, ports and image from the values', () => {
    const objects = renderedOk({
      ...embeddedOn({ audience: 'velero', apiVersion: 'cbt.storage.k8s.io/v1alpha1', port: 8443, grpcPort: 50052, httpPort: 9900 }),
      sidecars: { snapshotMetadata: { image: { repository: 'mirror.example/csi-snapshot-metadata', tag: 'v0.2.0' } } },
    });
    const sms = one(objects, 'SnapshotMetadataService') as SnapshotMetadataService;
    assert.equal(sms.apiVersion, 'cbt.storage.k8s.io/v1alpha1');
    assert.equal(sms.spec.audience, 'velero');
    assert.equal(sms.spec.address, `arbor-snapshot-metadata.${namespace}.svc:8443`);
    const sidecar = container(controller(objects).spec.template.spec, sidecarName);
    assert.equal(sidecar.image, 'mirror.example/csi-snapshot-metadata:v0.2.0');
    assert.equal(flag(sidecar, 'audience'), 'velero');
    assert.equal(flag(sidecar, 'port'), '50052');
    assert.equal(flag(sidecar, 'http-endpoint'), ':9900');
    assert.deepEqual(
      objects.flatMap((o) => objectProblems(o)),
      [],
    );
  });

  it('reads the CA from the Secret’s ca.crt when the values give none (an install against the cluster)', async () => {
    const ca = ciCaCert();
    const secret: K8sObject = {
      apiVersion: 'v1',
      kind: 'Secret',
      metadata: { name: secretName, namespace },
      type: 'kubernetes.io/tls',
      data: { 'tls.crt': Buffer.from('x').toString('base64'), 'tls.key': Buffer.from('y').toString('base64'), 'ca.crt': Buffer.from(ca).toString('base64') },
    };
    const set = { 'store.embedded.nodeName': dataNode, 'snapshotMetadata.enabled': true, 'snapshotMetadata.tls.secretName': secretName };
    const found = await helmTemplateInCluster([secret], { namespace, set });
    assert.equal(found.status, 0, found.stderr);
    const sms = one(found.objects, 'SnapshotMetadataService') as SnapshotMetadataService;
    assert.equal(Buffer.from(sms.spec.caCert, 'base64').toString(), ca);
    assert.ok(found.requests.includes(`GET /api/v1/namespaces/${namespace}/secrets/${secretName}`), 'helm looked the Secret up');

    const missing = await helmTemplateInCluster([], { namespace, set });
    assert.notEqual(missing.status, 0, 'rendered a SnapshotMetadataService with no CA');
    assert.match(missing.stderr, /snapshotMetadata\.tls\.caCert.*arbor-snapshot-metadata-tls with ca\.crt/s);
  });

  describe('refuses values that would not work, saying which and why', () => {
    const node = { 'store.embedded.nodeName': dataNode, 'snapshotMetadata.enabled': true };
    const cases: [string, Record<string, string | number | boolean>, RegExp][] = [
      ['no Secret for the sidecar’s certificate', { ...node }, /snapshotMetadata\.enabled needs snapshotMetadata\.tls\.secretName/],
      [
        'snapshot metadata without snapshots',
        { ...node, 'snapshotMetadata.tls.secretName': secretName, 'snapshots.enabled': false },
        /snapshotMetadata\.enabled needs snapshots\.enabled/,
      ],
      [
        'a sidecar port the controller uses already',
        { ...node, 'snapshotMetadata.tls.secretName': secretName, 'snapshotMetadata.httpPort': 9808 },
        /controller\.healthPort, controller\.metricsPort, snapshotMetadata\.grpcPort and snapshotMetadata\.httpPort must differ/,
      ],
      [
        'no CA where helm template cannot read the Secret',
        { ...node, 'snapshotMetadata.tls.secretName': secretName },
        /set snapshotMetadata\.tls\.caCert to the CA's PEM.*helm template and --dry-run=client cannot read Secrets/s,
      ],
      [
        'a CA that is not PEM',
        { ...node, 'snapshotMetadata.tls.secretName': secretName, 'snapshotMetadata.tls.caCert': 'MIIB...' },
        /\/snapshotMetadata\/tls\/caCert/,
      ],
      ['an API version the CRD does not have', { ...node, 'snapshotMetadata.apiVersion': 'cbt.storage.k8s.io/v1' }, /\/snapshotMetadata\/apiVersion/],
      ['an audience with spaces', { ...node, 'snapshotMetadata.audience': 'my backups' }, /\/snapshotMetadata\/audience/],
      ['a misspelled key', { ...node, 'snapshotMetadata.secretName': secretName }, /\/snapshotMetadata.*additional properties 'secretName' not allowed/],
    ];
    for (const [what, set, message] of cases) {
      it(`refuses ${what}`, () => {
        const result = helmTemplate({ namespace, set });
        assert.notEqual(result.status, 0, `rendered anyway:\n${result.stdout.slice(0, 400)}`);
        assert.match(result.stderr, message);
      });
    }

    it('refuses the values of the chart before it (what `helm upgrade --reuse-values` renders with), saying how to upgrade', () => {
      const copy = fs.mkdtempSync(path.join(os.tmpdir(), 'arbor-chart-'));
      try {
        fs.cpSync(chartDir, copy, { recursive: true });
        const file = path.join(copy, 'values.yaml');
        const text = fs.readFileSync(file, 'utf8');
        // Without the top-level snapshotMetadata section and the sidecar's image.
        const without = text
          .replace(/^snapshotMetadata:\n(?:(?: .*)?\n)*/m, '')
          .replace(/^ {2}# external-snapshot-metadata[^\n]*\n {2}snapshotMetadata:\n(?: {4}.*\n)*/m, '');
        assert.ok(!/snapshotMetadata/.test(without), 'the copy still has snapshotMetadata');
        fs.writeFileSync(file, without);
        const result = helm(['template', 'arbor', copy, '--namespace', namespace, ...valuesArgs({ set: { 'store.embedded.nodeName': dataNode } })]);
        assert.notEqual(result.status, 0, 'rendered anyway');
        assert.match(result.stderr, /the values lack snapshotMetadata and sidecars\.snapshotMetadata.*--reset-then-reuse-values/s);
      } finally {
        fs.rmSync(copy, { recursive: true, force: true });
      }
    });
  });

  it('names what it installed in NOTES.txt', () => {
    const result = helm(['install', 'arbor', chartDir, '--dry-run=client', '--namespace', namespace, '-f', path.join(chartDir, 'ci/distributed-values.yaml')]);
    assert.equal(result.status, 0, result.stderr);
    const notes = result.stdout.slice(result.stdout.indexOf('NOTES:'));
    assert.match(notes, /changed-block tracking: sidecar csi-snapshot-metadata/);
    assert.match(notes, new RegExp(`address arbor-snapshot-metadata\\.${namespace}\\.svc:6443`));
    assert.match(notes, /audience backup\.example\.com/);
  });
});
