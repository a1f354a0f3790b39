/*
 * res-inotify: take inotify instances until it fails (at most MAX), print how
 * many it got and why it stopped, then hold them for HOLD seconds.
 * Usage: res-inotify MAX HOLD      (HOLD 0: only try one, print "ok N" or the error)
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/resource.h>
#include <unistd.h>

int main(int argc, char **argv) {
  int max = argc > 1 ? atoi(argv[1]) : 1000, hold = argc > 2 ? atoi(argv[2]) : 60;
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  int n = 0, err = 0;
  while (n < max) {
    int fd = inotify_init1(IN_CLOEXEC);
    if (fd < 0) {
      err = errno;
      break;
    }
    n++;
  }
  printf("took %d %s\n", n, err ? strerror(err) : "limit-of-test");
  fflush(stdout);
  if (hold > 0) sleep((unsigned)hold);
  return 0;
}
