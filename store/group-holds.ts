import { randomBytes } from 'node:crypto';
import { Log } from '../lib/logger';
import { Catalog, Compare, KvEntry, absent, put } from './catalog/catalog';
import { boolean, decode, shape, string } from './decode';
import { groupHoldTimeoutMs } from './limits';
import { VolumeRecord } from './records';

/**
 * A volume taking part in a group snapshot: held (no write is acknowledged), its
 * acknowledged writes committed, and what the group's one transaction must compare
 * and write for it.
 */
export interface GroupMember {
  volumeId: string;
  volumeName: string;
  compares: Compare[];
  /** Its record with the root shared (read-only), as the transaction writes it. */
  next: VolumeRecord;
  /** The transaction committed at `revision`: the volume carries on from the shared root. */
  committed(revision: number): void;
  /** Lets writes go on. */
  release(): void;
}

/** What an owner answers when asked to hold a volume for a group snapshot. */
export interface HeldForGroup {
  compares: Compare[];
  next: VolumeRecord;
}

/**
 * Group snapshots across owners (Olive's consistent branching over several nodes):
 * the coordinator asks every owner to hold its volume; each owner pauses writes,
 * commits what it acknowledged, answers with its compares, and keeps holding until
 * the group's outcome key says what happened. The coordinator's one transaction
 * writes every snapshot, every shared root and the outcome "committed" together, so
 * all volumes are cut at one instant. An owner that hears nothing in time writes
 * "aborted" itself, only if no outcome is there (a compare on the key's absence),
 * so the coordinator's transaction and the owner's abort can never both happen.
 */
export const groupOutcomeKey = (token: string) => `group-outcomes/${token}`;

export function newGroupToken(): string {
  return randomBytes(8).toString('hex');
}

interface Outcome {
  committed: boolean;
  at: string;
}

const outcomeShape = shape<Outcome>({ committed: boolean, at: string });

/** The ops and compares that make the group's transaction decide the outcome. */
export function outcomeInTransaction(token: string): { compare: Compare; op: ReturnType<typeof put> } {
  return { compare: absent(groupOutcomeKey(token)), op: put(groupOutcomeKey(token), { committed: true, at: new Date().toISOString() } satisfies Outcome) };
}

/** Decides "aborted" unless an outcome is already there; returns the outcome that holds. */
export async function abortUnlessDecided(catalog: Catalog, token: string): Promise<KvEntry> {
  const key = groupOutcomeKey(token);
  for (;;) {
    await catalog.txn([absent(key)], [put(key, { committed: false, at: new Date().toISOString() } satisfies Outcome)]);
    const entry = await catalog.get(key);
    if (entry) return entry;
  }
}

/**
 * The owner's side: once the member is held and answered, waits for the outcome (or
 * decides "aborted" after the timeout), applies it, and releases.
 */
export function awaitOutcome(catalog: Catalog, token: string, member: GroupMember, log: Log): void {
  const key = groupOutcomeKey(token);
  let settled = false;
  const settle = (entry: KvEntry) => {
    if (settled) return;
    settled = true;
    stopWatch();
    clearInterval(poll);
    clearTimeout(timer);
    const outcome = decode(entry, 'a group snapshot outcome', outcomeShape);
    if (outcome.committed) member.committed(entry.modRevision);
    member.release();
    log.info('group snapshot hold ended', { volume: member.volumeName, committed: outcome.committed });
  };
  const stopWatch = catalog.watch(key, (events) => {
    const event = events.find((e) => e.type === 'put');
    if (event) settle({ key, value: event.value!, modRevision: event.modRevision });
  });
  // Watches can miss an event across a reconnection: look now and then too.
  const poll = setInterval(
    () =>
      void catalog.get(key).then(
        (entry) => entry && settle(entry),
        () => {},
      ),
    500,
  );
  const decide = () => {
    void abortUnlessDecided(catalog, token).then(settle, (err: Error) => {
      // Without the catalog the outcome cannot be known: keep holding, and try again.
      log.error('cannot decide a group snapshot outcome yet; the volume stays held', { volume: member.volumeName, error: err.message });
      timer = setTimeout(decide, groupHoldTimeoutMs);
    });
  };
  let timer = setTimeout(decide, groupHoldTimeoutMs);
}
