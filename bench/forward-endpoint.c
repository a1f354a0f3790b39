/*
 * Both ends of one TCP stream for bench/forward-vs-sshd.ts, built static so
 * the same binary runs on the host and inside a VE of any template:
 *
 *   forward-endpoint serve PORT          listen on 127.0.0.1:PORT, one connection after another:
 *                                        the client's 9-byte header says 'U' (upload: read until
 *                                        EOF, answer the byte count, 8 bytes) or 'D' (download:
 *                                        write the count the header asks for, then close)
 *   forward-endpoint up PORT BYTES       connect to 127.0.0.1:PORT, send BYTES, half-close, wait
 *                                        for the server's count
 *   forward-endpoint down PORT BYTES     connect, ask for BYTES, read until EOF
 *
 * up and down print "BYTES SECONDS" (monotonic clock, from before connect()
 * to the last byte: the forward's channel open is inside, ~1 ms against
 * seconds of transfer) and fail unless every byte arrived. Connections that
 * send no full header (a port probe) are closed and forgotten.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF (256 * 1024)
static char buf[BUF];

static int read_full(int fd, void *p, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = read(fd, (char *)p + got, n - got);
    if (r == 0) return -1;
    if (r < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    got += (size_t)r;
  }
  return 0;
}

static int write_full(int fd, const void *p, size_t n) {
  size_t done = 0;
  while (done < n) {
    ssize_t w = write(fd, (const char *)p + done, n - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    done += (size_t)w;
  }
  return 0;
}

static int send_bytes(int fd, uint64_t n) {
  while (n > 0) {
    size_t k = n < BUF ? (size_t)n : BUF;
    if (write_full(fd, buf, k) < 0) return -1;
    n -= k;
  }
  return 0;
}

/* Read until EOF; the byte count, or -1 on an error. */
static int64_t drain(int fd) {
  int64_t total = 0;
  for (;;) {
    ssize_t r = read(fd, buf, BUF);
    if (r == 0) return total;
    if (r < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    total += r;
  }
}

static struct sockaddr_in loopback(int port) {
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return a;
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int serve(int port) {
  signal(SIGPIPE, SIG_IGN); /* a client that leaves mid-download costs its connection only */
  int l = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = loopback(port);
  if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 16) < 0) {
    perror("forward-endpoint: listen");
    return 1;
  }
  printf("listening\n");
  fflush(stdout);
  for (;;) {
    int c = accept(l, NULL, NULL);
    if (c < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      perror("forward-endpoint: accept");
      return 1;
    }
    unsigned char h[9];
    if (read_full(c, h, sizeof h) == 0) {
      uint64_t n;
      memcpy(&n, h + 1, 8);
      if (h[0] == 'D') {
        send_bytes(c, n);
      } else if (h[0] == 'U') {
        int64_t got = drain(c);
        if (got >= 0) write_full(c, &got, sizeof got);
      }
    }
    close(c);
  }
}

static int client(char mode, int port, uint64_t n) {
  double t0 = now();
  int c = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = loopback(port);
  if (c < 0 || connect(c, (struct sockaddr *)&a, sizeof a) < 0) {
    perror("forward-endpoint: connect");
    return 1;
  }
  unsigned char h[9];
  h[0] = (unsigned char)mode;
  memcpy(h + 1, &n, 8);
  if (write_full(c, h, sizeof h) < 0) {
    perror("forward-endpoint: header");
    return 1;
  }
  int64_t got;
  if (mode == 'U') {
    if (send_bytes(c, n) < 0) {
      perror("forward-endpoint: send");
      return 1;
    }
    shutdown(c, SHUT_WR);
    if (read_full(c, &got, sizeof got) < 0) {
      fprintf(stderr, "forward-endpoint: no count from the far end\n");
      return 1;
    }
  } else {
    got = drain(c);
  }
  double t = now() - t0;
  if (got != (int64_t)n) {
    fprintf(stderr, "forward-endpoint: %lld bytes arrived of %llu\n", (long long)got, (unsigned long long)n);
    return 1;
  }
  printf("%llu %.6f\n", (unsigned long long)n, t);
  return 0;
}

int main(int argc, char **argv) {
  /* Not zeros: nothing on the path compresses, but the data should not invite it. */
  uint32_t x = 2463534242u;
  for (size_t i = 0; i < BUF; i++) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    buf[i] = (char)x;
  }
  if (argc == 3 && strcmp(argv[1], "serve") == 0) return serve(atoi(argv[2]));
  if (argc == 4 && strcmp(argv[1], "up") == 0) return client('U', atoi(argv[2]), strtoull(argv[3], NULL, 10));
  if (argc == 4 && strcmp(argv[1], "down") == 0) return client('D', atoi(argv[2]), strtoull(argv[3], NULL, 10));
  fprintf(stderr, "usage: forward-endpoint serve PORT | up PORT BYTES | down PORT BYTES\n");
  return 2;
}
