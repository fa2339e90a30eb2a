import { RangeStatus } from '../../store/tree';

/**
 * What the NBD server serves: a block device of a fixed size. The server knows
 * nothing of volumes, snapshots or where the bytes live (nbdkit's plugin idea).
 */
export interface NbdExport {
  readonly name: string;
  readonly description: string;
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  /** The I/O size that avoids read-modify-write (the volume's extent size). */
  readonly preferredBlockBytes: number;
  readInto(offset: number, target: Buffer, targetOffset: number, length: number): Promise<void>;
  /**
   * The read done at once, on this thread, where the export can: true when it read,
   * false when nothing was done and `readInto` must be used; throws where `readInto`
   * would reject. Optional: a 4 KiB request then costs no promise and no event-loop turn.
   */
  readIntoNow?(offset: number, target: Buffer, targetOffset: number, length: number): boolean;
  write(offset: number, data: Buffer, fua: boolean): Promise<void>;
  /**
   * A write without FUA done at once, as `readIntoNow`: false when nothing was done and
   * `write` must be used. `data` is lent for the call only (it may be the socket's own
   * buffer, reused once this returns): nothing may keep it.
   */
  writeNow?(offset: number, data: Buffer): boolean;
  flush(): Promise<void>;
  trim(offset: number, length: number): Promise<void>;
  /** `fast`: refuse (code 'unsupported') rather than write zeros byte by byte. */
  zero(offset: number, length: number, options: { noHole: boolean; fua: boolean; fast: boolean }): Promise<void>;
  blockStatus(offset: number, length: number): Promise<RangeStatus[]>;
  /** Warms caches for the range; may do nothing. */
  cache(offset: number, length: number): Promise<void>;
  /** The connection is done with the export (after its last request); each open is closed once. */
  close?(): Promise<void>;
}

export interface ExportSummary {
  name: string;
  description: string;
}

/** Who opens an export: a client on this host (a unix socket) or another node (TCP). */
export interface ExportClient {
  remote: boolean;
  /**
   * Ends the connection without refusing anything: the requests it has read are
   * answered, the rest is never read, and the client (a relay) sends them again
   * wherever the volume is served next.
   */
  handOff(): void;
}

/** Resolves export names; the empty name has no default export. */
export interface ExportProvider {
  open(name: string, client?: ExportClient): Promise<NbdExport | undefined>;
  /** Whether `open` would find the export, where that is cheaper than opening it (which may attach a volume). */
  exists?(name: string): Promise<boolean>;
  list(): Promise<ExportSummary[]>;
}
