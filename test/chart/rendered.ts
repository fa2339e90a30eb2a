/**
 * The chart rendered in each mode the tests look at (each rendering once per run),
 * and small accessors for what the tests look for in it.
 */
import assert from 'node:assert/strict';
import { helmTemplate, K8sObject, RenderOptions } from '../support/helm';

export const namespace = 'arbor-system';
export const dataNode = 'worker-1';

/** The values files CI lints and renders; each is a mode or a set of options. */
export const ciValues = {
  embedded: 'charts/arbor/ci/embedded-values.yaml',
  distributed: 'charts/arbor/ci/distributed-values.yaml',
  kubevirt: 'charts/arbor/ci/kubevirt-values.yaml',
} as const;

const cache = new Map<string, K8sObject[]>();

/** The objects `helm template` renders with these options; fails the test when it does not render. */
export function render(options: RenderOptions): K8sObject[] {
  const key = JSON.stringify(options);
  const cached = cache.get(key);
  if (cached) return cached;
  const result = helmTemplate({ namespace, ...options });
  assert.equal(result.status, 0, `helm template ${JSON.stringify(options)} failed:\n${result.stderr}`);
  cache.set(key, result.objects);
  return result.objects;
}

export const embedded = () => render({ valuesFiles: [ciValues.embedded] });
export const distributed = () => render({ valuesFiles: [ciValues.distributed] });
export const kubevirt = () => render({ valuesFiles: [ciValues.kubevirt] });
/** values.yaml as shipped, with only the one value it cannot guess. */
export const defaults = () => render({ set: { 'store.embedded.nodeName': dataNode } });

export function all(objects: K8sObject[], kind: string): K8sObject[] {
  return objects.filter((o) => o.kind === kind);
}

export function one(objects: K8sObject[], kind: string, name?: string): K8sObject {
  const found = objects.filter((o) => o.kind === kind && (name === undefined || o.metadata.name === name));
  assert.equal(found.length, 1, `expected one ${kind}${name ? ` named ${name}` : ''}, found ${found.map((o) => o.metadata.name).join(', ') || 'none'}`);
  return found[0];
}

// The parts of a workload the tests read, typed loosely: the model tests have
// already checked every field against @kubernetes/client-node's types.
export interface VolumeMount {
  name: string;
  mountPath: string;
  readOnly?: boolean;
  mountPropagation?: string;
  subPath?: string;
}
export interface EnvVar {
  name: string;
  value?: string;
  valueFrom?: { secretKeyRef?: { name: string; key: string }; fieldRef?: { fieldPath: string } };
}
export interface Container {
  name: string;
  image: string;
  command?: string[];
  args?: string[];
  env?: EnvVar[];
  ports?: { name: string; containerPort: number; protocol?: string }[];
  volumeMounts?: VolumeMount[];
  livenessProbe?: { httpGet?: { path: string; port: string | number } };
  securityContext?: {
    privileged?: boolean;
    runAsUser?: number;
    allowPrivilegeEscalation?: boolean;
    readOnlyRootFilesystem?: boolean;
    capabilities?: { drop?: string[] };
  };
  resources?: { requests?: Record<string, string>; limits?: Record<string, string> };
}
export interface Volume {
  name: string;
  hostPath?: { path: string; type?: string };
  emptyDir?: Record<string, unknown>;
  secret?: { secretName: string; items?: { key: string; path: string }[] };
}
export interface PodSpec {
  containers: Container[];
  initContainers?: Container[];
  volumes?: Volume[];
  hostNetwork?: boolean;
  dnsPolicy?: string;
  serviceAccountName?: string;
  automountServiceAccountToken?: boolean;
  priorityClassName?: string;
  nodeSelector?: Record<string, string>;
  affinity?: {
    nodeAffinity?: {
      requiredDuringSchedulingIgnoredDuringExecution?: { nodeSelectorTerms: { matchFields?: { key: string; operator: string; values: string[] }[] }[] };
    };
  };
  securityContext?: { runAsUser?: number; runAsNonRoot?: boolean; fsGroup?: number };
}
export interface Workload extends K8sObject {
  spec: {
    replicas?: number;
    strategy?: { type: string };
    selector: { matchLabels: Record<string, string> };
    template: { metadata: { labels: Record<string, string>; annotations?: Record<string, string> }; spec: PodSpec };
  };
}

export const controller = (objects: K8sObject[]) => one(objects, 'Deployment') as Workload;
/** The node plugin that holds the store (embedded: on the data node) or, distributed, the one on every node. */
export const nodePlugin = (objects: K8sObject[]) => one(objects, 'DaemonSet', 'arbor-node') as Workload;
/** Embedded mode: the node plugin on every node but the data node, relaying every volume to it. */
export const relayPlugin = (objects: K8sObject[]) => one(objects, 'DaemonSet', 'arbor-node-relay') as Workload;
/** Every node plugin DaemonSet. */
export const nodePlugins = (objects: K8sObject[]) => all(objects, 'DaemonSet') as Workload[];

export function container(pod: PodSpec, name: string): Container {
  const found = pod.containers.find((c) => c.name === name);
  assert.ok(found, `no container ${name} (containers: ${pod.containers.map((c) => c.name).join(', ')})`);
  return found;
}

/** `--name=value` flags of a container, by name; a flag given twice is an error. */
export function flags(c: Container): Map<string, string> {
  const result = new Map<string, string>();
  for (const arg of c.args ?? []) {
    const match = /^--([^=]+)(?:=(.*))?$/s.exec(arg);
    if (!match) continue;
    assert.ok(!result.has(match[1]), `${c.name} has --${match[1]} twice`);
    result.set(match[1], match[2] ?? '');
  }
  return result;
}

export function flag(c: Container, name: string): string {
  const value = flags(c).get(name);
  assert.ok(value !== undefined, `${c.name} has no --${name} (args: ${(c.args ?? []).join(' ')})`);
  return value;
}

export function mountAt(c: Container, mountPath: string): VolumeMount {
  const found = (c.volumeMounts ?? []).find((m) => m.mountPath === mountPath);
  assert.ok(found, `${c.name} mounts nothing at ${mountPath} (mounts: ${(c.volumeMounts ?? []).map((m) => m.mountPath).join(', ')})`);
  return found;
}

export function volume(pod: PodSpec, name: string): Volume {
  const found = (pod.volumes ?? []).find((v) => v.name === name);
  assert.ok(found, `no volume ${name}`);
  return found;
}

/** The mount (and its volume) of a container whose mount path holds `file`. */
export function mountHolding(pod: PodSpec, c: Container, file: string): { mount: VolumeMount; volume: Volume } {
  const mounts = (c.volumeMounts ?? []).filter((m) => file === m.mountPath || file.startsWith(`${m.mountPath.replace(/\/$/, '')}/`));
  assert.ok(mounts.length > 0, `${c.name} mounts nothing that holds ${file}`);
  const mount = mounts.sort((a, b) => b.mountPath.length - a.mountPath.length)[0];
  return { mount, volume: volume(pod, mount.name) };
}

export function env(c: Container, name: string): EnvVar | undefined {
  return (c.env ?? []).find((e) => e.name === name);
}

export function port(c: Container, name: string): number {
  const found = (c.ports ?? []).find((p) => p.name === name);
  assert.ok(found, `${c.name} has no port named ${name}`);
  return found.containerPort;
}
