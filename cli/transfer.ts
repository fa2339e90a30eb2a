import fs from 'node:fs';
import { Progress } from '../lib/progress';
import { ArborError } from '../store/errors';
import { Image } from './session';

/** Bytes moved per volume call: large enough to amortize, small enough to keep memory flat. */
const chunkBytes = 4 * 1024 * 1024;
/** Block status is asked a window at a time so a huge volume's map never sits in memory at once. */
const statusWindowBytes = 1024 * 1024 * 1024;

type ReadableImage = Pick<Image, 'sizeBytes' | 'readInto' | 'blockStatus'>;

/**
 * Writes a raw image over the start of a volume. Extent-sized runs of zeros become
 * holes (trimmed, so they cost nothing); the rest of the volume is left as it was.
 */
export async function importImage(volume: Image, input: AsyncIterable<Buffer>, progress: Progress): Promise<number> {
  const extentSize = volume.preferredBlockBytes;
  const staging = Buffer.allocUnsafe(Math.max(extentSize, Math.floor(chunkBytes / extentSize) * extentSize));
  let filled = 0;
  let offset = 0;
  const flushStaging = async (): Promise<void> => {
    if (offset + filled > volume.sizeBytes) {
      throw new ArborError(
        'out-of-range',
        `the image is larger than volume ${volume.name} (${volume.sizeBytes} bytes); stopped after importing ${offset} bytes; resize the volume first`,
      );
    }
    await writeSkippingZeroExtents(volume, offset, staging.subarray(0, filled));
    offset += filled;
    progress.advance(filled);
    filled = 0;
  };
  for await (const chunk of input) {
    for (let used = 0; used < chunk.length;) {
      const n = Math.min(staging.length - filled, chunk.length - used);
      chunk.copy(staging, filled, used, used + n);
      filled += n;
      used += n;
      if (filled === staging.length) await flushStaging();
    }
  }
  if (filled > 0) await flushStaging();
  await volume.flush();
  return offset;
}

async function writeSkippingZeroExtents(volume: Image, offset: number, data: Buffer): Promise<void> {
  const extentSize = volume.preferredBlockBytes;
  let runStart = 0;
  let runIsZero: boolean | undefined;
  const emit = async (end: number): Promise<void> => {
    if (end <= runStart) return;
    if (runIsZero) await volume.trim(offset + runStart, end - runStart);
    else await volume.write(offset + runStart, data.subarray(runStart, end), false);
  };
  for (let at = 0; at < data.length; at += extentSize) {
    const end = Math.min(at + extentSize, data.length);
    const zero = isAllZero(data, at, end);
    if (runIsZero !== undefined && zero !== runIsZero) {
      await emit(at);
      runStart = at;
    }
    runIsZero = zero;
  }
  await emit(data.length);
}

function isAllZero(buffer: Buffer, from: number, to: number): boolean {
  for (let i = from; i < to; i++) if (buffer[i] !== 0) return false;
  return true;
}

/**
 * Writes a whole volume or snapshot as a raw image into a file, sparse: only ranges
 * that hold data are written, the file is sized to the image.
 */
export async function exportToFile(image: ReadableImage, filePath: string, progress: Progress): Promise<void> {
  const fd = fs.openSync(filePath, 'w', 0o644);
  try {
    fs.ftruncateSync(fd, image.sizeBytes);
    const buffer = Buffer.allocUnsafe(chunkBytes);
    for (let window = 0; window < image.sizeBytes; window += statusWindowBytes) {
      const windowLength = Math.min(statusWindowBytes, image.sizeBytes - window);
      for (const range of await image.blockStatus(window, windowLength)) {
        if (range.kind === 'data') {
          for (let at = range.offset; at < range.offset + range.length; at += chunkBytes) {
            const n = Math.min(chunkBytes, range.offset + range.length - at);
            await image.readInto(at, buffer, 0, n);
            if (!isAllZero(buffer, 0, n)) writeFully(fd, buffer, n, at);
            progress.advance(n);
          }
        } else {
          progress.advance(range.length);
        }
      }
    }
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function writeFully(fd: number, buffer: Buffer, length: number, position: number): void {
  for (let done = 0; done < length;) done += fs.writeSync(fd, buffer, done, length - done, position + done);
}

/** Streams a whole volume or snapshot, holes as zeros; a closed pipe ends it quietly. */
export async function exportToStream(image: ReadableImage, output: NodeJS.WritableStream, progress: Progress): Promise<boolean> {
  let closed = false;
  const onError = (err: NodeJS.ErrnoException): void => {
    if (err.code === 'EPIPE') closed = true;
  };
  output.on('error', onError);
  try {
    for (let at = 0; at < image.sizeBytes && !closed; at += chunkBytes) {
      const n = Math.min(chunkBytes, image.sizeBytes - at);
      // A fresh buffer each time: the stream may still hold the previous one.
      const buffer = Buffer.allocUnsafe(n);
      await image.readInto(at, buffer, 0, n);
      if (!output.write(buffer)) await drained(output);
      progress.advance(n);
    }
  } finally {
    output.off('error', onError);
  }
  return !closed;
}

function drained(output: NodeJS.WritableStream): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      output.off('drain', done);
      output.off('close', done);
      output.off('error', done);
      resolve();
    };
    output.on('drain', done);
    output.on('close', done);
    output.on('error', done);
  });
}
