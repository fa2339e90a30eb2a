declare module 'fs-native-extensions' {
  /** Punches a hole: the range takes no space and reads as zeros. */
  export function trimSync(fd: number, offset: number, length: number): void;
  const fne: { trimSync: typeof trimSync };
  export default fne;
}
