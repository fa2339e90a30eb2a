/**
 * Checks a parsed Kubernetes object against the API's types, so a misspelled or
 * misplaced field fails a test instead of being dropped by the API server.
 *
 * Built-in kinds go through @kubernetes/client-node's generated models twice over:
 * the object is deserialized into its model and serialized back, and every field of
 * the original that did not survive is reported (a field the model does not know);
 * then every value is checked against the model's declared type (a string where an
 * integer belongs, a map where a list belongs). Custom resources (snapshots, CDI,
 * KubeVirt, the Prometheus Operator, cert-manager) have no model there: each has a shape below,
 * written from its API reference, holding the fields we use and the ones it requires;
 * built-in types embedded in them (label selectors, PVC specs, object metadata) are
 * checked through the models again.
 */
interface AttributeType {
  name: string;
  baseName: string;
  type: string;
  format: string;
}
interface ModelClass {
  new (): object;
  getAttributeTypeMap(): AttributeType[];
}
interface Serializer {
  serialize(data: unknown, type: string, format?: string): unknown;
  deserialize(data: unknown, type: string, format?: string): unknown;
}

// The generated serializer is not exported from the package root (ESM, no "exports"
// map, so the deep path resolves); Node 20.19+ can require() it.
const generated = require('@kubernetes/client-node/dist/gen/models/ObjectSerializer.js') as Record<string, unknown> & { ObjectSerializer: Serializer };

function model(name: string): ModelClass | undefined {
  const candidate = generated[name] as ModelClass | undefined;
  return typeof candidate?.getAttributeTypeMap === 'function' ? candidate : undefined;
}

/** The built-in kinds the chart and the examples use: apiVersion/kind → model. */
export const builtinKinds: Record<string, string> = {
  'v1/Namespace': 'V1Namespace',
  'v1/ServiceAccount': 'V1ServiceAccount',
  'v1/Service': 'V1Service',
  'v1/Pod': 'V1Pod',
  'v1/PersistentVolumeClaim': 'V1PersistentVolumeClaim',
  'v1/Secret': 'V1Secret',
  'apps/v1/Deployment': 'V1Deployment',
  'apps/v1/DaemonSet': 'V1DaemonSet',
  'storage.k8s.io/v1/CSIDriver': 'V1CSIDriver',
  'storage.k8s.io/v1/StorageClass': 'V1StorageClass',
  'storage.k8s.io/v1/VolumeAttributesClass': 'V1VolumeAttributesClass',
  'rbac.authorization.k8s.io/v1/ClusterRole': 'V1ClusterRole',
  'rbac.authorization.k8s.io/v1/ClusterRoleBinding': 'V1ClusterRoleBinding',
  'rbac.authorization.k8s.io/v1/Role': 'V1Role',
  'rbac.authorization.k8s.io/v1/RoleBinding': 'V1RoleBinding',
};

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function describe(value: unknown): string {
  if (Array.isArray(value)) return 'a list';
  if (value === null) return 'null';
  if (isPlainObject(value)) return 'a map';
  return `${typeof value} ${JSON.stringify(value)}`;
}

/** Drops the keys whose value is undefined, which the serializer emits for every absent field. */
function pruned(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(pruned);
  if (value instanceof Date) return value.toISOString();
  if (!isPlainObject(value)) return value;
  const out: Record<string, unknown> = {};
  for (const [key, v] of Object.entries(value)) if (v !== undefined) out[key] = pruned(v);
  return out;
}

/** Every path where `original` holds something `roundTripped` lost or changed. */
function lostFields(original: unknown, roundTripped: unknown, at: string, problems: string[]): void {
  if (isPlainObject(original)) {
    if (!isPlainObject(roundTripped)) {
      problems.push(`${at}: ${describe(original)} did not survive the model (got ${describe(roundTripped)})`);
      return;
    }
    for (const [key, value] of Object.entries(original)) {
      if (!(key in roundTripped)) problems.push(`${at}.${key}: unknown field (the model dropped it)`);
      else lostFields(value, roundTripped[key], `${at}.${key}`, problems);
    }
    return;
  }
  if (Array.isArray(original)) {
    if (!Array.isArray(roundTripped) || roundTripped.length !== original.length) {
      problems.push(`${at}: the list did not survive the model`);
      return;
    }
    original.forEach((item, i) => lostFields(item, roundTripped[i], `${at}[${i}]`, problems));
    return;
  }
  if (original !== roundTripped) problems.push(`${at}: ${describe(original)} became ${describe(roundTripped)}`);
}

const resourceMaps = new Set(['limits', 'requests', 'capacity', 'allocatable', 'hard']);

