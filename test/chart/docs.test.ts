import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { helm, K8sObject, parseDocuments, repoRoot, valuesArgs, yaml } from '../support/helm';
import { parseQosParameters } from '../../store/qos';
import { objectProblems } from './models';
import { all, defaults, namespace, one, render } from './rendered';

const examplesDir = path.join(repoRoot, 'docs/examples');
const guides = ['docs/install.md', 'docs/kubevirt.md'];

function walk(dir: string): string[] {
  return fs
    .readdirSync(dir, { withFileTypes: true })
    .flatMap((entry) => (entry.isDirectory() ? walk(path.join(dir, entry.name)) : [path.join(dir, entry.name)]));
}

const exampleFiles = () =>
  walk(examplesDir)
    .filter((f) => f.endsWith('.yaml'))
    .map((f) => path.relative(repoRoot, f))
    .sort();
const isValuesFile = (file: string) => path.basename(file).startsWith('values-');
const read = (file: string) => fs.readFileSync(path.join(repoRoot, file), 'utf8');

/** Values files that set no store mode are layered on the embedded example, as the docs say. */
function valuesStack(file: string): string[] {
  const values = yaml().load(read(file)) as Record<string, unknown>;
  return 'store' in values ? [file] : ['docs/examples/values-embedded.yaml', file];
}

/** Every manifest in docs/examples (not the Helm values files). */
function exampleObjects(): K8sObject[] {
  return exampleFiles()
    .filter((f) => !isValuesFile(f))
    .flatMap((f) => parseDocuments(read(f)) as K8sObject[]);
}

/** The fenced blocks of one language in a Markdown file. */
function fencedBlocks(file: string, language: string): string[] {
  const blocks: string[] = [];
  const pattern = new RegExp('^```' + language + '\\n([\\s\\S]*?)^```', 'gm');
  for (const match of read(file).matchAll(pattern)) blocks.push(match[1]);
  return blocks;
}

type Spec = Record<string, unknown>;
const spec = (o: K8sObject) => o.spec as Spec;

/** Every claim spec (PVC specs, DataVolume storage and pvc specs, wherever they are nested) that names access modes. */
function claimSpecs(value: unknown, found: Spec[] = []): Spec[] {
  if (Array.isArray(value)) for (const item of value) claimSpecs(item, found);
  else if (typeof value === 'object' && value !== null) {
    if (Array.isArray((value as Spec).accessModes)) found.push(value as Spec);
    for (const item of Object.values(value)) claimSpecs(item, found);
  }
  return found;
}

/** Access modes Arbor refuses in a claim spec: ReadWriteMany is for Block volumes only. */
function accessModeProblems(claim: Spec): string[] {
  const modes = claim.accessModes as string[];
  const problems = modes.filter((m) => !['ReadWriteOnce', 'ReadWriteOncePod', 'ReadOnlyMany', 'ReadWriteMany'].includes(m)).map((m) => `unknown mode ${m}`);
  if (modes.includes('ReadWriteMany') && claim.volumeMode !== 'Block')
    problems.push(`ReadWriteMany with volumeMode ${String(claim.volumeMode ?? 'Filesystem')}`);
  return problems;
}

type VirtualMachineSpec = {
  dataVolumeTemplates: { metadata: { name: string }; spec: { sourceRef: { name: string }; storage?: Spec; pvc?: Spec } }[];
  template: {
    spec: { evictionStrategy?: string; domain: { devices: { disks: { name: string }[] } }; volumes: { name: string; dataVolume?: { name: string } }[] };
  };
};

/**
 * Why a VM that asks to move on eviction could not: KubeVirt live-migrates only VMs
 * whose disks are ReadWriteMany, and Arbor serves ReadWriteMany as Block only.
 */
function liveMigrationProblems(vm: K8sObject): string[] {
  const vmSpec = spec(vm) as VirtualMachineSpec;
  if (!['LiveMigrate', 'LiveMigrateIfPossible'].includes(vmSpec.template.spec.evictionStrategy ?? '')) return [];
  return vmSpec.dataVolumeTemplates.flatMap((t) => {
    const claim = t.spec.storage ?? t.spec.pvc ?? {};
    const modes = (claim.accessModes as string[] | undefined) ?? [];
    return modes.includes('ReadWriteMany') && claim.volumeMode === 'Block'
      ? []
      : [`${vm.metadata.name} asks for ${vmSpec.template.spec.evictionStrategy}, but disk ${t.metadata.name} is not ReadWriteMany Block`];
  });
}

