/*
 * net-sink PORT SECONDS
 *
 * The far end for the network tests, run by the test in a network
 * namespace it made (never a real network): listens on 0.0.0.0:PORT,
 * answers each connection with "sink LOCALADDR\n" (so the client can tell
 * which address it reached), keeps up to 1000 of them open and exits by
 * itself after SECONDS.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc != 3) { fprintf(stderr, "usage: net-sink PORT SECONDS\n"); return 2; }
  int port = atoi(argv[1]);
  long secs = atol(argv[2]);
  if (port < 1 || port > 65535 || secs < 1 || secs > 3600) { fprintf(stderr, "out of range\n"); return 2; }
  int ls = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
  if (bind(ls, (struct sockaddr *)&a, sizeof a) != 0 || listen(ls, 1024) != 0) { perror("bind/listen"); return 1; }
  printf("listening\n");
  fflush(stdout);
  time_t end = time(NULL) + secs;
  int held = 0;
  while (time(NULL) < end) {
    struct pollfd p = {.fd = ls, .events = POLLIN};
    if (poll(&p, 1, 500) <= 0) continue;
    int c = accept(ls, NULL, NULL);
    if (c < 0) continue;
    if (held >= 1000) { close(c); continue; }
    held++;
    struct sockaddr_in me;
    socklen_t ml = sizeof me;
    char addr[INET_ADDRSTRLEN] = "?", msg[64];
    if (getsockname(c, (struct sockaddr *)&me, &ml) == 0) inet_ntop(AF_INET, &me.sin_addr, addr, sizeof addr);
    int n = snprintf(msg, sizeof msg, "sink %s\n", addr);
    if (write(c, msg, (size_t)n) < 0) { /* the client may be gone already */ }
  }
  return 0;
}
