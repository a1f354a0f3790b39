/*
 * held-shell-liar: VE root answers for the session agent when the broker
 * asks it to hand a held shell back (MSG_ATTACH). It takes the agent's
 * connection sockets (every socket but the listening fd 3) with
 * pidfd_getfd (VE root may ptrace its own processes), stops the real agent,
 * waits for the re-attach request on any of them and answers "attached"
 * with, in place of the held terminal's master, a descriptor of its choosing
 * and a pipe of made-up "held output" (LIAR-OUTPUT):
 *   fifo    a FIFO of the VE, opened read-write (not a terminal);
 *   devpts  the master of a pty of a devpts instance it mounted itself (a
 *           terminal, but not of the devpts the session started on).
 * Then it lets the real agent go on and exits.
 * Usage: held-shell-liar fifo|devpts WAIT_SECONDS
 *
 * VE root cannot mount a devpts of its own (the VE's seccomp filter refuses
 * mount), so the other-devpts lie is played by a fake agent on the host:
 *   held-shell-liar serve SOCKET PTMX
 * listens at SOCKET as an agent does, starts "a session" with a terminal of
 * /dev/ptmx, and answers the re-attach with a terminal of PTMX (the ptmx of
 * another devpts instance, or /dev/ptmx itself for the honest case).
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
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

struct msg {
  uint32_t type;
  int32_t value;
  char text[200];
};

enum { MSG_ATTACH = 6, MSG_ATTACHED = 7 };

static int agent_pid(void) {
  DIR *d = opendir("/proc");
  struct dirent *e;
  int found = -1;
  while (found < 0 && d && (e = readdir(d))) {
    int pid = atoi(e->d_name);
    if (pid <= 0) continue;
    char path[64], comm[64] = "";
    snprintf(path, sizeof path, "/proc/%d/comm", pid);
    FILE *f = fopen(path, "r");
    if (f && fgets(comm, sizeof comm, f) && !strcmp(comm, "vesh-agent\n")) found = pid;
    if (f) fclose(f);
  }
  if (d) closedir(d);
  return found;
}

static int bait(const char *kind) {
  if (!strcmp(kind, "fifo")) {
    unlink("/tmp/held-liar.fifo");
    if (mkfifo("/tmp/held-liar.fifo", 0600) < 0) return -1;
    return open("/tmp/held-liar.fifo", O_RDWR);
  }
  mkdir("/tmp/held-liar-pts", 0700);
  umount2("/tmp/held-liar-pts", MNT_DETACH);
  if (mount("devpts", "/tmp/held-liar-pts", "devpts", 0, "newinstance,ptmxmode=0600") < 0) return -1;
  int m = open("/tmp/held-liar-pts/ptmx", O_RDWR | O_NOCTTY);
  if (m >= 0) {
    int unlock = 0;
    ioctl(m, _IOW('T', 0x31, int), &unlock); /* TIOCSPTLCK */
  }
  return m;
}

static int send_with_fds(int sock, uint32_t type, int32_t value, const int *fds, int nfds) {
  struct msg r = { .type = type, .value = value };
  struct iovec iov = { &r, sizeof r };
  union {
    char buf[CMSG_SPACE(2 * sizeof(int))];
    struct cmsghdr align;
  } u;
  struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = CMSG_SPACE(nfds * sizeof(int)) };
  struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(nfds * sizeof(int));
  memcpy(CMSG_DATA(cm), fds, nfds * sizeof(int));
  return sendmsg(sock, &mh, MSG_NOSIGNAL) == (ssize_t)sizeof r ? 0 : -1;
}

static int open_master(const char *ptmx) {
  int m = open(ptmx, O_RDWR | O_NOCTTY);
  int unlock = 0;
  if (m >= 0) ioctl(m, _IOW('T', 0x31, int), &unlock); /* TIOCSPTLCK */
  return m;
}

