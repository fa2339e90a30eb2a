/** Names for the tests of store/names.ts and of names through CSI and the CLI. */

/** Names the CSI spec allows and Arbor's old rule did not. */
export const specNames = [
  'with space',
  'a+b',
  'vm@prod',
  'team/vm',
  '.dotted',
  '100%',
  'a%40b',
  'naïve δίσκος ディスク',
  'tab\tline\nreturn\r',
  'é'.repeat(64), // 128 bytes, 64 characters
  '日'.repeat(42) + 'ab', // 128 bytes
  '😀'.repeat(32), // 128 bytes, 64 UTF-16 units
];

/** One name per banned range, at both ends of each. */
export const bannedNames = ['\u0000', '\u0008', '\u000b', '\u000c', '\u000e', '\u001f', '\u007f', '\u0080', '\u009f'].map((c) => `bad${c}name`);
