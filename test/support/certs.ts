import fs from 'node:fs';
import path from 'node:path';
import { ok } from './run';

export interface NodeCertificate {
  caFile: string;
  certFile: string;
  keyFile: string;
}

/** A private CA, as the chart makes for the nodes: made with openssl in `dir`. */
export async function makeCa(dir: string, name: string): Promise<{ caFile: string; caKeyFile: string }> {
  fs.mkdirSync(dir, { recursive: true });
  const caFile = path.join(dir, `${name}-ca.pem`);
  const caKeyFile = path.join(dir, `${name}-ca-key.pem`);
  await ok('openssl', [
    'req',
    '-x509',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:P-256',
    '-nodes',
    '-keyout',
    caKeyFile,
    '-out',
    caFile,
    '-days',
    '2',
    '-subj',
    `/CN=${name} CA`,
  ]);
  return { caFile, caKeyFile };
}

/** A certificate the CA signed, for server and client auth, valid two days. */
export async function issue(dir: string, ca: { caFile: string; caKeyFile: string }, name: string): Promise<NodeCertificate> {
  const keyFile = path.join(dir, `${name}-key.pem`);
  const requestFile = path.join(dir, `${name}.csr`);
  const certFile = path.join(dir, `${name}.pem`);
  const extFile = path.join(dir, `${name}.ext`);
  fs.writeFileSync(extFile, 'subjectAltName=DNS:arbor-node,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature\n');
  await ok('openssl', [
    'req',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:P-256',
    '-nodes',
    '-keyout',
    keyFile,
    '-out',
    requestFile,
    '-subj',
    `/CN=${name}`,
  ]);
  await ok('openssl', ['x509', '-req', '-in', requestFile, '-CA', ca.caFile, '-CAkey', ca.caKeyFile, '-out', certFile, '-days', '2', '-extfile', extFile]);
  return { caFile: ca.caFile, certFile, keyFile };
}
