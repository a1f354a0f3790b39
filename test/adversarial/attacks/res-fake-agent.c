/*
 * res-fake-agent: VE root impersonates the VE's session agent. It takes the
 * agent's listening socket (fd 3) with pidfd_getfd (VE root may ptrace its own
 * processes), stops the real agent so that only it answers, and answers the
 * next session the host relay asks for with "started", then "the process
 * was killed by SIGSTOP". Then it lets the real agent go on and exits.
 * Usage: res-fake-agent WAIT_SECONDS
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

struct msg {
  uint32_t type;
  int32_t value;
  char text[200];
};

static int find_agent(void) {
  DIR *d = opendir("/proc");
  struct dirent *e;
  while (d && (e = readdir(d))) {
    int pid = atoi(e->d_name);
    if (pid <= 0) continue;
    char p[64], comm[64] = "";
    snprintf(p, sizeof p, "/proc/%d/comm", pid);
    FILE *f = fopen(p, "r");
    if (!f) continue;
    int is_agent = fgets(comm, sizeof comm, f) && !strcmp(comm, "vesh-agent\n");
    fclose(f);
    if (!is_agent) continue;
    /* Not a dead one waiting to be reaped. */
    char st[256] = "";
    snprintf(p, sizeof p, "/proc/%d/stat", pid);
    f = fopen(p, "r");
    if (f && fgets(st, sizeof st, f)) {
      char *rp = strrchr(st, ')');
      if (rp && rp[1] == ' ' && rp[2] != 'Z') {
        fclose(f);
        closedir(d);
        return pid;
      }
    }
    if (f) fclose(f);
  }
  if (d) closedir(d);
  return -1;
}

int main(int argc, char **argv) {
  int wait_s = argc > 1 ? atoi(argv[1]) : 60;
  int agent = find_agent();
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
    char req[65536];
    if (c >= 0 && recv(c, req, sizeof req, 0) > 0) {
      struct msg m = { .type = 1, .value = 1 }; /* MSG_STARTED, pid 1 */
      send(c, &m, sizeof m, MSG_NOSIGNAL);
      usleep(300 * 1000);
      struct msg x = { .type = 2, .value = SIGSTOP }; /* MSG_EXIT, wait status "killed by SIGSTOP" */
      send(c, &x, sizeof x, MSG_NOSIGNAL);
      printf("answered SIGSTOP\n");
      fflush(stdout);
      rc = 0;
      usleep(500 * 1000);
      close(c);
    }
  }
  kill(agent, SIGCONT);
  fflush(stdout);
  return rc;
}
