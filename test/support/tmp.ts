import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

/** A fresh temporary directory, removed by the returned cleanup. */
export function tempDir(prefix = 'arbor-test-'): { dir: string; cleanup: () => void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  return { dir, cleanup: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

/**
 * A temporary directory in memory when the machine has /dev/shm: for tests about
 * logic, where fsync (milliseconds on these VMs) would only add waiting. Crash and
 * space tests use `tempDir`, on a real disk.
 */
export function memoryTempDir(prefix = 'arbor-test-'): { dir: string; cleanup: () => void } {
  if (!fs.existsSync('/dev/shm')) return tempDir(prefix);
  const dir = fs.mkdtempSync(path.join('/dev/shm', prefix));
  return { dir, cleanup: () => fs.rmSync(dir, { recursive: true, force: true }) };
}
