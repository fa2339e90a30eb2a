/**
 * A newc cpio writer for the migration guest's initramfs.
 *
 * test/support/test-node/initramfs.ts has the same writer but does not export it, and
 * this directory may not change that file: when it exports its NewcArchive, this file
 * should go and guest.ts import that one instead.
 */

/** The "new" (SVR4, no CRC) cpio format the kernel unpacks: a 110-byte ASCII header per entry, 4-byte aligned. */
export class NewcArchive {
  private readonly parts: Buffer[] = [];
  private inode = 1;

  directory(name: string): void {
    this.entry(name, 0o040755, Buffer.alloc(0));
  }

  file(name: string, data: Buffer, mode: number): void {
    this.entry(name, 0o100000 | mode, data);
  }

  symlink(name: string, target: string): void {
    this.entry(name, 0o120777, Buffer.from(target));
  }

  finish(): Buffer {
    this.entry('TRAILER!!!', 0, Buffer.alloc(0));
    return Buffer.concat(this.parts);
  }

  private entry(name: string, mode: number, data: Buffer): void {
    const nameBytes = Buffer.from(name + '\0');
    const fields = [this.inode++, mode, 0, 0, mode & 0o040000 ? 2 : 1, 0, data.length, 0, 0, 0, 0, nameBytes.length, 0];
    const header = Buffer.from('070701' + fields.map((value) => value.toString(16).padStart(8, '0')).join(''), 'ascii');
    this.parts.push(header, nameBytes, padding(header.length + nameBytes.length), data, padding(data.length));
  }
}

function padding(length: number): Buffer {
  return Buffer.alloc((4 - (length % 4)) % 4);
}
