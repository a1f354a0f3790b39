/*
 * ve-suid-probe: what a setuid copy made by VE root gives whoever runs it.
 * Prints "ruid=R euid=E". VE root makes a copy mode 4755 (owned by VE root,
 * host uid 100000); a host user who can reach and run it with the setuid
 * bit honoured would see euid 100000 — every VE's files and the template.
 */
#include <stdio.h>
#include <unistd.h>

int main(void) {
  printf("ruid=%u euid=%u\n", (unsigned)getuid(), (unsigned)geteuid());
  return 0;
}
