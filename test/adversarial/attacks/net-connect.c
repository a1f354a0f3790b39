/*
 * net-connect ADDR PORT COUNT TIMEOUT_MS HOLD_MS
 *
 * Opens COUNT TCP connections to ADDR:PORT at once (non-blocking), waits up
 * to TIMEOUT_MS for them, prints "connected K" and the first line the peer
 * sent on the first connection ("banner ..."), then holds the connections
 * open for HOLD_MS before it exits: what a VE does to use up connection
 * tracking, bounded (COUNT <= 1000) so it stops by itself.
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
#include <time.h>
#include <unistd.h>

static long now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

int main(int argc, char **argv) {
  if (argc != 6) { fprintf(stderr, "usage: net-connect ADDR PORT COUNT TIMEOUT_MS HOLD_MS\n"); return 2; }
  struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2]))};
  if (inet_pton(AF_INET, argv[1], &to.sin_addr) != 1) { fprintf(stderr, "bad ADDR\n"); return 2; }
  int count = atoi(argv[3]);
  long timeout = atol(argv[4]), hold = atol(argv[5]);
  if (count < 1 || count > 1000 || timeout < 1 || timeout > 60000 || hold < 0 || hold > 600000) { fprintf(stderr, "out of range\n"); return 2; }
  static struct pollfd fds[1000];
  static int state[1000]; /* 0 pending, 1 connected, -1 failed */
  for (int i = 0; i < count; i++) {
    fds[i].fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fds[i].fd < 0) { perror("socket"); return 1; }
    fds[i].events = POLLOUT;
    if (connect(fds[i].fd, (struct sockaddr *)&to, sizeof to) == 0) state[i] = 1;
    else if (errno != EINPROGRESS) state[i] = -1;
  }
  long end = now_ms() + timeout;
  for (;;) {
    int pending = 0;
    for (int i = 0; i < count; i++) {
      fds[i].events = state[i] == 0 ? POLLOUT : 0;
      pending += state[i] == 0;
    }
    long left = end - now_ms();
    if (!pending || left <= 0) break;
    if (poll(fds, (nfds_t)count, (int)left) < 0 && errno != EINTR) { perror("poll"); return 1; }
    for (int i = 0; i < count; i++) {
      if (state[i] != 0 || !(fds[i].revents & (POLLOUT | POLLERR | POLLHUP))) continue;
      int err = 0;
      socklen_t el = sizeof err;
      getsockopt(fds[i].fd, SOL_SOCKET, SO_ERROR, &err, &el);
      state[i] = err == 0 ? 1 : -1;
    }
  }
  int connected = 0, first = -1;
  for (int i = 0; i < count; i++) {
    if (state[i] == 1) {
      connected++;
      if (first < 0) first = i;
    }
  }
  printf("connected %d\n", connected);
  if (first >= 0) {
    char line[256];
    size_t got = 0;
    struct pollfd p = {.fd = fds[first].fd, .events = POLLIN};
    while (got < sizeof line - 1 && poll(&p, 1, 2000) > 0) {
      ssize_t n = read(fds[first].fd, line + got, sizeof line - 1 - got);
      if (n <= 0) break;
      got += (size_t)n;
      if (memchr(line, '\n', got)) break;
    }
    line[got] = '\0';
    char *nl = strchr(line, '\n');
    if (nl) *nl = '\0';
    printf("banner %s\n", line);
  }
  fflush(stdout);
  if (hold > 0) usleep((useconds_t)hold * 1000);
  return 0;
}
