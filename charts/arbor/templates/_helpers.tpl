{{/*
Names, labels and the few paths every template must agree on.
*/}}

{{/* The CSI driver name: fixed by the driver (csi/proto.ts), never configurable. */}}
{{- define "arbor.driverName" -}}csi.arbor.dev{{- end }}

{{/* The topology key the driver reports (csi/proto.ts). */}}
{{- define "arbor.topologyKey" -}}topology.csi.arbor.dev/node{{- end }}

{{- define "arbor.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's name prefix for every object (cluster-scoped ones too). */}}
{{- define "arbor.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "arbor.controllerName" -}}{{ include "arbor.fullname" . }}-controller{{- end }}
{{- define "arbor.nodeName" -}}{{ include "arbor.fullname" . }}-node{{- end }}

{{/* Labels on every object. Call with (dict "ctx" $ "component" "controller"). */}}
{{- define "arbor.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "arbor.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: arbor
{{- end }}

{{/* Labels that select a component's pods. Call with (dict "ctx" $ "component" "node"). */}}
{{- define "arbor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "arbor.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{/* The Arbor image: pinned by digest when one is given. */}}
{{- define "arbor.image" -}}
{{- $image := .Values.image -}}
{{- if $image.digest -}}
{{ $image.repository }}@{{ $image.digest }}
{{- else -}}
{{ $image.repository }}:{{ $image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{/* A sidecar container's image, pull policy and resources. Call with a sidecar's values. */}}
{{- define "arbor.sidecarImage" -}}
image: {{ printf "%s:%s" .image.repository .image.tag | quote }}
imagePullPolicy: {{ .image.pullPolicy | default "IfNotPresent" }}
{{- end }}

{{/*
The CSI socket: the plugin listens on it, every sidecar of the same pod dials it.
The directory is an emptyDir in the controller and the kubelet's plugin directory
(a hostPath) on the nodes; it is mounted at the same path in every container.
*/}}
{{- define "arbor.socketDir" -}}/csi{{- end }}
{{- define "arbor.csiAddress" -}}/csi/csi.sock{{- end }}
{{- define "arbor.csiEndpoint" -}}unix:///csi/csi.sock{{- end }}

{{/* The kubelet's per-driver plugin directory and the registration directory. */}}
{{- define "arbor.pluginDir" -}}{{ .Values.node.kubeletDir }}/plugins/{{ include "arbor.driverName" . }}{{- end }}
{{- define "arbor.registrationDir" -}}{{ .Values.node.kubeletDir }}/plugins_registry{{- end }}

{{/* Where the node plugin serves NBD: a pod-local directory (the plugin connects the kernel to it, and nbdfuse runs in the plugin container). */}}
{{- define "arbor.nbdSocketDir" -}}/run/arbor{{- end }}

{{/* Where Secrets for the distributed store are mounted. */}}
{{- define "arbor.etcdTlsDir" -}}/etc/arbor/etcd-tls{{- end }}
{{- define "arbor.s3CaDir" -}}/etc/arbor/s3-ca{{- end }}
{{- define "arbor.cacheDir" -}}/var/lib/arbor/cache{{- end }}

{{- define "arbor.embedded" -}}{{ if eq .Values.store.mode "embedded" }}true{{ end }}{{- end }}

{{/*
The StorageClass binding mode. Volumes are pinned to no node (every node's plugin
attaches every volume), so they bind at once: Immediate. But a StorageClass's
volumeBindingMode cannot change once created, so an upgrade keeps what the class in
the cluster already has (WaitForFirstConsumer, from charts before 0.2.0) rather than
fail; `lookup` finds nothing under `helm template`, which then renders Immediate.
Call with (dict "ctx" $ "class" .Values.storageClasses.block).
*/}}
{{- define "arbor.bindingMode" -}}
{{- if .class.volumeBindingMode -}}
{{ .class.volumeBindingMode }}
{{- else -}}
{{ dig "volumeBindingMode" "Immediate" (lookup "storage.k8s.io/v1" "StorageClass" "" .class.name) }}
{{- end -}}
{{- end }}

{{/*
Pins a pod to the node that holds the embedded store, by the node's name (the
kubernetes.io/hostname label is not always the node's name); with operator NotIn,
keeps it off that node (the relaying node plugins).
Call with (dict "ctx" $ "operator" "In").
*/}}
{{- define "arbor.embeddedAffinity" -}}
nodeAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    nodeSelectorTerms:
      - matchFields:
          - key: metadata.name
            operator: {{ .operator }}
            values:
              - {{ .ctx.Values.store.embedded.nodeName | quote }}
{{- end }}

{{/*
NBD between nodes. Every node plugin has one certificate and key (server and client
auth; peers are authenticated by the chain to the cluster CA, not by name) and the
CA, from one Secret: tls.secretName, or the one the chart generates. The Secret is
mounted as a directory, never with subPath, so the kubelet's updates reach the files
and Arbor picks a renewed certificate up with no restart.
*/}}
{{- define "arbor.nbdTlsSecretName" -}}
{{- .Values.tls.secretName | default (printf "%s-nbd-tls" (include "arbor.fullname" .)) -}}
{{- end }}
{{- define "arbor.nbdTlsDir" -}}/etc/arbor/nbd-tls{{- end }}

{{- define "arbor.nbdTlsArgs" -}}
- --tls-cert={{ include "arbor.nbdTlsDir" . }}/tls.crt
- --tls-key={{ include "arbor.nbdTlsDir" . }}/tls.key
- --tls-ca={{ include "arbor.nbdTlsDir" . }}/ca.crt
{{- end }}

{{- define "arbor.nbdTlsVolumeMount" -}}
- name: nbd-tls
  mountPath: {{ include "arbor.nbdTlsDir" . }}
  readOnly: true
{{- end }}

{{- define "arbor.nbdTlsVolume" -}}
- name: nbd-tls
  secret:
    secretName: {{ include "arbor.nbdTlsSecretName" . }}
    defaultMode: 256  # 0400
    items:
      - { key: tls.crt, path: tls.crt }
      - { key: tls.key, path: tls.key }
      - { key: ca.crt, path: ca.crt }
{{- end }}

{{/*
Changed-block tracking: the external-snapshot-metadata sidecar's Service (the address
backup tools dial, so the name its certificate must hold) and its TLS files, mounted
as a directory (no subPath) so a renewed Secret reaches them.
*/}}
{{- define "arbor.snapshotMetadataName" -}}{{ include "arbor.fullname" . }}-snapshot-metadata{{- end }}
{{- define "arbor.snapshotMetadataHost" -}}{{ include "arbor.snapshotMetadataName" . }}.{{ .Release.Namespace }}.svc{{- end }}
{{- define "arbor.snapshotMetadataTlsDir" -}}/etc/arbor/snapshot-metadata-tls{{- end }}
{{- define "arbor.snapshotMetadataAudience" -}}{{ .Values.snapshotMetadata.audience | default (include "arbor.driverName" .) }}{{- end }}

{{/* Embedded mode: the Service through which every other node reaches the data node. */}}
{{- define "arbor.dataServiceName" -}}{{ include "arbor.fullname" . }}-data{{- end }}
{{- define "arbor.dataServiceHost" -}}{{ include "arbor.dataServiceName" . }}.{{ .Release.Namespace }}.svc{{- end }}
{{- define "arbor.relayName" -}}{{ include "arbor.fullname" . }}-node-relay{{- end }}

{{/* --store and --blobs (and the etcd TLS files) for every Arbor process in distributed mode. */}}
{{- define "arbor.distributedArgs" -}}
{{- $d := .Values.store.distributed -}}
{{- /* etcds:// is etcd over TLS. Arbor keeps its keys under <prefix>/arbor/. */}}
- --store={{ if $d.etcd.tls.secretName }}etcds{{ else }}etcd{{ end }}://{{ join "," $d.etcd.endpoints }}{{ with $d.etcd.prefix }}/{{ . }}{{ end }}
{{- $query := list -}}
{{- if $d.s3.endpoint }}{{ $query = append $query (printf "endpoint=%s" ($d.s3.endpoint | urlquery)) }}{{ end }}
{{- $query = append $query (printf "region=%s" $d.s3.region) }}
- --blobs=s3://{{ $d.s3.bucket }}{{ with $d.s3.prefix }}/{{ . }}{{ end }}?{{ join "&" $query }}
{{- if $d.etcd.tls.secretName }}
- --etcd-ca={{ include "arbor.etcdTlsDir" . }}/ca.crt
{{- if $d.etcd.tls.clientCertificate }}
- --etcd-cert={{ include "arbor.etcdTlsDir" . }}/tls.crt
- --etcd-key={{ include "arbor.etcdTlsDir" . }}/tls.key
{{- end }}
{{- end }}
{{- end }}

{{/* Credentials for the distributed store, only ever from Secrets. */}}
{{- define "arbor.distributedEnv" -}}
{{- $d := .Values.store.distributed -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $d.s3.credentialsSecret.name }}
      key: {{ $d.s3.credentialsSecret.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $d.s3.credentialsSecret.name }}
      key: {{ $d.s3.credentialsSecret.secretAccessKeyKey }}
{{- if $d.s3.caBundle.secretName }}
- name: AWS_CA_BUNDLE
  value: {{ include "arbor.s3CaDir" . }}/{{ $d.s3.caBundle.key }}
# The AWS SDK for JavaScript does not read AWS_CA_BUNDLE itself; Node.js adds this
# file to its trusted CAs for every TLS connection.
- name: NODE_EXTRA_CA_CERTS
  value: {{ include "arbor.s3CaDir" . }}/{{ $d.s3.caBundle.key }}
{{- end }}
{{- if $d.etcd.auth.secretName }}
- name: ETCD_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $d.etcd.auth.secretName }}
      key: {{ $d.etcd.auth.usernameKey }}
- name: ETCD_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $d.etcd.auth.secretName }}
      key: {{ $d.etcd.auth.passwordKey }}
{{- end }}
{{- end }}

{{- define "arbor.distributedVolumeMounts" -}}
{{- $d := .Values.store.distributed -}}
{{- if $d.etcd.tls.secretName }}
- name: etcd-tls
  mountPath: {{ include "arbor.etcdTlsDir" . }}
  readOnly: true
{{- end }}
{{- if $d.s3.caBundle.secretName }}
- name: s3-ca
  mountPath: {{ include "arbor.s3CaDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "arbor.distributedVolumes" -}}
{{- $d := .Values.store.distributed -}}
{{- if $d.etcd.tls.secretName }}
- name: etcd-tls
  secret:
    secretName: {{ $d.etcd.tls.secretName }}
    defaultMode: 256  # 0400
    items:
      - { key: ca.crt, path: ca.crt }
      {{- if $d.etcd.tls.clientCertificate }}
      - { key: tls.crt, path: tls.crt }
      - { key: tls.key, path: tls.key }
      {{- end }}
{{- end }}
{{- if $d.s3.caBundle.secretName }}
- name: s3-ca
  secret:
    secretName: {{ $d.s3.caBundle.secretName }}
    defaultMode: 292  # 0444
    items:
      - key: {{ $d.s3.caBundle.key }}
        path: {{ $d.s3.caBundle.key }}
{{- end }}
{{- end }}

{{/* Prometheus scrape annotations for a pod. Call with (dict "ctx" $ "port" 9820). */}}
{{- define "arbor.scrapeAnnotations" -}}
{{- if and .ctx.Values.metrics.enabled .ctx.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/* The securityContext of every container that needs no privilege. */}}
{{- define "arbor.restrictedContainer" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end }}