/** Checks every value against the type the model declares for it. */
function typeProblems(value: unknown, type: string, format: string, at: string, problems: string[]): void {
  if (value === undefined || value === null) return;
  const array = /^Array<(.+)>$/.exec(type);
  if (array) {
    if (!Array.isArray(value)) problems.push(`${at}: should be a list, is ${describe(value)}`);
    else value.forEach((item, i) => typeProblems(item, array[1], format, `${at}[${i}]`, problems));
    return;
  }
  const map = /^\{ \[key: string\]: (.+); \}$/.exec(type);
  if (map) {
    if (!isPlainObject(value)) {
      problems.push(`${at}: should be a map, is ${describe(value)}`);
      return;
    }
    const quantities = resourceMaps.has(at.slice(at.lastIndexOf('.') + 1));
    for (const [key, item] of Object.entries(value)) {
      // Quantities may be written as bare numbers (cpu: 1).
      if (quantities && typeof item === 'number') continue;
      typeProblems(item, map[1], '', `${at}.${key}`, problems);
    }
    return;
  }
  switch (type) {
    case 'string':
    case 'Date':
      if (typeof value !== 'string') problems.push(`${at}: should be a string, is ${describe(value)}`);
      return;
    case 'number':
      if (typeof value !== 'number' || (/^int/.test(format) && !Number.isInteger(value)))
        problems.push(`${at}: should be ${format || 'a number'}, is ${describe(value)}`);
      return;
    case 'boolean':
      if (typeof value !== 'boolean') problems.push(`${at}: should be a boolean, is ${describe(value)}`);
      return;
    case 'IntOrString':
      if (typeof value !== 'string' && !Number.isInteger(value)) problems.push(`${at}: should be an integer or a string, is ${describe(value)}`);
      return;
    case 'any':
      return;
  }
  const cls = model(type);
  if (!cls) return;
  if (!isPlainObject(value)) {
    problems.push(`${at}: should be a ${type} map, is ${describe(value)}`);
    return;
  }
  for (const attribute of cls.getAttributeTypeMap()) {
    typeProblems(value[attribute.baseName], attribute.type, attribute.format, `${at}.${attribute.baseName}`, problems);
  }
}

/** What is wrong with `value` as an instance of the built-in type `typeName` (empty when nothing is). */
export function modelProblems(value: unknown, typeName: string, at = ''): string[] {
  if (!model(typeName)) return [`${at || '.'}: no model ${typeName} in @kubernetes/client-node`];
  const problems: string[] = [];
  const serializer = generated.ObjectSerializer;
  const roundTripped = pruned(serializer.serialize(serializer.deserialize(value, typeName), typeName));
  lostFields(value, roundTripped, at, problems);
  typeProblems(value, typeName, '', at, problems);
  return problems;
}

// ---- Custom resources -------------------------------------------------------------

export type Shape =
  | 'string'
  | 'boolean'
  | 'integer'
  | { enum: readonly (string | boolean)[] }
  | { model: string }
  | { object: Record<string, Shape>; required?: readonly string[]; oneOf?: readonly string[] }
  | { map: Shape }
  | { list: Shape; minItems?: number };

const obj = (fields: Record<string, Shape>, required: readonly string[] = [], oneOf?: readonly string[]): Shape => ({ object: fields, required, oneOf });
const list = (item: Shape, minItems = 0): Shape => ({ list: item, minItems });
const stringMap: Shape = { map: 'string' };
const nameRef = obj({ name: 'string', namespace: 'string' }, ['name']);

/** CDI's StorageSpec: a PVC spec whose access modes and volume mode CDI may fill in from the StorageProfile. */
const storageSpec = obj({
  accessModes: list({ enum: ['ReadWriteOnce', 'ReadOnlyMany', 'ReadWriteMany', 'ReadWriteOncePod'] }),
  volumeMode: { enum: ['Block', 'Filesystem'] },
  storageClassName: 'string',
  resources: { model: 'V1VolumeResourceRequirements' },
  selector: { model: 'V1LabelSelector' },
  dataSource: { model: 'V1TypedLocalObjectReference' },
});

