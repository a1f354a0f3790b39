/*
 * ve-endless-output: what VE root can put in place of a program the host
 * runs inside the VE (here /bin/sh, with which the host's passwd lookup
 * runs `cat /etc/passwd`). Whatever its arguments:
 *   stream  write valid-looking passwd lines to stdout for ever, as fast as
 *           the reader takes them (a reader without a cap grows without end)
 *   hold    (when /ve-endless-output.hold exists) write nothing and never
 *           exit, keeping stdout open (a reader that waits for end-of-file
 *           waits for ever)
 */
#include <string.h>
#include <unistd.h>

int main(void) {
  if (access("/ve-endless-output.hold", F_OK) == 0) {
    for (;;) pause();
  }
  static char buf[65536];
  const char *line = "root:x:0:0:root:/root:/bin/sh\n";
  size_t n = strlen(line), used = 0;
  while (used + n <= sizeof buf) {
    memcpy(buf + used, line, n);
    used += n;
  }
  for (;;) {
    if (write(1, buf, used) < 0) return 1;
  }
}
