import { promises as fs } from 'node:fs';

/**
 * Whether an ELF file asks for a program interpreter (PT_INTERP), i.e. is
 * dynamically linked and would not run in a VE without the host's libc.
 * null when the bytes are not an ELF header this understands.
 */
export function elfIsDynamic(buf: Buffer): boolean | null {
  if (buf.length < 64 || buf.readUInt32BE(0) !== 0x7f454c46) return null;
  const is64 = buf[4] === 2;
  const le = buf[5] === 1;
  const u16 = (o: number) => (le ? buf.readUInt16LE(o) : buf.readUInt16BE(o));
  const u32 = (o: number) => (le ? buf.readUInt32LE(o) : buf.readUInt32BE(o));
  const phoff = is64 ? Number(le ? buf.readBigUInt64LE(32) : buf.readBigUInt64BE(32)) : u32(28);
  const phentsize = u16(is64 ? 54 : 42);
  const phnum = u16(is64 ? 56 : 44);
  if (phentsize === 0 || phoff + phentsize * phnum > buf.length) return null;
  for (let i = 0; i < phnum; i++) if (u32(phoff + i * phentsize) === 3 /* PT_INTERP */) return true;
  return false;
}

/**
 * How a program file is linked, read from its ELF header (no `file` program
 * needed): 'dynamic' programs need the host's libc and would not run in a VE.
 */
export async function binaryLinkage(file: string): Promise<'missing' | 'static' | 'dynamic' | 'unknown'> {
  let fh: fs.FileHandle;
  try {
    fh = await fs.open(file, 'r');
  } catch {
    return 'missing';
  }
  try {
    const buf = Buffer.alloc(4096);
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    const dynamic = elfIsDynamic(buf.subarray(0, bytesRead));
    return dynamic === null ? 'unknown' : dynamic ? 'dynamic' : 'static';
  } finally {
    await fh.close();
  }
}