const dataVolumeSpec = obj(
  {
    source: obj(
      {
        registry: obj({ url: 'string', pullMethod: { enum: ['pod', 'node'] }, secretRef: 'string', certConfigMap: 'string' }, ['url']),
        http: obj({ url: 'string', secretRef: 'string', certConfigMap: 'string' }, ['url']),
        pvc: nameRef,
        snapshot: nameRef,
        blank: obj({}),
        upload: obj({}),
      },
      [],
      ['registry', 'http', 'pvc', 'snapshot', 'blank', 'upload'],
    ),
    sourceRef: obj({ kind: { enum: ['DataSource'] }, name: 'string', namespace: 'string' }, ['kind', 'name']),
    storage: storageSpec,
    pvc: { model: 'V1PersistentVolumeClaimSpec' },
    contentType: { enum: ['kubevirt', 'archive'] },
    preallocation: 'boolean',
  },
  [],
  ['source', 'sourceRef'],
);

const vmiSpec = obj(
  {
    domain: obj(
      {
        cpu: obj({ cores: 'integer', sockets: 'integer', threads: 'integer' }),
        memory: obj({ guest: 'string' }),
        resources: obj({ requests: stringMap, limits: stringMap }),
        firmware: obj({ bootloader: obj({ efi: obj({ secureBoot: 'boolean' }), bios: obj({}) }) }),
        devices: obj({
          disks: list(obj({ name: 'string', disk: obj({ bus: { enum: ['virtio', 'sata', 'scsi', 'usb'] } }), bootOrder: 'integer' }, ['name'])),
          interfaces: list(obj({ name: 'string', masquerade: obj({}), bridge: obj({}), model: 'string' }, ['name'])),
          rng: obj({}),
        }),
      },
      ['devices'],
    ),
    networks: list(obj({ name: 'string', pod: obj({}), multus: obj({ networkName: 'string' }, ['networkName']) }, ['name'])),
    volumes: list(
      obj(
        {
          name: 'string',
          dataVolume: obj({ name: 'string' }, ['name']),
          persistentVolumeClaim: obj({ claimName: 'string', readOnly: 'boolean' }, ['claimName']),
          cloudInitNoCloud: obj({ userData: 'string', userDataBase64: 'string', networkData: 'string' }),
          containerDisk: obj({ image: 'string' }, ['image']),
        },
        ['name'],
        ['dataVolume', 'persistentVolumeClaim', 'cloudInitNoCloud', 'containerDisk'],
      ),
    ),
    evictionStrategy: { enum: ['None', 'LiveMigrate', 'LiveMigrateIfPossible', 'External'] },
    terminationGracePeriodSeconds: 'integer',
  },
  ['domain'],
);

const vmTarget = obj({ apiGroup: { enum: ['kubevirt.io'] }, kind: { enum: ['VirtualMachine'] }, name: 'string' }, ['kind', 'name']);
const deletionPolicy: Shape = { enum: ['Delete', 'Retain'] };
const snapshotClassFields = { driver: 'string', deletionPolicy, parameters: stringMap } as const;

/** cert-manager's Issuer and ClusterIssuer: the two kinds of issuer the docs use (a self-signed one, a CA). */
const issuerSpec = obj({ selfSigned: obj({}), ca: obj({ secretName: 'string' }, ['secretName']) }, [], ['selfSigned', 'ca']);
/** cert-manager's KeyUsage values (cert-manager.io/v1). */
const certificateUsages = [
  'signing',
  'digital signature',
  'content commitment',
  'key encipherment',
  'key agreement',
  'data encipherment',
  'cert sign',
  'crl sign',
  'encipher only',
  'decipher only',
  'any',
  'server auth',
  'client auth',
  'code signing',
  'email protection',
  's/mime',
  'ipsec end system',
  'ipsec tunnel',
  'ipsec user',
  'timestamping',
  'ocsp signing',
  'microsoft sgc',
  'netscape sgc',
] as const;

