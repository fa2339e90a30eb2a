import fs from 'node:fs';
import tls from 'node:tls';
import { Log, silentLog } from '../../lib/logger';
import { ArborError } from '../../store/errors';

export interface TlsFiles {
  certFile: string;
  keyFile: string;
  /** The cluster CA: with it, peers must present a certificate it signed (mutual TLS). */
  caFile?: string;
}

interface Loaded {
  /** What the files were when read: a change of any of them means reading again. */
  stamp: string;
  server: tls.SecureContext;
  client: tls.ConnectionOptions;
}

/**
 * This node's TLS identity for NBD between nodes: its certificate and key, and the
 * cluster CA that every peer's certificate must chain to. Peers are authenticated by
 * that chain, not by host name: the CA is Arbor's own, and one certificate may serve
 * every node (a relay reaches a node by whatever address it advertised).
 *
 * The files are read again when they change (a Kubernetes Secret volume is updated
 * by swapping a symlink), so certificates rotate with no restart: new connections
 * use the new ones, established connections go on. A change that does not load (a
 * key that does not match its certificate, a file half-written) keeps the previous
 * identity and is logged.
 */
export class TlsIdentity {
  private loaded: Loaded;

  constructor(
    readonly files: TlsFiles,
    private readonly log: Log = silentLog,
  ) {
    this.loaded = this.load(stampOf(files));
  }

  get mutual(): boolean {
    return this.files.caFile !== undefined;
  }

  /** The context a server side of a connection uses now. */
  serverContext(): tls.SecureContext {
    return this.current().server;
  }

  /** Options for `tls.connect` to another node: this node's certificate, the CA to check the peer against. */
  clientOptions(): tls.ConnectionOptions {
    return this.current().client;
  }

  private current(): Loaded {
    const stamp = stampOf(this.files);
    if (stamp !== this.loaded.stamp) {
      try {
        this.loaded = this.load(stamp);
        this.log.info('TLS certificate files changed: new connections use them', { cert: this.files.certFile });
      } catch (err) {
        // Retried on the next connection; until then the identity that worked stays.
        this.log.error('TLS certificate files changed but do not load; the previous ones stay in use', { error: (err as Error).message });
      }
    }
    return this.loaded;
  }

  private load(stamp: string): Loaded {
    const cert = readPem(this.files.certFile, '--tls-cert');
    const key = readPem(this.files.keyFile, '--tls-key');
    const ca = this.files.caFile === undefined ? undefined : readPem(this.files.caFile, '--tls-ca');
    let server: tls.SecureContext;
    try {
      server = tls.createSecureContext({ cert, key, ca });
    } catch (err) {
      throw new ArborError(
        'invalid-argument',
        `TLS certificate ${this.files.certFile} with key ${this.files.keyFile}: ${(err as Error).message}; give a PEM certificate and its own private key`,
      );
    }
    // The chain to the CA is checked by Node; the host name is not (see above).
    const client: tls.ConnectionOptions = { cert, key, ca, checkServerIdentity: () => undefined };
    return { stamp, server, client };
  }
}

/**
 * Why the peer of a server-side TLS socket is not trusted, or undefined when its
 * certificate chains to the CA. Node sets `authorized` only on sockets a tls.Server
 * accepted; a socket upgraded in the middle of a protocol (NBD_OPT_STARTTLS) is
 * checked here the way tls.Server checks its own: the handle's verification result,
 * and a certificate must be there at all.
 */
export function peerRefusal(socket: tls.TLSSocket): string | undefined {
  const handle = (socket as unknown as { _handle?: { verifyError?: () => Error | null } })._handle;
  if (!handle?.verifyError) return 'the TLS handshake cannot be checked';
  const error = handle.verifyError();
  if (error) return `client certificate refused: ${error.message}`;
  if (Object.keys(socket.getPeerCertificate()).length === 0) return 'no client certificate';
  return undefined;
}

function readPem(file: string, option: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw new ArborError('invalid-argument', `${option} ${file}: cannot read it (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
  }
}

function stampOf(files: TlsFiles): string {
  return [files.certFile, files.keyFile, files.caFile]
    .map((file) => {
      if (file === undefined) return '-';
      try {
        const stat = fs.statSync(file);
        return `${stat.ino}:${stat.size}:${stat.mtimeMs}`;
      } catch {
        return 'missing';
      }
    })
    .join('/');
}