/* The fake agent on the host: one session, held, then handed back as a terminal of PTMX. */
static int serve(const char *path, const char *ptmx) {
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
  int l = socket(AF_UNIX, SOCK_SEQPACKET, 0);
  unlink(path);
  if (l < 0 || bind(l, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(l, 4) < 0) return perror("listen"), 1;
  printf("listening\n");
  fflush(stdout);
  int c = accept(l, NULL, NULL);
  static char req[65536];
  if (c < 0 || recv(c, req, sizeof req, 0) <= 0) return perror("accept"), 1;
  int first = open_master("/dev/ptmx");
  if (first < 0 || send_with_fds(c, 1 /* MSG_STARTED */, getpid(), &first, 1) < 0) return perror("start"), 1;
  for (;;) {
    struct msg m;
    ssize_t n = recv(c, &m, sizeof m, 0);
    if (n <= 0) return 0;
    if (n != (ssize_t)sizeof m || m.type != MSG_ATTACH) continue;
    int other = open_master(ptmx), pipefd[2];
    if (other < 0 || pipe(pipefd) < 0) return perror("attach"), 1;
    if (write(pipefd[1], "LIAR-OUTPUT\r\n", 13) < 0) { /* nothing to show then */ }
    close(pipefd[1]);
    int pass[2] = { other, pipefd[0] };
    if (send_with_fds(c, MSG_ATTACHED, getpid(), pass, 2) == 0) printf("answered the re-attach with a terminal of %s\n", ptmx);
    fflush(stdout);
  }
}

int main(int argc, char **argv) {
  if (argc == 4 && !strcmp(argv[1], "serve")) return serve(argv[2], argv[3]);
  if (argc < 3) return fprintf(stderr, "usage: held-shell-liar fifo|devpts WAIT_SECONDS | serve SOCKET PTMX\n"), 2;
  int wait_s = atoi(argv[2]);
  int fd = bait(argv[1]);
  if (fd < 0) return printf("cannot make the bait: %s\n", strerror(errno)), 1;
  int agent = agent_pid();
  if (agent < 0) return printf("no agent\n"), 1;
  int pidfd = (int)syscall(SYS_pidfd_open, agent, 0);
  if (pidfd < 0) return printf("cannot open the agent: %s\n", strerror(errno)), 1;
  struct pollfd p[64];
  int n = 0;
  char dir[64];
  snprintf(dir, sizeof dir, "/proc/%d/fd", agent);
  DIR *d = opendir(dir);
  struct dirent *e;
  while (d && (e = readdir(d)) && n < 64) {
    int target = atoi(e->d_name);
    if (target <= 3) continue;
    char link[80], what[64] = "";
    snprintf(link, sizeof link, "%s/%d", dir, target);
    if (readlink(link, what, sizeof what - 1) < 0 || strncmp(what, "socket:", 7)) continue;
    int s = (int)syscall(SYS_pidfd_getfd, pidfd, target, 0);
    if (s >= 0) p[n++] = (struct pollfd){ .fd = s, .events = POLLIN };
  }
  if (d) closedir(d);
  if (!n) return printf("no connection of the agent to take\n"), 1;
  kill(agent, SIGSTOP);
  printf("impersonating agent %d on %d connections\n", agent, n);
  fflush(stdout);
  int rc = 1;
  if (poll(p, (nfds_t)n, wait_s * 1000) > 0) {
    for (int i = 0; i < n; i++) {
      if (!(p[i].revents & POLLIN)) continue;
      struct msg m;
      if (recv(p[i].fd, &m, sizeof m, 0) != (ssize_t)sizeof m || m.type != MSG_ATTACH) continue;
      int pipefd[2];
      if (pipe(pipefd) < 0) break;
      if (write(pipefd[1], "LIAR-OUTPUT\r\n", 13) < 0) { /* nothing to show then */ }
      close(pipefd[1]);
      struct msg r = { .type = MSG_ATTACHED, .value = 1 };
      struct iovec iov = { &r, sizeof r };
      union {
        char buf[CMSG_SPACE(2 * sizeof(int))];
        struct cmsghdr align;
      } u;
      struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf };
      struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
      cm->cmsg_level = SOL_SOCKET;
      cm->cmsg_type = SCM_RIGHTS;
      cm->cmsg_len = CMSG_LEN(2 * sizeof(int));
      int pass[2] = { fd, pipefd[0] };
      memcpy(CMSG_DATA(cm), pass, sizeof pass);
      if (sendmsg(p[i].fd, &mh, MSG_NOSIGNAL) == (ssize_t)sizeof r) {
        printf("answered with a %s\n", argv[1]);
        rc = 0;
      }
      break;
    }
  }
  fflush(stdout);
  for (int i = 0; i < n; i++) close(p[i].fd);
  kill(agent, SIGCONT);
  return rc;
}
