/**
 * Names of volumes, snapshots and group snapshots, and how they are written where a
 * volume and its snapshot share one string (NBD export names, CLI arguments).
 *
 * A name is what the CSI spec allows a CO to pass: any Unicode string of 1 to 128
 * bytes in UTF-8, without the control characters the spec bans. It is kept exactly
 * (no normalization), so '@', '/', spaces and non-ASCII letters are all names.
 *
 * NAME@SNAP joins a volume and one of its snapshots. A name holding '@' or '%' is
 * written with that character percent-encoded ('@' as %40, '%' as %25); every other
 * character as is. A name with neither (every name Arbor allowed before) is written
 * unchanged, so no existing export name or script changes.
 */
import { ArborError } from './errors';
import { maxNameBytes } from './limits';

/** The characters the CSI spec bans from names: U+0000–U+0008, U+000B, U+000C, U+000E–U+001F, U+007F–U+009F. */
// eslint-disable-next-line no-control-regex -- matching control characters is the point
const bannedPattern = /[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]/u;
/** A UTF-16 surrogate without its pair is no Unicode character. */
const loneSurrogatePattern = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;

export type NameKind = 'volume' | 'snapshot' | 'group snapshot';

/** What is wrong with `name` as a name, or undefined when it is one. */
export function nameProblem(name: unknown): string | undefined {
  if (typeof name !== 'string' || name.length === 0) return 'it is empty';
  const bytes = Buffer.byteLength(name, 'utf8');
  if (bytes > maxNameBytes) return `it is ${bytes} bytes in UTF-8, more than ${maxNameBytes}`;
  const banned = bannedPattern.exec(name);
  if (banned) return `it holds the control character U+${banned[0].codePointAt(0)!.toString(16).toUpperCase().padStart(4, '0')}, which the CSI spec bans`;
  if (loneSurrogatePattern.test(name)) return 'it is not valid Unicode (a lone surrogate)';
  return undefined;
}

/** The rule, as messages state it. */
export const nameRule = `1 to ${maxNameBytes} bytes of UTF-8 without the control characters U+0000-U+0008, U+000B, U+000C, U+000E-U+001F and U+007F-U+009F`;

/** Throws invalid-argument naming the field (`what name`, or `field` when given) and the rule. */
export function validateName(name: string, what: NameKind, field?: string): void {
  const problem = nameProblem(name);
  if (problem) {
    throw new ArborError(
      'invalid-argument',
      `${field ?? `${what} name`} ${JSON.stringify(name)} is not a valid ${what} name: ${problem}; a name is ${nameRule}`,
    );
  }
}

/**
 * Hidden volumes (a receive's staging volume, store/receive.ts) start with a control
 * character the spec bans, so no user's name can collide with one.
 */
export const hiddenNamePrefix = '\u0001';

export function isHiddenName(name: string): boolean {
  return name.startsWith(hiddenNamePrefix);
}

/** A name as written in NAME@SNAP: '%' as %25 and '@' as %40, the rest as is. */
export function quoteName(name: string): string {
  return name.replace(/[%@]/g, (c) => (c === '%' ? '%25' : '%40'));
}

/** The inverse of quoteName; undefined for text quoteName cannot produce (a raw '@', or '%' not before 25 or 40). */
export function unquoteName(text: string): string | undefined {
  if (text.includes('@')) return undefined;
  let bad = false;
  const name = text.replace(/%(..)?/gs, (_all, code: string | undefined) => {
    const upper = code?.toUpperCase();
    if (upper === '25') return '%';
    if (upper === '40') return '@';
    bad = true;
    return '';
  });
  return bad ? undefined : name;
}

/** A volume, or a snapshot of it: what NAME and NAME@SNAP denote. */
export interface VolumeOrSnapshotName {
  volume: string;
  snapshot?: string;
}

/** NAME or NAME@SNAP, each name quoted. */
export function formatRef(volume: string, snapshot?: string): string {
  return snapshot === undefined ? quoteName(volume) : `${quoteName(volume)}@${quoteName(snapshot)}`;
}

/**
 * Parses NAME or NAME@SNAP (names quoted as formatRef writes them); a string saying
 * what is wrong when it is neither. The names are not checked further: one that is
 * no valid name is simply not found.
 */
export function parseRefText(text: string): VolumeOrSnapshotName | string {
  const parts = text.split('@');
  if (parts.length > 2) return `it holds more than one '@' (write an '@' inside a name as %40)`;
  const [volume, snapshot] = parts.map(unquoteName);
  if (volume === undefined || (parts.length === 2 && snapshot === undefined)) return `a '%' not followed by 25 or 40 (write a '%' inside a name as %25)`;
  if (!volume || (parts.length === 2 && !snapshot)) return 'a name in it is empty';
  return parts.length === 2 ? { volume, snapshot } : { volume };
}