/** apiVersion/kind → the shape of everything but apiVersion, kind and metadata. */
export const customKinds: Record<string, Record<string, Shape>> = {
  'snapshot.storage.k8s.io/v1/VolumeSnapshotClass': { ...snapshotClassFields },
  'groupsnapshot.storage.k8s.io/v1/VolumeGroupSnapshotClass': { ...snapshotClassFields },
  'groupsnapshot.storage.k8s.io/v1beta2/VolumeGroupSnapshotClass': { ...snapshotClassFields },
  'groupsnapshot.storage.k8s.io/v1beta1/VolumeGroupSnapshotClass': { ...snapshotClassFields },
  'snapshot.storage.k8s.io/v1/VolumeSnapshot': {
    spec: obj(
      {
        source: obj(
          { persistentVolumeClaimName: 'string', volumeSnapshotContentName: 'string' },
          [],
          ['persistentVolumeClaimName', 'volumeSnapshotContentName'],
        ),
        volumeSnapshotClassName: 'string',
      },
      ['source'],
    ),
  },
  'groupsnapshot.storage.k8s.io/v1/VolumeGroupSnapshot': {
    spec: obj(
      {
        source: obj({ selector: { model: 'V1LabelSelector' }, volumeGroupSnapshotContentName: 'string' }, [], ['selector', 'volumeGroupSnapshotContentName']),
        volumeGroupSnapshotClassName: 'string',
      },
      ['source'],
    ),
  },
  // external-snapshot-metadata's CRD (client/config/crd): every field required and, by its CEL rules, not empty.
  'cbt.storage.k8s.io/v1beta1/SnapshotMetadataService': {
    spec: obj({ address: 'string', caCert: 'string', audience: 'string' }, ['address', 'caCert', 'audience']),
  },
  'cbt.storage.k8s.io/v1alpha1/SnapshotMetadataService': {
    spec: obj({ address: 'string', caCert: 'string', audience: 'string' }, ['address', 'caCert', 'audience']),
  },
  'cdi.kubevirt.io/v1beta1/StorageProfile': {
    spec: obj({
      claimPropertySets: list(
        obj(
          {
            accessModes: list({ enum: ['ReadWriteOnce', 'ReadOnlyMany', 'ReadWriteMany', 'ReadWriteOncePod'] }, 1),
            volumeMode: { enum: ['Block', 'Filesystem'] },
          },
          ['accessModes', 'volumeMode'],
        ),
      ),
      cloneStrategy: { enum: ['snapshot', 'copy', 'csi-clone'] },
      dataImportCronSourceFormat: { enum: ['pvc', 'snapshot'] },
      snapshotClass: 'string',
    }),
  },
  'cdi.kubevirt.io/v1beta1/DataVolume': { spec: dataVolumeSpec },
  'cdi.kubevirt.io/v1beta1/DataSource': {
    spec: obj({ source: obj({ pvc: nameRef, snapshot: nameRef }, [], ['pvc', 'snapshot']) }, ['source']),
  },
  'cdi.kubevirt.io/v1beta1/DataImportCron': {
    spec: obj(
      {
        template: obj({ metadata: { model: 'V1ObjectMeta' }, spec: dataVolumeSpec }, ['spec']),
        schedule: 'string',
        managedDataSource: 'string',
        garbageCollect: { enum: ['Outdated', 'Never'] },
        importsToKeep: 'integer',
        retentionPolicy: { enum: ['None', 'RetainAll'] },
      },
      ['template', 'schedule', 'managedDataSource'],
    ),
  },
  'kubevirt.io/v1/VirtualMachine': {
    spec: obj(
      {
        runStrategy: { enum: ['Always', 'RerunOnFailure', 'Manual', 'Halted', 'Once', 'WaitAsReceiver'] },
        dataVolumeTemplates: list(obj({ metadata: { model: 'V1ObjectMeta' }, spec: dataVolumeSpec }, ['metadata', 'spec'])),
        template: obj({ metadata: { model: 'V1ObjectMeta' }, spec: vmiSpec }, ['spec']),
      },
      ['template'],
    ),
  },
  'snapshot.kubevirt.io/v1beta1/VirtualMachineSnapshot': {
    spec: obj({ source: vmTarget, failureDeadline: 'string' }, ['source']),
  },
  'snapshot.kubevirt.io/v1beta1/VirtualMachineRestore': {
    spec: obj({ target: vmTarget, virtualMachineSnapshotName: 'string' }, ['target', 'virtualMachineSnapshotName']),
  },
  'kubevirt.io/v1/VirtualMachineInstanceMigration': {
    spec: obj({ vmiName: 'string' }, ['vmiName']),
  },
  'cert-manager.io/v1/Issuer': { spec: issuerSpec },
  'cert-manager.io/v1/ClusterIssuer': { spec: issuerSpec },
  'cert-manager.io/v1/Certificate': {
    spec: obj(
      {
        secretName: 'string',
        issuerRef: obj({ name: 'string', kind: { enum: ['Issuer', 'ClusterIssuer'] }, group: 'string' }, ['name']),
        commonName: 'string',
        dnsNames: list('string'),
        ipAddresses: list('string'),
        isCA: 'boolean',
        duration: 'string',
        renewBefore: 'string',
        usages: list({ enum: certificateUsages }),
        privateKey: obj({
          algorithm: { enum: ['RSA', 'ECDSA', 'Ed25519'] },
          size: 'integer',
          encoding: { enum: ['PKCS1', 'PKCS8'] },
          rotationPolicy: { enum: ['Never', 'Always'] },
        }),
        secretTemplate: obj({ labels: stringMap, annotations: stringMap }),
      },
      ['secretName', 'issuerRef'],
    ),
  },
  'monitoring.coreos.com/v1/ServiceMonitor': {
    spec: obj(
      {
        selector: { model: 'V1LabelSelector' },
        namespaceSelector: obj({ matchNames: list('string'), any: 'boolean' }),
        endpoints: list(
          obj({ port: 'string', path: 'string', interval: 'string', scrapeTimeout: 'string', scheme: { enum: ['http', 'https'] }, honorLabels: 'boolean' }),
          1,
        ),
        jobLabel: 'string',
      },
      ['selector', 'endpoints'],
    ),
  },
};