describe('the docs and their examples', function () {
  this.timeout(120_000);

  it('has the example manifests the issue asks for', () => {
    const kinds = new Set(exampleObjects().map((o) => o.kind));
    for (const kind of [
      'PersistentVolumeClaim',
      'VolumeSnapshot',
      'DataVolume',
      'DataImportCron',
      'VirtualMachine',
      'VirtualMachineSnapshot',
      'VirtualMachineRestore',
    ]) {
      assert.ok(kinds.has(kind), `no ${kind} example`);
    }
    const pvcs = exampleObjects().filter((o) => o.kind === 'PersistentVolumeClaim');
    assert.ok(
      pvcs.some((p) => spec(p).volumeMode === 'Block'),
      'a Block PVC',
    );
    assert.ok(
      pvcs.some((p) => spec(p).volumeMode === undefined),
      'a Filesystem PVC',
    );
    assert.ok(
      pvcs.some((p) => (spec(p).dataSource as Spec | undefined)?.kind === 'VolumeSnapshot'),
      'a restore',
    );
    assert.ok(
      pvcs.some((p) => (spec(p).dataSource as Spec | undefined)?.kind === 'PersistentVolumeClaim'),
      'a clone',
    );
  });

  for (const file of exampleFiles()) {
    if (isValuesFile(file)) {
      it(`${file}: the chart renders with it`, () => {
        const objects = render({ valuesFiles: valuesStack(file) });
        assert.deepEqual(
          objects.flatMap((o) => objectProblems(o)),
          [],
        );
      });
    } else {
      it(`${file}: every object is valid for the API types`, () => {
        const objects = parseDocuments(read(file));
        assert.ok(objects.length > 0);
        assert.deepEqual(
          objects.flatMap((o) => objectProblems(o)),
          [],
        );
      });
    }
  }

  describe('the examples fit the chart and each other', () => {
    it('name only the classes the chart creates', () => {
      const chart = defaults();
      const storageClasses = new Set(all(chart, 'StorageClass').map((s) => s.metadata.name));
      const snapshotClasses = new Set(all(chart, 'VolumeSnapshotClass').map((s) => s.metadata.name));
      const groupClasses = new Set(
        all(render({ set: { 'store.embedded.nodeName': 'n', 'groupSnapshots.enabled': true } }), 'VolumeGroupSnapshotClass').map((s) => s.metadata.name),
      );
      const text = JSON.stringify(exampleObjects());
      for (const [, name] of text.matchAll(/"storageClassName":"([^"]+)"/g)) assert.ok(storageClasses.has(name), `storageClassName ${name}`);
      for (const [, name] of text.matchAll(/"volumeSnapshotClassName":"([^"]+)"/g)) assert.ok(snapshotClasses.has(name), `volumeSnapshotClassName ${name}`);
      for (const [, name] of text.matchAll(/"volumeGroupSnapshotClassName":"([^"]+)"/g))
        assert.ok(groupClasses.has(name), `volumeGroupSnapshotClassName ${name}`);
    });

    // ReadWriteMany was refused everywhere before Block volumes could live-migrate.
    it('ask only for access modes Arbor serves (ReadWriteMany for Block only), and use Block volumes as devices', () => {
      const objects = exampleObjects();
      const claims = claimSpecs(objects);
      assert.ok(claims.length > 0);
      for (const claim of claims) assert.deepEqual(accessModeProblems(claim), [], JSON.stringify(claim));
      const blockClaims = new Set(objects.filter((o) => o.kind === 'PersistentVolumeClaim' && spec(o).volumeMode === 'Block').map((o) => o.metadata.name));
      for (const pod of objects.filter((o) => o.kind === 'Pod')) {
        const podSpec = spec(pod) as {
          volumes: { name: string; persistentVolumeClaim: { claimName: string } }[];
          containers: { volumeDevices?: { name: string }[]; volumeMounts?: { name: string }[] }[];
        };
        for (const v of podSpec.volumes) {
          const asDevice = podSpec.containers.some((c) => (c.volumeDevices ?? []).some((d) => d.name === v.name));
          const asMount = podSpec.containers.some((c) => (c.volumeMounts ?? []).some((m) => m.name === v.name));
          if (blockClaims.has(v.persistentVolumeClaim.claimName))
            assert.ok(asDevice && !asMount, `${pod.metadata.name}: Block volume ${v.name} must be a volumeDevice`);
          else assert.ok(asMount && !asDevice, `${pod.metadata.name}: filesystem volume ${v.name} must be mounted`);
        }
      }
    });

    it("give VolumeAttributesClasses of the chart's driver with parameters Arbor takes, and name only those classes in claims", () => {
      const objects = exampleObjects();
      const driver = one(defaults(), 'CSIDriver').metadata.name;
      const classes = objects.filter((o) => o.kind === 'VolumeAttributesClass');
      assert.ok(classes.length > 0, 'a VolumeAttributesClass example');
      for (const vac of classes) {
        const object = vac as unknown as { apiVersion: string; driverName: string; parameters: Record<string, string> };
        assert.equal(object.apiVersion, 'storage.k8s.io/v1', `${vac.metadata.name}: the GA API`);
        assert.equal(object.driverName, driver, `${vac.metadata.name} names the chart's driver`);
        assert.ok(Object.keys(parseQosParameters(object.parameters)).length > 0, `${vac.metadata.name} sets limits Arbor parses`);
      }
      const names = new Set(classes.map((c) => c.metadata.name));
      const claimed = claimSpecs(objects).flatMap((c) => (c.volumeAttributesClassName ? [c.volumeAttributesClassName as string] : []));
      assert.ok(claimed.length > 0, 'a claim that uses a class');
      for (const name of claimed) assert.ok(names.has(name), `volumeAttributesClassName ${name} is an example class`);
    });

    it('restore, clone and snapshot what the other examples create', () => {
      const objects = exampleObjects();
      const names = (kind: string) => new Set(objects.filter((o) => o.kind === kind).map((o) => o.metadata.name));
      for (const pvc of objects.filter((o) => o.kind === 'PersistentVolumeClaim')) {
        const source = spec(pvc).dataSource as { kind: string; name: string } | undefined;
        if (source) assert.ok(names(source.kind).has(source.name), `${pvc.metadata.name} comes from ${source.kind} ${source.name}, which no example creates`);
      }
      for (const snap of objects.filter((o) => o.kind === 'VolumeSnapshot')) {
        const claim = (spec(snap).source as Spec).persistentVolumeClaimName as string;
        assert.ok(names('PersistentVolumeClaim').has(claim), `${snap.metadata.name} snapshots ${claim}`);
      }
    });

    it('give the VMs disks cloned from the golden image, and snapshot and restore a VM that exists', () => {
      const objects = exampleObjects();
      const kubevirtObjects = objects.filter((o) => /kubevirt\.io/.test(o.apiVersion));
      for (const o of kubevirtObjects) assert.equal(o.metadata.namespace, 'vms', `${o.kind}/${o.metadata.name}`);
      const dataSources = new Set([
        ...objects.filter((o) => o.kind === 'DataSource').map((o) => o.metadata.name),
        ...objects.filter((o) => o.kind === 'DataImportCron').map((o) => spec(o).managedDataSource as string),
      ]);
      const goldenPvcs = new Set(objects.filter((o) => o.kind === 'DataVolume').map((o) => o.metadata.name));
      for (const ds of objects.filter((o) => o.kind === 'DataSource')) {
        assert.ok(goldenPvcs.has(((spec(ds).source as Spec).pvc as Spec).name as string), `DataSource ${ds.metadata.name} names a volume no example imports`);
      }
      const vms = objects.filter((o) => o.kind === 'VirtualMachine');
      assert.ok(vms.length > 0);
      for (const vm of vms) {
        const vmSpec = spec(vm) as {
          dataVolumeTemplates: { metadata: { name: string }; spec: { sourceRef: { name: string } } }[];
          template: { spec: { domain: { devices: { disks: { name: string }[] } }; volumes: { name: string; dataVolume?: { name: string } }[] } };
        };
        const templates = vmSpec.dataVolumeTemplates;
        assert.ok(templates.length > 0, 'the root disk is a dataVolumeTemplate');
        for (const t of templates)
          assert.ok(dataSources.has(t.spec.sourceRef.name), `${t.metadata.name} clones DataSource ${t.spec.sourceRef.name}, which no example creates`);
        const volumes = vmSpec.template.spec.volumes;
        assert.deepEqual(vmSpec.template.spec.domain.devices.disks.map((d) => d.name).sort(), volumes.map((v) => v.name).sort(), 'every disk has a volume');
        for (const v of volumes)
          if (v.dataVolume)
            assert.ok(
              templates.some((t) => t.metadata.name === v.dataVolume!.name),
              `volume ${v.name} uses DataVolume ${v.dataVolume.name}`,
            );
        // Before live migration, no VM could ask for LiveMigrate at all.
        assert.deepEqual(liveMigrationProblems(vm), []);
      }
      const vmNames = new Set(vms.map((v) => v.metadata.name));
      const snapshots = objects.filter((o) => o.kind === 'VirtualMachineSnapshot');
      for (const s of snapshots) assert.ok(vmNames.has((spec(s).source as Spec).name as string), s.metadata.name);
      for (const r of objects.filter((o) => o.kind === 'VirtualMachineRestore')) {
        assert.ok(vmNames.has((spec(r).target as Spec).name as string), r.metadata.name);
        assert.ok(
          snapshots.some((s) => s.metadata.name === spec(r).virtualMachineSnapshotName),
          `${r.metadata.name} restores a snapshot no example takes`,
        );
      }
    });
  });

  describe('the guides', () => {
    for (const guide of guides) {
      it(`${guide}: every YAML block is valid, and a block headed by an example's path holds that file`, () => {
        const blocks = fencedBlocks(guide, 'yaml');
        assert.ok(blocks.length > 0);
        for (const block of blocks) {
          const named = /^# (docs\/examples\/\S+\.yaml)\n/.exec(block);
          if (named) {
            assert.equal(block.slice(named[0].length), read(named[1]), `the block in ${guide} after its first line differs from ${named[1]}`);
            continue;
          }
          const docs = parseDocuments(block);
          if (docs.every((d) => typeof d === 'object' && d !== null && 'kind' in d)) {
            assert.deepEqual(
              docs.flatMap((d) => objectProblems(d)),
              [],
              block,
            );
          } else {
            // Helm values: the chart must render with them.
            const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'arbor-values-')), 'values.yaml');
            fs.writeFileSync(file, block);
            const result = helm(['template', 'arbor', path.join(repoRoot, 'charts/arbor'), '--namespace', namespace, ...valuesArgs({ valuesFiles: [file] })]);
            fs.rmSync(path.dirname(file), { recursive: true, force: true });
            assert.equal(result.status, 0, `${guide} values block does not render:\n${result.stderr}\n${block}`);
          }
        }
      });

      it(`${guide}: every file and chart path its commands name exists`, () => {
        const text = read(guide);
        const paths = [...text.matchAll(/(?:^|[\s(`=])((?:docs\/examples|charts\/arbor)[\w./-]*)/gm)].map((m) => m[1].replace(/[.)]+$/, ''));
        const links = [...text.matchAll(/\]\(([^)#]+)\)/g)].map((m) => path.join(path.dirname(guide), m[1]));
        assert.ok(paths.length > 0);
        for (const p of [...paths, ...links]) assert.ok(fs.existsSync(path.join(repoRoot, p)), `${guide} names ${p}, which does not exist`);
      });
    }

    it('install.md covers the prerequisites, both modes, expansion, upgrade and uninstall', () => {
      const text = read('docs/install.md');
      for (const needle of [
        /external-snapshotter/,
        /snapshot-controller/,
        /store\.embedded\.nodeName/,
        /mode: distributed/,
        /FAILED_PRECONDITION/,
        /restart the pod/i,
        /## \d+\. Upgrade/,
        /## \d+\. Uninstall/,
        /helm uninstall/,
      ]) {
        assert.match(text, needle);
      }
    });

    it('install.md covers the TLS between nodes, the embedded trade-off and the NBD port', () => {
      const text = read('docs/install.md');
      for (const needle of [
        /## 4c\. TLS between nodes/,
        /tls\.secretName/,
        /tls\.generated\.validityDays/,
        /cert-manager/,
        /server auth/,
        /client auth/,
        /no restart/i,
        /expires/,
        /trade-off/i,
        /distributed mode/,
        /node\.nbdPort/,
        /firewall/,
        /ReadWriteMany/,
        /INVALID_ARGUMENT/,
      ]) {
        assert.match(text, needle);
      }
      const certificates = fencedBlocks('docs/install.md', 'yaml')
        .flatMap((block) => parseDocuments(block) as K8sObject[])
        .filter((o) => o.kind === 'Certificate' && !spec(o).isCA && (spec(o).dnsNames as string[] | undefined)?.includes('arbor-node'));
      assert.ok(certificates.length > 0, 'no cert-manager Certificate for the nodes');
      for (const c of certificates) {
        const usages = spec(c).usages as string[];
        assert.ok(usages.includes('server auth') && usages.includes('client auth'), `Certificate ${c.metadata.name} is not for both server and client auth`);
      }
    });

    it('install.md covers changed-block tracking: the CRD, a certificate for the Service the chart makes, the values, the backup tools’ RBAC', () => {
      const text = read('docs/install.md');
      for (const needle of [
        /## 8b\. Changed-block tracking/,
        /cbt\.storage\.k8s\.io_snapshotmetadataservices\.yaml/,
        /snapshotMetadata\.enabled=true/,
        /snapshotMetadata\.tls\.secretName/,
        /snapshotMetadata\.tls\.caCert/,
        /client-cluster-role\.yaml/,
        /VARIABLE_LENGTH/,
        /INVALID_ARGUMENT/,
        /OUT_OF_RANGE/,
      ]) {
        assert.match(text, needle);
      }
      const certificate = fencedBlocks('docs/install.md', 'yaml')
        .flatMap((block) => parseDocuments(block) as K8sObject[])
        .find((o) => o.kind === 'Certificate' && spec(o).secretName === 'arbor-snapshot-metadata-tls');
      assert.ok(certificate, 'no Certificate for the snapshot metadata sidecar');
      // The address the chart announces (release arbor in arbor-system, as the guide installs it) is a name the certificate holds.
      const announced = one(
        render({
          set: {
            'store.embedded.nodeName': 'worker-1',
            'snapshotMetadata.enabled': true,
            'snapshotMetadata.tls.secretName': 'arbor-snapshot-metadata-tls',
            'snapshotMetadata.tls.caCert': '-----BEGIN CERTIFICATE-----',
          },
        }),
        'SnapshotMetadataService',
      );
      const host = (announced.spec as { address: string }).address.replace(/:\d+$/, '');
      assert.ok((spec(certificate).dnsNames as string[]).includes(host), `the Certificate does not hold ${host}`);
      assert.ok((spec(certificate).usages as string[]).includes('server auth'));
    });

    // kubevirt.md used to say that VMs on Arbor disks cannot live-migrate (no ReadWriteMany).
    it('kubevirt.md explains live migration: the disks it needs, the eviction strategy, what happens to the disk, and why KubeVirt may refuse', () => {
      const text = read('docs/kubevirt.md');
      const prose = text.replace(/^```[\s\S]*?^```/gm, '');
      assert.doesNotMatch(prose, /cannot live-migrate|no `ReadWriteMany`/);
      for (const needle of [
        /^## \d+\. Live migration/m,
        /`ReadWriteMany` \+\s+`Block` first/,
        /evictionStrategy: LiveMigrate/,
        /"evictionStrategy":"LiveMigrate"/,
        /relays/,
        /flushes/,
        /LiveMigratable/,
        /DisksNotLiveMigratable/,
        /INVALID_ARGUMENT/,
        /Filesystem/,
      ]) {
        assert.match(text, needle);
      }
      for (const kind of ['DataVolume', 'DataImportCron', 'dataVolumeTemplates', 'VirtualMachineSnapshot', 'VirtualMachineRestore'])
        assert.ok(text.includes(kind), kind);
      const vms = fencedBlocks('docs/kubevirt.md', 'yaml')
        .flatMap((block) => parseDocuments(block) as K8sObject[])
        .filter((o) => o.kind === 'VirtualMachine');
      const mobile = vms.filter((vm) => (spec(vm) as VirtualMachineSpec).template.spec.evictionStrategy === 'LiveMigrate');
      assert.ok(mobile.length > 0, 'no VM that moves when its node is drained');
      for (const vm of vms) assert.deepEqual(liveMigrationProblems(vm), []);
      for (const claim of claimSpecs(vms)) assert.deepEqual(accessModeProblems(claim), []);
    });
  });
});
