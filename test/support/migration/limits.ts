/**
 * Every bound of the migration harness in one place, named with its unit. The times
 * are for TCG on a loaded 2-core machine: the guest is a kernel and a shell loop, so a
 * boot takes 3 to 10 s here, and a migration of its little RAM a second or two.
 */

/** From starting QEMU to the guest's first completed write. */
export const bootTimeoutMs = 90_000;
/** From `migrate` to query-migrate saying completed, failed or cancelled. */
export const migrationTimeoutMs = 120_000;
/** Waiting for a number of guest writes once the guest is running. */
export const writesTimeoutMs = 60_000;
/** Connecting to a QEMU's QMP socket after starting it. */
export const qmpConnectTimeoutMs = 15_000;
/** One QMP command's answer. */
export const qmpCommandTimeoutMs = 15_000;
/** How often query-migrate is asked, and the harness looks for new console lines. */
export const pollEveryMs = 20;
/** From QMP `quit` to QEMU's exit, before SIGKILL. */
export const quitTimeoutMs = 5_000;

/** The most console output kept per VM: a guest that prints without end is a failure, not a memory leak. */
export const maxConsoleBytes = 16 * 1024 * 1024;
/** The most of QEMU's stderr kept per VM (its tail, for failure messages). */
export const maxStderrBytes = 64 * 1024;
/** The longest QMP line accepted (query-migrate answers are about 1 KiB). */
export const maxQmpLineBytes = 1024 * 1024;
/** The most QMP events kept per connection (the newest). */
export const maxQmpEvents = 1_000;

/** The guest's RAM: its kernel and busybox need about 60 MiB; less RAM, less to migrate. */
export const defaultMemoryMiB = 128;
/** Blocks the guest's writer cycles through (4 KiB each): the volume needs blocks × 4 KiB. */
export const defaultBlocks = 256;