function shapeProblems(value: unknown, shape: Shape, at: string, problems: string[]): void {
  if (shape === 'string' || shape === 'boolean') {
    if (typeof value !== shape) problems.push(`${at}: should be a ${shape}, is ${describe(value)}`);
    return;
  }
  if (shape === 'integer') {
    if (!Number.isInteger(value)) problems.push(`${at}: should be an integer, is ${describe(value)}`);
    return;
  }
  if ('enum' in shape) {
    if (!shape.enum.includes(value as string)) problems.push(`${at}: ${describe(value)} is not one of ${shape.enum.join(', ')}`);
    return;
  }
  if ('model' in shape) {
    problems.push(...modelProblems(value, shape.model, at));
    return;
  }
  if ('list' in shape) {
    if (!Array.isArray(value)) problems.push(`${at}: should be a list, is ${describe(value)}`);
    else {
      if (value.length < (shape.minItems ?? 0)) problems.push(`${at}: needs at least ${shape.minItems} item(s)`);
      value.forEach((item, i) => shapeProblems(item, shape.list, `${at}[${i}]`, problems));
    }
    return;
  }
  if (!isPlainObject(value)) {
    problems.push(`${at}: should be a map, is ${describe(value)}`);
    return;
  }
  if ('map' in shape) {
    for (const [key, item] of Object.entries(value)) shapeProblems(item, shape.map, `${at}.${key}`, problems);
    return;
  }
  for (const [key, item] of Object.entries(value)) {
    const field = shape.object[key];
    if (!field) problems.push(`${at}.${key}: unknown field (known: ${Object.keys(shape.object).join(', ') || 'none'})`);
    else shapeProblems(item, field, `${at}.${key}`, problems);
  }
  for (const key of shape.required ?? []) if (!(key in value)) problems.push(`${at}.${key}: required`);
  if (shape.oneOf) {
    const present = shape.oneOf.filter((key) => key in value);
    if (present.length !== 1) problems.push(`${at}: needs exactly one of ${shape.oneOf.join(', ')}, has ${present.length === 0 ? 'none' : present.join(', ')}`);
  }
}

/** Whether a cluster with Kubernetes, the snapshot CRDs, external-snapshot-metadata's CRD, CDI, KubeVirt, the Prometheus Operator and cert-manager knows this kind. */
export function knownKind(object: { apiVersion?: unknown; kind?: unknown }): boolean {
  const key = `${object.apiVersion}/${object.kind}`;
  return key in builtinKinds || key in customKinds;
}

/**
 * Everything wrong with one object: an unknown apiVersion/kind, a missing name, an
 * unknown or mistyped field anywhere. Empty when the object is right.
 */
export function objectProblems(object: unknown): string[] {
  if (!isPlainObject(object)) return [`not an object: ${describe(object)}`];
  const key = `${object.apiVersion}/${object.kind}`;
  const name = isPlainObject(object.metadata) ? String(object.metadata.name) : '?';
  const where = `${object.kind}/${name}`;
  const withWhere = (problems: string[]) => problems.map((p) => `${where} ${p}`);
  const problems: string[] = [];
  if (!isPlainObject(object.metadata) || typeof object.metadata.name !== 'string' || object.metadata.name === '') problems.push('metadata.name: required');
  const builtin = builtinKinds[key];
  if (builtin) return withWhere([...problems, ...modelProblems(object, builtin)]);
  const custom = customKinds[key];
  if (!custom)
    return withWhere([
      ...problems,
      `${key}: a kind the cluster does not know (known: ${[...Object.keys(builtinKinds), ...Object.keys(customKinds)].join(', ')})`,
    ]);
  problems.push(...modelProblems(object.metadata, 'V1ObjectMeta', '.metadata'));
  const { apiVersion: _apiVersion, kind: _kind, metadata: _metadata, ...rest } = object;
  shapeProblems(rest, obj(custom, 'spec' in custom ? ['spec'] : ['driver', 'deletionPolicy']), '', problems);
  return withWhere(problems);
}
