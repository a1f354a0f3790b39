import { describe, expect, it } from 'vitest';
import { parsePasswd } from '../../src/ve/passwd.js';

describe('parsePasswd on a passwd VE root wrote', () => {
  it('keeps an entry with a NUL byte in a field, marked invalid with the reason', () => {
    const [root, ann] = parsePasswd('root:x:0:0:root:/root:/bin/sh\0evil\nann:x:1000:1000::/home/a\0nn:/bin/sh\n');
    expect(root).toMatchObject({ name: 'root', invalid: 'a NUL byte in its shell' });
    expect(ann).toMatchObject({ name: 'ann', invalid: 'a NUL byte in its home directory' });
  });

  it('marks an over-long shell invalid and leaves good entries unmarked', () => {
    const [bad, good] = parsePasswd(`x:x:1:1::/:/${'a'.repeat(5000)}\nroot:x:0:0:root:/root:/bin/sh\n`);
    expect(bad?.invalid).toMatch(/longer than 4096 bytes/);
    expect(good).toEqual({ name: 'root', uid: 0, gid: 0, home: '/root', shell: '/bin/sh' });
  });
});
