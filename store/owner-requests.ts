import { randomBytes } from 'node:crypto';
import { Log } from '../lib/logger';
import { Catalog, KvEntry, Op, WatchEvent, del, put, unchanged } from './catalog/catalog';
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

/**
 * How a handler may answer in a transaction of its own (a snapshot's commit) instead
 * of the owner's separate put after it: one round trip fewer for the asker. Offered
 * only once the request's claim is won, so an answer is still written only by the
 * claim's winner.
 */
export interface InlineAnswer {
  /** The ops that answer with `result`, to ride in the handler's transaction, once the claim has settled; none when it was not won. */
  ops(result: unknown): Promise<Op[]>;
  /** The transaction carrying the last ops `ops` gave committed: the answer is written. */
  committed(): void;
}

/** A request as the owner reads it: the op, who asks, and (from askers since replies went per asker) where to answer. */
type Request = OwnerOp & { from: string; replyTo?: string };

const requestShape: Check<Request> = (value, path) => {
  const { op } = shape<{ op: string; volumeId: string; from: string; replyTo?: string }>({
    op: string,
    volumeId: string,
    from: string,
    replyTo: optional(string),
  })(value, path);
  const fields = Object.hasOwn(opFields, op) ? opFields[op as OwnerOp['op']] : invalid('op', `one of ${Object.keys(opFields).join(', ')}`, op);
  fields(value, path);
  return value as Request;
};

const requestsOf = (nodeId: string) => `requests/${nodeId}/`;
/** Where an owner answers: under the asker's prefix, which the asker watches from the start. */
const repliesTo = (nodeId: string) => `replies/${nodeId}/`;
/** Where owners that predate per-asker replies answer (a rolling upgrade may still have some). */
const legacyReplyKey = (requestId: string) => `replies/${requestId}`;

/**
 * Requests to a volume's owner, through the catalog (Olive's way: the controller
 * never touches an attached volume's head; it asks the owner, which drains its
 * writes, makes them durable and answers). A request is a key under the owner's
 * prefix, attached to the asker's lease; the owner claims it by deleting it, runs
 * it, and puts the reply under the asker's prefix and the request's id, attached to
 * its own lease; the asker watches that prefix from the start. The asker gives up
 * when the owner lets go of the volume or does not answer in time.
 */
export class OwnerRequests {
  private stopServing?: () => void;
  private stopReplies?: () => void;
  /** Requests this process asked and is waiting on, by id: what to do with the answer. */
  private readonly waiting = new Map<string, (value: string) => void>();

  constructor(
    private readonly catalog: Catalog,
    private readonly ownership: Ownership,
    private readonly log: Log,
  ) {}

  /**
   * Answers requests addressed to this node with `handler`, and watches for the
   * answers to this node's own requests: one watch for every request, opened before
   * the first, so an answer never waits for a watch to be set up (nor, put before its
   * watch was there, for the next poll).
   */
  async serve(handler: (op: OwnerOp, inline: InlineAnswer) => Promise<unknown>): Promise<void> {
    const replies = repliesTo(this.ownership.nodeId);
    this.stopReplies = this.catalog.watch(replies, (events: WatchEvent[]) => {
      for (const event of events) if (event.type === 'put') this.waiting.get(event.key.slice(replies.length))?.(event.value!);
    });
    const prefix = requestsOf(this.ownership.nodeId);
    const handle = (entry: KvEntry) => void this.answer(entry, handler);
    this.stopServing = this.catalog.watch(prefix, (events: WatchEvent[]) => {
      for (const event of events) if (event.type === 'put') handle({ key: event.key, value: event.value!, modRevision: event.modRevision });
    });
    for (const entry of await this.catalog.list(prefix)) handle(entry);
  }

  stop(): void {
    this.stopServing?.();
    this.stopReplies?.();
  }

