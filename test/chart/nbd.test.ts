/**
 * NBD between nodes: every node attaches every volume. In embedded mode the plugin on
 * the data node serves every volume over TCP and a relaying plugin on every other node
 * reaches it through a Service; in distributed mode every plugin listens and advertises
 * its node's own address. All of it is mutual TLS, with one certificate (server and
 * client auth) signed by one CA, from a Secret the chart generates or is given.
 */
import assert from 'node:assert/strict';
import { createPrivateKey, X509Certificate } from 'node:crypto';
import { AddressInfo } from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { helmTemplate, K8sObject } from '../support/helm';
import { helmTemplateInCluster } from './fake-api';
import {
  all,
  Container,
  container,
  dataNode,
  distributed,
  embedded,
  env,
  flag,
  flags,
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

const generatedSecret = 'arbor-nbd-tls';
const serverAuth = '1.3.6.1.5.5.7.3.1';
const clientAuth = '1.3.6.1.5.5.7.3.2';
const dayMs = 24 * 3600 * 1000;

interface Service extends K8sObject {
  spec: { type?: string; selector: Record<string, string>; ports: { name: string; port: number; targetPort: string | number; protocol: string }[] };
}
interface Secret extends K8sObject {
  type: string;
  data: Record<string, string>;
}

const plugin = (w: Workload) => container(w.spec.template.spec, 'arbor');
const selects = (selector: Record<string, string>, labels: Record<string, string>) => Object.entries(selector).every(([k, v]) => labels[k] === v);

/** The Secret volume and file name behind a file a flag names, checked: read-only, a whole directory (no subPath), one of the Secret's items. */
function secretFile(pod: PodSpec, c: Container, file: string): { secretName: string; key: string } {
  const { mount, volume: v } = mountHolding(pod, c, file);
  assert.ok(v.secret, `${file} is not in a Secret volume`);
  assert.equal(mount.readOnly, true, `${file} is mounted writable`);
  // The kubelet never updates a subPath mount: a renewed certificate would not reach Arbor.
  assert.equal(mount.subPath, undefined, `${file} is mounted with subPath`);
  const relative = path.relative(mount.mountPath, file);
  const item = (v.secret.items ?? []).find((i) => i.path === relative);
  assert.ok(item, `${file} is not one of Secret ${v.secret.secretName}'s items`);
  return { secretName: v.secret.secretName, key: item.key };
}

/** The Secret and its keys each TLS flag of a node plugin names. */
function tlsSecretOf(w: Workload): { secretName: string; keys: Record<string, string> } {
  const pod = w.spec.template.spec;
  const c = plugin(w);
  const files = { 'tls-cert': flag(c, 'tls-cert'), 'tls-key': flag(c, 'tls-key'), 'tls-ca': flag(c, 'tls-ca') };
  const found = Object.entries(files).map(([f, file]) => [f, secretFile(pod, c, file)] as const);
  const names = new Set(found.map(([, s]) => s.secretName));
  assert.equal(names.size, 1, `${w.metadata.name}: the TLS files come from several Secrets`);
  return { secretName: [...names][0], keys: Object.fromEntries(found.map(([f, s]) => [f, s.key])) };
}

interface Pem {
  cert: Buffer;
  key: Buffer;
  ca: Buffer;
}
function pemOf(secret: Secret): Pem {
  const decode = (k: string) => {
    assert.ok(secret.data[k], `Secret ${secret.metadata.name} has no ${k}`);
    return Buffer.from(secret.data[k], 'base64');
  };
  return { cert: decode('tls.crt'), key: decode('tls.key'), ca: decode('ca.crt') };
}

/**
 * One TLS connection on loopback between a server and a client that each present
 * what they are given and check the other against their CA, as Arbor's nodes do: by
 * the chain, not by host name. Whether the server took the connection and the client
 * read its greeting.
 */
async function handshake(server: Pem, client: Partial<Pem> & { ca: Buffer }): Promise<{ accepted: boolean; greeted: boolean; error?: string }> {
  let accepted = false;
  const listener = tls.createServer({ cert: server.cert, key: server.key, ca: server.ca, requestCert: true, rejectUnauthorized: true }, (socket) => {
    accepted = true;
    socket.end('hello');
  });
  listener.on('tlsClientError', () => {});
  await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', resolve));
  try {
    const { port: tcpPort } = listener.address() as AddressInfo;
    return await new Promise((resolve) => {
      let data = '';
      let error: string | undefined;
      const socket = tls.connect({ host: '127.0.0.1', port: tcpPort, cert: client.cert, key: client.key, ca: client.ca, checkServerIdentity: () => undefined });
      socket.on('data', (chunk: Buffer) => (data += chunk.toString()));
      socket.on('error', (err) => (error = err.message));
      socket.on('close', () => resolve({ accepted, greeted: data === 'hello', error }));
    });
  } finally {
    listener.close();
  }
}

describe('NBD between nodes: relays and mutual TLS', function () {
  this.timeout(120_000);

  describe('embedded mode', () => {
    it('serves NBD and the admin API over TCP on the data node, on named ports of the node, with the TLS files', () => {
      const data = nodePlugin(embedded());
      const c = plugin(data);
      assert.equal(data.spec.template.spec.hostNetwork, true);
      assert.equal(flag(c, 'nbd-listen'), '0.0.0.0:10809');
      assert.equal(port(c, 'nbd'), 10809);
      assert.equal(flag(c, 'admin-listen'), '0.0.0.0:10810');
      assert.equal(port(c, 'admin'), 10810);
      assert.equal(flag(c, 'data-dir'), '/var/lib/arbor/data');
      assert.deepEqual(tlsSecretOf(data), { secretName: generatedSecret, keys: { 'tls-cert': 'tls.crt', 'tls-key': 'tls.key', 'tls-ca': 'ca.crt' } });
      for (const f of ['relay-to', 'relay-admin', 'nbd-advertise']) assert.ok(!flags(c).has(f), `the data node has --${f}`);
    });

    it("runs a relaying plugin on every other node, pointed at a Service that leads to the data node's plugin and to no other", () => {
      const objects = embedded();
      const [data, relay] = [nodePlugin(objects), relayPlugin(objects)];
      const c = plugin(relay);
      const services = all(objects, 'Service') as Service[];
      const dataService = services.find((s) => selects(s.spec.selector, data.spec.template.metadata.labels));
      assert.ok(dataService, "no Service selects the data node's plugin");
      assert.ok(!selects(dataService.spec.selector, relay.spec.template.metadata.labels), 'the Service would also lead to the relaying plugins');
      assert.notEqual(dataService.spec.type, 'NodePort', 'NBD is for the cluster, not the outside');
      const host = `${dataService.metadata.name}.${namespace}.svc`;
      for (const [f, portName, listen] of [
        ['relay-to', 'nbd', 'nbd-listen'],
        ['relay-admin', 'admin', 'admin-listen'],
      ] as const) {
        const servicePort: Service['spec']['ports'][number] | undefined = dataService.spec.ports.find((p) => p.name === portName);
        assert.ok(servicePort, `the Service has no port ${portName}`);
        assert.equal(flag(c, f), `${host}:${servicePort.port}`);
        // The Service's port leads to the port the data node's plugin listens on.
        assert.equal(servicePort.targetPort, portName);
        assert.equal(port(plugin(data), portName), Number(flag(plugin(data), listen).split(':')[1]));
        assert.equal(servicePort.protocol, 'TCP');
      }
      assert.deepEqual(tlsSecretOf(relay), tlsSecretOf(data), 'one certificate and CA for every node');
      // A relay holds no data and serves no other node.
      for (const f of ['data-dir', 'nbd-listen', 'admin-listen', 'store', 'blobs', 'nbd-advertise'])
        assert.ok(!flags(c).has(f), `the relaying plugin has --${f}`);
      assert.ok(
        !(relay.spec.template.spec.volumes ?? []).some((v) => v.hostPath?.path === '/var/lib/arbor/data'),
        'the relaying plugin mounts the data directory',
      );
      assert.ok(!(c.ports ?? []).some((p) => p.name === 'nbd' || p.name === 'admin'), 'the relaying plugin listens for no other node');
      // What every node plugin needs stays.
      assert.equal(flag(c, 'node-id'), '$(NODE_NAME)');
      for (const f of ['csi-endpoint', 'nbd-socket', 'state-dir', 'max-volumes', 'dead-connection-timeout']) assert.equal(flag(c, f), flag(plugin(data), f), f);
      assert.equal(relay.spec.template.spec.hostNetwork, true, 'the kernel is configured over netlink from the host network namespace');
      assert.equal(relay.spec.template.spec.dnsPolicy, 'ClusterFirstWithHostNet', 'the Service name resolves from the host network');
    });

    it('gives the two node plugin DaemonSets selectors that do not take each other’s pods, and keeps the data node’s as it was', () => {
      const objects = embedded();
      const [data, relay] = [nodePlugin(objects), relayPlugin(objects)];
      assert.ok(!selects(data.spec.selector.matchLabels, relay.spec.template.metadata.labels));
      assert.ok(!selects(relay.spec.selector.matchLabels, data.spec.template.metadata.labels));
      // A DaemonSet's selector cannot change: an upgrade from a chart with one node DaemonSet keeps it.
      assert.deepEqual(data.spec.selector.matchLabels, {
        'app.kubernetes.io/name': 'arbor',
        'app.kubernetes.io/instance': 'arbor',
        'app.kubernetes.io/component': 'node',
      });
    });

    it('scrapes the relaying plugins too', () => {
      const objects = render({ valuesFiles: ['charts/arbor/ci/embedded-values.yaml'], set: { 'metrics.serviceMonitor.enabled': true } });
      const metricsServices = (all(objects, 'Service') as Service[]).filter((s) => s.metadata.labels?.['arbor.dev/metrics'] === 'true');
      for (const w of nodePlugins(objects)) {
        assert.ok(
          metricsServices.some((s) => selects(s.spec.selector, w.spec.template.metadata.labels)),
          `no metrics Service selects ${w.metadata.name}`,
        );
      }
    });
  });

  describe('distributed mode', () => {
    it("listens on every node and advertises the node's own address (status.hostIP) for the others to relay to", () => {
      const objects = distributed();
      assert.equal(nodePlugins(objects).length, 1, 'one node plugin DaemonSet, on every node');
      const ds = nodePlugin(objects);
      const c = plugin(ds);
      assert.equal(flag(c, 'nbd-listen'), '0.0.0.0:10809');
      assert.equal(flag(c, 'nbd-advertise'), '$(HOST_IP):10809');
      assert.equal(env(c, 'HOST_IP')?.valueFrom?.fieldRef?.fieldPath, 'status.hostIP');
      assert.equal(ds.spec.template.spec.hostNetwork, true, "the host's IP is the pod's: the advertised port is the plugin's");
      assert.equal(port(c, 'nbd'), 10809);
      assert.deepEqual(tlsSecretOf(ds), { secretName: generatedSecret, keys: { 'tls-cert': 'tls.crt', 'tls-key': 'tls.key', 'tls-ca': 'ca.crt' } });
      for (const f of ['relay-to', 'relay-admin', 'admin-listen', 'data-dir']) assert.ok(!flags(c).has(f), `--${f} in distributed mode`);
      assert.ok(
        (all(objects, 'Service') as Service[]).every(
          (s) => s.metadata.labels?.['arbor.dev/metrics'] === 'true' || s.metadata.name === 'arbor-snapshot-metadata',
        ),
        'no Service for NBD: peers reach each other at the advertised addresses',
      );
    });
  });

  it('moves every NBD flag, port and Service port with node.nbdPort and store.embedded.adminPort', () => {
    const set = { 'node.nbdPort': 20809, 'store.embedded.adminPort': 20810 };
    const emb = render({ valuesFiles: ['charts/arbor/ci/embedded-values.yaml'], set });
    assert.equal(flag(plugin(nodePlugin(emb)), 'nbd-listen'), '0.0.0.0:20809');
    assert.equal(flag(plugin(nodePlugin(emb)), 'admin-listen'), '0.0.0.0:20810');
    assert.equal(port(plugin(nodePlugin(emb)), 'nbd'), 20809);
    assert.equal(flag(plugin(relayPlugin(emb)), 'relay-to'), `arbor-data.${namespace}.svc:20809`);
    assert.equal(flag(plugin(relayPlugin(emb)), 'relay-admin'), `arbor-data.${namespace}.svc:20810`);
    assert.deepEqual(
      (one(emb, 'Service', 'arbor-data') as Service).spec.ports.map((p) => p.port),
      [20809, 20810],
    );
    const dist = render({ valuesFiles: ['charts/arbor/ci/distributed-values.yaml'], set: { 'node.nbdPort': 20809 } });
    assert.equal(flag(plugin(nodePlugin(dist)), 'nbd-listen'), '0.0.0.0:20809');
    assert.equal(flag(plugin(nodePlugin(dist)), 'nbd-advertise'), '$(HOST_IP):20809');
    assert.equal(port(plugin(nodePlugin(dist)), 'nbd'), 20809);
  });

  describe('the certificates', () => {
    it('mounts one Secret into every node plugin of both modes, read-only, as a whole directory, and names its three files', () => {
      for (const ds of [...nodePlugins(embedded()), ...nodePlugins(distributed())]) {
        const { secretName } = tlsSecretOf(ds);
        assert.equal(secretName, generatedSecret, ds.metadata.name);
        const v = volume(ds.spec.template.spec, 'nbd-tls');
        assert.deepEqual(v.secret?.items?.map((i) => i.key).sort(), ['ca.crt', 'tls.crt', 'tls.key']);
      }
    });

    it('generates a CA, and a certificate signed by it for both server and client auth, with its key', () => {
      const secret = one(embedded(), 'Secret', generatedSecret) as Secret;
      assert.equal(secret.type, 'kubernetes.io/tls', 'the type cert-manager makes: tls.crt, tls.key and ca.crt');
      assert.equal(secret.metadata.namespace, namespace);
      assert.deepEqual(Object.keys(secret.data).sort(), ['ca.crt', 'tls.crt', 'tls.key'], 'the CA key is not kept');
      const pem = pemOf(secret);
      const ca = new X509Certificate(pem.ca);
      const cert = new X509Certificate(pem.cert);
      assert.equal(ca.ca, true, 'ca.crt is a CA');
      assert.equal(cert.ca, false, 'tls.crt is no CA');
      assert.ok(cert.checkIssued(ca), `${cert.issuer} is not ${ca.subject}`);
      assert.ok(cert.verify(ca.publicKey), 'the CA did not sign the certificate');
      assert.ok(cert.keyUsage?.includes(serverAuth), `no server auth in ${cert.keyUsage}`);
      assert.ok(cert.keyUsage?.includes(clientAuth), `no client auth in ${cert.keyUsage}`);
      assert.ok(cert.checkPrivateKey(createPrivateKey(pem.key)), 'tls.key is not the certificate’s key');
      assert.equal(cert.subject, 'CN=arbor-node');
      assert.equal(cert.subjectAltName, 'DNS:arbor-node');
      const days = (c: X509Certificate) => (Date.parse(c.validTo) - Date.parse(c.validFrom)) / dayMs;
      assert.equal(Math.round(days(cert)), 3650);
      assert.equal(Math.round(days(ca)), 3650);
      assert.ok(Date.parse(cert.validFrom) <= Date.now() + 60_000, 'valid from now');
    });

    it('makes them valid for tls.generated.validityDays', () => {
      const secret = one(
        render({ valuesFiles: ['charts/arbor/ci/embedded-values.yaml'], set: { 'tls.generated.validityDays': 30 } }),
        'Secret',
        generatedSecret,
      );
      const pem = pemOf(secret as Secret);
      for (const c of [new X509Certificate(pem.cert), new X509Certificate(pem.ca)]) {
        assert.equal(Math.round((Date.parse(c.validTo) - Date.parse(c.validFrom)) / dayMs), 30, c.subject);
      }
    });

    it('lets two nodes that present the generated certificate connect with mutual TLS, whatever their host names, and no one else', async () => {
      const ours = pemOf(one(embedded(), 'Secret', generatedSecret) as Secret);
      // Another rendering makes another CA: a certificate from some other cluster.
      const theirs = pemOf(one(helmTemplate({ namespace, set: { 'store.embedded.nodeName': dataNode } }).objects, 'Secret', generatedSecret) as Secret);
      assert.notDeepEqual(theirs.ca, ours.ca);

      const peers = await handshake(ours, ours);
      assert.deepEqual(peers, { accepted: true, greeted: true, error: undefined });
      const noCertificate = await handshake(ours, { ca: ours.ca });
      assert.equal(noCertificate.accepted, false, 'a client without a certificate was accepted');
      assert.equal(noCertificate.greeted, false);
      const strangerClient = await handshake(ours, { ...theirs, ca: ours.ca });
      assert.equal(strangerClient.accepted, false, 'a client certificate from another CA was accepted');
      const strangerServer = await handshake(theirs, ours);
      assert.equal(strangerServer.greeted, false, 'the client trusted a server certificate from another CA');
      assert.match(strangerServer.error ?? '', /certificate/i);
    });

    it('uses tls.secretName instead, generating nothing', () => {
      const objects = render({ valuesFiles: ['charts/arbor/ci/embedded-values.yaml'], set: { 'tls.secretName': 'arbor-nbd-cert-manager' } });
      assert.equal(all(objects, 'Secret').length, 0);
      for (const ds of nodePlugins(objects)) assert.equal(tlsSecretOf(ds).secretName, 'arbor-nbd-cert-manager', ds.metadata.name);
    });

    it('renders a new CA and certificate each time there is no cluster to look the Secret up in (helm template)', () => {
      const secretOf = () => one(helmTemplate({ namespace, set: { 'store.embedded.nodeName': dataNode } }).objects, 'Secret', generatedSecret) as Secret;
      assert.notEqual(secretOf().data['ca.crt'], secretOf().data['ca.crt']);
    });
  });

  describe('on an upgrade (helm looks the cluster up; here a minimal API server)', () => {
    const values = { set: { 'store.embedded.nodeName': dataNode } };

    it('keeps the certificate Secret of the release as it is', async () => {
      const existing = one(render(values), 'Secret', generatedSecret) as Secret;
      const upgrade = await helmTemplateInCluster([existing], { namespace, ...values });
      assert.equal(upgrade.status, 0, upgrade.stderr);
      assert.ok(upgrade.requests.includes(`GET /api/v1/namespaces/${namespace}/secrets/${generatedSecret}`), 'helm never looked the Secret up');
      assert.deepEqual((one(upgrade.objects, 'Secret', generatedSecret) as Secret).data, existing.data);
    });

    it('generates the CA and certificate again when the Secret is missing one of its files', async () => {
      const existing = one(render(values), 'Secret', generatedSecret) as Secret;
      const damaged = { ...existing, data: { 'tls.crt': existing.data['tls.crt'], 'tls.key': existing.data['tls.key'] } };
      const upgrade = await helmTemplateInCluster([damaged], { namespace, ...values });
      assert.equal(upgrade.status, 0, upgrade.stderr);
      const renewed = pemOf(one(upgrade.objects, 'Secret', generatedSecret) as Secret);
      assert.notEqual(renewed.cert.toString('base64'), existing.data['tls.crt']);
      assert.ok(new X509Certificate(renewed.cert).checkIssued(new X509Certificate(renewed.ca)));
    });

    it('keeps the binding mode of a StorageClass that exists (the field cannot change), and binds new classes at once', async () => {
      const existing: K8sObject = {
        apiVersion: 'storage.k8s.io/v1',
        kind: 'StorageClass',
        metadata: { name: 'arbor-block' },
        provisioner: 'csi.arbor.dev',
        volumeBindingMode: 'WaitForFirstConsumer',
      };
      const upgrade = await helmTemplateInCluster([existing], { namespace, ...values });
      assert.equal(upgrade.status, 0, upgrade.stderr);
      assert.deepEqual(
        all(upgrade.objects, 'StorageClass').map((sc) => [sc.metadata.name, sc.volumeBindingMode]),
        [
          ['arbor-block', 'WaitForFirstConsumer'],
          ['arbor-fs', 'Immediate'],
        ],
      );
    });
  });
});
