/*
 * res-tcp-pin: pin TCP buffer memory on the VE's loopback. A listener that
 * never reads, CONNS connections with big buffers, each written to until its
 * queues are full; stops at TOTAL_MIB written in all (so that on a host
 * without the guard it stays bounded), prints what it wrote, then holds the
 * connections for HOLD seconds.
 * Usage: res-tcp-pin CONNS TOTAL_MIB HOLD
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static char chunk[1 << 16];

int main(int argc, char **argv) {
  int conns = argc > 1 ? atoi(argv[1]) : 64;
  long long cap = (argc > 2 ? atoll(argv[2]) : 300) << 20;
  int hold = argc > 3 ? atoi(argv[3]) : 60;
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  memset(chunk, 'x', sizeof chunk);
  int big = 64 << 20;
  int l = socket(AF_INET, SOCK_STREAM, 0);
  setsockopt(l, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
  struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
  socklen_t al = sizeof a;
  if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 1024) < 0 || getsockname(l, (struct sockaddr *)&a, &al) < 0) {
    perror("listen");
    return 1;
  }
  long long total = 0;
  int made = 0;
  for (int i = 0; i < conns && total < cap; i++) {
    /* Once the VE's TCP memory is used up, new connections stall: give each a second. */
    int c = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    setsockopt(c, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    if (c < 0 || (connect(c, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS)) {
      printf("connect %d: %s\n", i, strerror(errno));
      fflush(stdout);
      break;
    }
    struct pollfd pl = { .fd = l, .events = POLLIN };
    if (poll(&pl, 1, 1000) <= 0) {
      printf("connection %d not accepted within a second\n", i);
      fflush(stdout);
      break;
    }
    int s = accept(l, NULL, NULL); /* never read */
    if (s < 0) break;
    made++;
    /* Write until the queues are full (no progress for 200 ms), or the cap,
       or two seconds on this connection: under memory pressure poll may say
       writable while every write still fails. */
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long long idle_since = 0, elapsed = 0;
    for (;;) {
      if (total >= cap) break;
      clock_gettime(CLOCK_MONOTONIC, &now);
      elapsed = (now.tv_sec - t0.tv_sec) * 1000LL + (now.tv_nsec - t0.tv_nsec) / 1000000;
      if (elapsed > 2000) break;
      ssize_t n = write(c, chunk, sizeof chunk);
      if (n > 0) {
        total += n;
        idle_since = elapsed;
        continue;
      }
      if (n < 0 && errno != EAGAIN) break;
      if (elapsed - idle_since > 200) break; /* full, and staying full */
      struct pollfd p = { .fd = c, .events = POLLOUT };
      poll(&p, 1, 50);
    }
  }
  printf("connections %d wrote %lld MiB\n", made, total >> 20);
  fflush(stdout);
  sleep((unsigned)hold);
  return 0;
}
