/**
 * Just enough of a Kubernetes API server for `helm template --dry-run=server`, so the
 * chart's `lookup` calls (what an upgrade finds in the cluster) can be tested without
 * a cluster: discovery of the kinds the chart renders, GET of the objects a test puts
 * there (labelled as the release's own, as helm requires before it "adopts" them), 404
 * for everything else. Nothing is ever written: helm only reads when it dry-runs.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { chartDir, helmBinary, K8sObject, parseDocuments, RenderOptions, valuesArgs } from '../support/helm';

/** apiVersion → [resource, kind, namespaced] of every kind the chart can render. */
const resources: Record<string, [string, string, boolean][]> = {
  v1: [
    ['secrets', 'Secret', true],
    ['services', 'Service', true],
    ['serviceaccounts', 'ServiceAccount', true],
    ['namespaces', 'Namespace', false],
  ],
  'apps/v1': [
    ['daemonsets', 'DaemonSet', true],
    ['deployments', 'Deployment', true],
  ],
  'storage.k8s.io/v1': [
    ['storageclasses', 'StorageClass', false],
    ['csidrivers', 'CSIDriver', false],
  ],
  'rbac.authorization.k8s.io/v1': [
    ['clusterroles', 'ClusterRole', false],
    ['clusterrolebindings', 'ClusterRoleBinding', false],
    ['roles', 'Role', true],
    ['rolebindings', 'RoleBinding', true],
  ],
  'snapshot.storage.k8s.io/v1': [['volumesnapshotclasses', 'VolumeSnapshotClass', false]],
  'groupsnapshot.storage.k8s.io/v1': [['volumegroupsnapshotclasses', 'VolumeGroupSnapshotClass', false]],
  'cdi.kubevirt.io/v1beta1': [['storageprofiles', 'StorageProfile', false]],
  'monitoring.coreos.com/v1': [['servicemonitors', 'ServiceMonitor', true]],
  'cbt.storage.k8s.io/v1beta1': [['snapshotmetadataservices', 'SnapshotMetadataService', false]],
};

/** The URL path of an object: /api/v1/namespaces/NS/secrets/NAME, /apis/GROUP/VERSION/storageclasses/NAME. */
function objectPath(o: K8sObject): string {
  const resource = (resources[o.apiVersion] ?? []).find(([, kind]) => kind === o.kind);
  assert.ok(resource, `the fake API server has no ${o.apiVersion} ${o.kind}`);
  const [plural, , namespaced] = resource;
  const base = o.apiVersion === 'v1' ? '/api/v1' : `/apis/${o.apiVersion}`;
  return `${base}${namespaced ? `/namespaces/${o.metadata.namespace}` : ''}/${plural}/${o.metadata.name}`;
}

function discovery(url: string): unknown {
  if (url === '/version') return { major: '1', minor: '34', gitVersion: 'v1.34.0', platform: 'linux/amd64' };
  if (url === '/api') return { kind: 'APIVersions', versions: ['v1'], serverAddressByClientCIDRs: [] };
  if (url === '/apis') {
    const groups = Object.keys(resources)
      .filter((gv) => gv.includes('/'))
      .map((gv) => {
        const [name, version] = gv.split('/');
        return { name, versions: [{ groupVersion: gv, version }], preferredVersion: { groupVersion: gv, version } };
      });
    return { kind: 'APIGroupList', apiVersion: 'v1', groups };
  }
  const groupVersion = url === '/api/v1' ? 'v1' : /^\/apis\/([^/]+\/[^/]+)$/.exec(url)?.[1];
  const list = groupVersion ? resources[groupVersion] : undefined;
  if (!groupVersion || !list) return undefined;
  return {
    kind: 'APIResourceList',
    groupVersion,
    resources: list.map(([name, kind, namespaced]) => ({ name, singularName: kind.toLowerCase(), namespaced, kind, verbs: ['get', 'list'] })),
  };
}

export interface ClusterRender {
  status: number | null;
  stdout: string;
  stderr: string;
  objects: K8sObject[];
  /** Every path helm asked for. */
  requests: string[];
}

/**
 * `helm template --dry-run=server` of the chart (release "arbor") against a cluster
 * that holds `existing`: what an upgrade would render.
 */
export async function helmTemplateInCluster(existing: K8sObject[], options: RenderOptions & { namespace: string }): Promise<ClusterRender> {
  const byPath = new Map<string, K8sObject>();
  for (const o of existing) {
    // Helm renders over objects of its own release only.
    const owned: K8sObject = {
      ...o,
      metadata: {
        ...o.metadata,
        labels: { ...o.metadata.labels, 'app.kubernetes.io/managed-by': 'Helm' },
        annotations: { ...o.metadata.annotations, 'meta.helm.sh/release-name': 'arbor', 'meta.helm.sh/release-namespace': options.namespace },
      },
    };
    byPath.set(objectPath(owned), owned);
  }
  const requests: string[] = [];
  const server = http.createServer((req, res) => {
    const url = (req.url ?? '').split('?')[0];
    requests.push(`${req.method} ${url}`);
    const send = (code: number, body: unknown) => {
      res.writeHead(code, { 'content-type': 'application/json' });
      res.end(JSON.stringify(body));
    };
    if (req.method !== 'GET') return send(405, { kind: 'Status', apiVersion: 'v1', status: 'Failure', code: 405, message: 'this fake API only reads' });
    const found = discovery(url) ?? byPath.get(url);
    if (found) return send(200, found);
    send(404, { kind: 'Status', apiVersion: 'v1', status: 'Failure', reason: 'NotFound', code: 404, message: `${url} not found` });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const home = fs.mkdtempSync(path.join(os.tmpdir(), 'arbor-helm-cluster-'));
  try {
    const { port } = server.address() as AddressInfo;
    const kubeconfig = path.join(home, 'kubeconfig');
    fs.writeFileSync(
      kubeconfig,
      JSON.stringify({
        apiVersion: 'v1',
        kind: 'Config',
        clusters: [{ name: 'fake', cluster: { server: `http://127.0.0.1:${port}` } }],
        users: [{ name: 'fake', user: {} }],
        contexts: [{ name: 'fake', context: { cluster: 'fake', user: 'fake', namespace: options.namespace } }],
        'current-context': 'fake',
      }),
    );
    const args = [
      'template',
      'arbor',
      chartDir,
      '--namespace',
      options.namespace,
      '--dry-run=server',
      // The fake server publishes no OpenAPI schema; the model tests check every field instead.
      '--disable-openapi-validation',
      ...valuesArgs(options),
    ];
    const env: NodeJS.ProcessEnv = {
      PATH: process.env.PATH,
      HOME: home,
      HELM_CACHE_HOME: path.join(home, 'cache'),
      HELM_CONFIG_HOME: path.join(home, 'config'),
      HELM_DATA_HOME: path.join(home, 'data'),
      KUBECONFIG: kubeconfig,
    };
    // Not spawnSync: the fake server answers from this process's event loop.
    const child = spawn(helmBinary(), args, { env, stdio: ['ignore', 'pipe', 'pipe'], timeout: 60_000 });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const status = await new Promise<number | null>((resolve, reject) => {
      child.on('error', reject);
      child.on('close', resolve);
    });
    return { status, stdout, stderr, requests, objects: status === 0 ? (parseDocuments(stdout) as K8sObject[]) : [] };
  } finally {
    server.closeAllConnections();
    server.close();
    fs.rmSync(home, { recursive: true, force: true });
  }
}
