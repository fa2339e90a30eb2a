import fne from 'fs-native-extensions';

/**
 * Gives a byte range of a file back to the filesystem (fallocate PUNCH_HOLE, which
 * Node's fs does not offer); the range reads as zeros afterwards.
 */
export function punchHole(fd: number, offset: number, length: number): void {
  fne.trimSync(fd, offset, length);
}
