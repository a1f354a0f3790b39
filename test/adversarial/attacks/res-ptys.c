/*
 * res-ptys: open /dev/ptmx until it fails (at most MAX), print how many it
 * got and why it stopped, then hold them for HOLD seconds.
 * Usage: res-ptys MAX HOLD
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

int main(int argc, char **argv) {
  int max = argc > 1 ? atoi(argv[1]) : 5000, hold = argc > 2 ? atoi(argv[2]) : 60;
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  int n = 0, err = 0;
  while (n < max) {
    int fd = open("/dev/ptmx", O_RDWR | O_NOCTTY);
    if (fd < 0) {
      err = errno;
      break;
    }
    n++;
  }
  printf("opened %d %s\n", n, err ? strerror(err) : "limit-of-test");
  fflush(stdout);
  sleep((unsigned)hold);
  return 0;
}