  /** Asks `owner` to run `op` on volume `op.volumeId`; resolves with its answer. */
  async ask(owner: OwnerRecord, op: OwnerOp): Promise<unknown> {
    const id = randomBytes(8).toString('hex');
    const replyKey = `${repliesTo(this.ownership.nodeId)}${id}`;
    const lease = await this.ownership.currentLease();
    return new Promise<unknown>((resolve, reject) => {
      let settled = false;
      const finish = (fn: () => void) => {
        if (settled) return;
        settled = true;
        this.waiting.delete(id);
        clearInterval(check);
        clearTimeout(timer);
        void this.catalog
          .txn(
            [],
            [
              { type: 'delete', key: replyKey },
              { type: 'delete', key: legacyReplyKey(id) },
              { type: 'delete', key: `${requestsOf(owner.nodeId)}${id}` },
            ],
          )
          .catch(() => {});
        fn();
      };
      const onReply = (key: string, value: string) => {
        const reply = decode({ key, value }, 'a reply of a volume owner', replyShape);
        finish(() => (reply.ok ? resolve(reply.result) : reject(new ArborError(reply.error!.code, reply.error!.message))));
      };
      this.waiting.set(id, (value) => onReply(replyKey, value));
      // The owner may let go of the volume (or die) without answering: then ask again, elsewhere.
      // (The poll also finds an answer the watch missed, and one an owner from before per-asker replies put at the old key.)
      const check = setInterval(() => {
        void (async () => {
          const [reply, legacy] = await Promise.all([this.catalog.get(replyKey), this.catalog.get(legacyReplyKey(id))]).catch(() => [undefined, undefined]);
          const found = reply ?? legacy;
          if (found) return onReply(found.key, found.value);
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
      const request: Request = { ...op, from: this.ownership.nodeId, replyTo: replyKey };
      this.catalog.txn([], [put(`${requestsOf(owner.nodeId)}${id}`, request, lease)]).catch((err) => finish(() => reject(err)));
    });
  }

  private async answer(entry: KvEntry, handler: (op: OwnerOp, inline: InlineAnswer) => Promise<unknown>): Promise<void> {
    const id = entry.key.slice(entry.key.lastIndexOf('/') + 1);
    try {
      // Claiming deletes the request: it is answered once, however many times it is seen.
      const claim = this.catalog.txn([unchanged(entry)], [del(entry.key)]).then((result) => result.succeeded);
      claim.catch(() => {}); // awaited below; this only keeps a failure from counting as unhandled meanwhile
      let op: Request;
      try {
        op = decode(entry, 'a request to a volume owner', requestShape);
      } catch (err) {
        await claim;
        throw err;
      }
      // Most ops run only once claimed. A snapshot runs while the claim is in flight (a round
      // trip less): running it twice, or for an asker that gave up, makes no state that
      // claiming first could not (the name keys let one snapshot of a name be made, a second
      // run finds it, and an asker that gives up while the owner commits leaves the snapshot
      // made the same way), and only the claim's winner answers.
      if (!runsOnceByName(op) && !(await claim)) return;
      // Where the asker said, if it is the one place an asker may name (its own prefix, this request's id).
      const to = op.replyTo === `${repliesTo(op.from)}${id}` ? op.replyTo : legacyReplyKey(id);
      const lease = await this.ownership.currentLease();
      let offered = false;
      let answeredInline = false;
      const inline: InlineAnswer = {
        ops: async (result) => {
          // Sent when the request was seen, the claim has almost always settled by the
          // time the snapshot's blobs are durable; waiting for it when it has not keeps
          // the answer in the snapshot's transaction, a round trip less for the asker.
          offered = await claim.catch(() => false);
          return offered ? [put(to, { ok: true, result: result ?? null } satisfies Reply, lease)] : [];
        },
        committed: () => {
          answeredInline ||= offered;
        },
      };
      let reply: Reply;
      try {
        reply = { ok: true, result: (await handler(op, inline)) ?? null };
      } catch (err) {
        reply = { ok: false, error: isArborError(err) ? { code: err.code, message: err.message } : { code: 'internal', message: (err as Error).message } };
      }
      if (!(await claim)) return;
      this.log.info('answered a request for a volume this node owns', {
        op: op.op,
        volumeId: op.volumeId,
        from: op.from,
        ok: reply.ok,
        inline: answeredInline,
      });
      if (answeredInline) return;
      await this.catalog.txn([], [put(to, reply, await this.ownership.currentLease())]);
    } catch (err) {
      this.log.error('answering an owner request failed', { request: entry.key, error: (err as Error).message });
    }
  }
}

/** Ops whose effect the catalog makes happen once however often they run: they need not wait for their claim. */
function runsOnceByName(op: OwnerOp): boolean {
  return op.op === 'createSnapshot';
}

export { ownerKey };
