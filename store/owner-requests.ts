import { randomBytes } from 'node:crypto';
import { Log } from '../lib/logger';
import { Catalog, KvEntry, WatchEvent, put, unchanged } from './catalog/catalog';
import { Check, boolean, count, decode, invalid, mapOf, optional, shape, string } from './decode';
import { ArborError, ErrorCode, isArborError } from './errors';
import { ownerRequestTimeoutMs, ownerCheckIntervalMs } from './limits';
import { OwnerRecord, Ownership, ownerKey } from './ownership';

/** What one process asks of the process that owns a volume. */
export type OwnerOp =
  | { op: 'createSnapshot'; volumeId: string; name: string; scope?: string }
  | { op: 'cloneVolume'; volumeId: string; name: string; labels?: Record<string, string> }
  | { op: 'resizeVolume'; volumeId: string; sizeBytes: number }
  | { op: 'deleteVolume'; volumeId: string }
  | { op: 'volumeUsage'; volumeId: string }
  | { op: 'holdForGroup'; volumeId: string; token: string };

interface Reply {
  ok: boolean;
  result?: unknown;
  error?: { code: ErrorCode; message: string };
}

const replyShape = shape<Reply>({ ok: boolean, result: (value) => value, error: optional(shape({ code: string as Check<ErrorCode>, message: string })) });

/** What each request must carry beyond its op, volume and asker. */
const opFields: Record<OwnerOp['op'], Check<unknown>> = {
  createSnapshot: shape({ name: string, scope: optional(string) }),
  cloneVolume: shape({ name: string, labels: optional(mapOf(string)) }),
  resizeVolume: shape({ sizeBytes: count }),
  deleteVolume: shape({}),
  volumeUsage: shape({}),
  holdForGroup: shape({ token: string }),
};

const requestShape: Check<OwnerOp & { from: string }> = (value, path) => {
  const { op } = shape<{ op: string; volumeId: string; from: string }>({ op: string, volumeId: string, from: string })(value, path);
  const fields = Object.hasOwn(opFields, op) ? opFields[op as OwnerOp['op']] : invalid('op', `one of ${Object.keys(opFields).join(', ')}`, op);
  fields(value, path);
  return value as OwnerOp & { from: string };
};

const requestsOf = (nodeId: string) => `requests/${nodeId}/`;
const replyKey = (requestId: string) => `replies/${requestId}`;

/**
 * Requests to a volume's owner, through the catalog (Olive's way: the controller
 * never touches an attached volume's head; it asks the owner, which drains its
 * writes, makes them durable and answers). A request is a key under the owner's
 * prefix, attached to the asker's lease; the owner claims it by deleting it, runs
 * it, and puts the reply under the request's id, attached to its own lease. The
 * asker gives up when the owner lets go of the volume or does not answer in time.
 */
export class OwnerRequests {
  private stopServing?: () => void;

  constructor(
    private readonly catalog: Catalog,
    private readonly ownership: Ownership,
    private readonly log: Log,
  ) {}

  /** Answers requests addressed to this node with `handler`. */
  async serve(handler: (op: OwnerOp) => Promise<unknown>): Promise<void> {
    const prefix = requestsOf(this.ownership.nodeId);
    const handle = (entry: KvEntry) => void this.answer(entry, handler);
    this.stopServing = this.catalog.watch(prefix, (events: WatchEvent[]) => {
      for (const event of events) if (event.type === 'put') handle({ key: event.key, value: event.value!, modRevision: event.modRevision });
    });
    for (const entry of await this.catalog.list(prefix)) handle(entry);
  }

  stop(): void {
    this.stopServing?.();
  }

  /** Asks `owner` to run `op` on volume `op.volumeId`; resolves with its answer. */
  async ask(owner: OwnerRecord, op: OwnerOp): Promise<unknown> {
    const id = randomBytes(8).toString('hex');
    const lease = await this.ownership.currentLease();
    return new Promise<unknown>((resolve, reject) => {
      let settled = false;
      const finish = (fn: () => void) => {
        if (settled) return;
        settled = true;
        stopWatch();
        clearInterval(check);
        clearTimeout(timer);
        void this.catalog
          .txn(
            [],
            [
              { type: 'delete', key: replyKey(id) },
              { type: 'delete', key: `${requestsOf(owner.nodeId)}${id}` },
            ],
          )
          .catch(() => {});
        fn();
      };
      const onReply = (value: string) => {
        const reply = decode({ key: replyKey(id), value }, 'a reply of a volume owner', replyShape);
        finish(() => (reply.ok ? resolve(reply.result) : reject(new ArborError(reply.error!.code, reply.error!.message))));
      };
      const stopWatch = this.catalog.watch(replyKey(id), (events) => {
        const putEvent = events.find((e) => e.type === 'put');
        if (putEvent) onReply(putEvent.value!);
      });
      // The owner may let go of the volume (or die) without answering: then ask again, elsewhere.
      const check = setInterval(() => {
        void (async () => {
          const reply = await this.catalog.get(replyKey(id)).catch(() => undefined);
          if (reply) return onReply(reply.value);
          const current = await this.ownership.ownerOf(op.volumeId).catch(() => owner);
          if (!current || current.lease !== owner.lease) {
            finish(() => reject(new ArborError('aborted', `volume ${op.volumeId}: node ${owner.nodeId} let go of it before answering; retry`)));
          }
        })();
      }, ownerCheckIntervalMs);
      const timer = setTimeout(
        () =>
          finish(() =>
            reject(
              new ArborError(
                'unavailable',
                `volume ${op.volumeId}: its owner, node ${owner.nodeId}, did not answer ${op.op} within ${ownerRequestTimeoutMs / 1000} s`,
              ),
            ),
          ),
        ownerRequestTimeoutMs,
      );
      this.catalog.txn([], [put(`${requestsOf(owner.nodeId)}${id}`, { ...op, from: this.ownership.nodeId }, lease)]).catch((err) => finish(() => reject(err)));
    });
  }

  private async answer(entry: KvEntry, handler: (op: OwnerOp) => Promise<unknown>): Promise<void> {
    const id = entry.key.slice(entry.key.lastIndexOf('/') + 1);
    try {
      // Claiming deletes the request: it runs once, however many times it is seen.
      if (!(await this.catalog.txn([unchanged(entry)], [{ type: 'delete', key: entry.key }])).succeeded) return;
      const op = decode(entry, 'a request to a volume owner', requestShape);
      let reply: Reply;
      try {
        reply = { ok: true, result: (await handler(op)) ?? null };
      } catch (err) {
        reply = { ok: false, error: isArborError(err) ? { code: err.code, message: err.message } : { code: 'internal', message: (err as Error).message } };
      }
      this.log.info('answered a request for a volume this node owns', { op: op.op, volumeId: op.volumeId, from: op.from, ok: reply.ok });
      await this.catalog.txn([], [put(replyKey(id), reply, await this.ownership.currentLease())]);
    } catch (err) {
      this.log.error('answering an owner request failed', { request: entry.key, error: (err as Error).message });
    }
  }
}

export { ownerKey };
