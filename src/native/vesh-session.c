/*
 * vesh-session: start session processes inside a running VE without paying
 * for one `runc exec` per session.
 *
 * Three modes of one static binary:
 *
 *   vesh-session listen SOCKET COMMAND...   (host)
 *       Bind a SOCK_SEQPACKET socket at SOCKET (mode 0600) and exec COMMAND
 *       with the listening socket as fd 3 and this binary (opened read-only)
 *       as fd 4. COMMAND is `runc exec -d --preserve-fds 2 VE /proc/self/fd/4
 *       agent`: runc puts the agent into the VE's namespaces, cgroups,
 *       capabilities and seccomp filter, exactly as any `runc exec` process.
 *
 *   vesh-session agent                      (inside the VE, started by runc)
 *       Accept requests on fd 3 and fork one child per request. A child
 *       inherits everything the agent got from runc (namespaces, cgroups,
 *       seccomp filter, no_new_privs, rlimits), so this program does no
 *       namespace, cgroup or seccomp setup of its own: it only forks, takes a
 *       terminal from the VE's devpts when asked, drops to the session user
 *       (setgroups/setgid/setuid, which clears capabilities for a non-root
 *       user, as login does) and execs.
 *
 *   vesh-session attach SOCKET TTY [FALLBACK...]   (host)
 *       The request (UID GID GROUPS CWD NENV ENV... NARGV ARGV...) comes in
 *       the environment variable VESH_SESSION_REQUEST: those strings, each
 *       ended by a NUL, in base64. Not on the command line, which every host
 *       user reads with ps (the command, SSH_CONNECTION with the client's
 *       address); a root process's environment only root can read.
 *       Ask the agent at SOCKET for a process; behave like `runc exec` in the
 *       foreground: stdio passes through (without a terminal our own fds 0-2
 *       are handed to the process; with one, the VE terminal is copied to and
 *       from ours, in raw mode, and window-size changes follow ours), signals
 *       are forwarded, and we end as the process ended: with its exit status,
 *       or killed by the signal that killed it (so the caller tells `exit 130`
 *       from death by SIGINT). SIGKILL cannot be caught, so the caller asks
 *       for it with KILL_RELAY_SIG. When no agent answers, run FALLBACK
 *       (runc exec) as a child, forward signals to it, and end the same way,
 *       reading its 128+N exit codes as death by signal N.
 *
 *   vesh-session raise-limits COMMAND...    (host, see cmd_raise_limits)
 *
 *   vesh-session engine-ns KEEP...        (host, see cmd_engine_ns)
 *
 *   vesh-session join PIDS MEMORY DIR[:DIR...] COMMAND...   (host)
 *       Make each cgroup directory DIR (one per hierarchy: pids and memory on
 *       cgroup v1, the one directory on v2), set its pids limit to PIDS and
 *       its memory limit to MEMORY bytes, move ourselves into it and exec
 *       COMMAND. Every host process that serves a VE (session relays, runc
 *       exec) starts this way, so it is charged to that VE's relay cgroup
 *       from its first instruction on: a tenant who opens sessions without
 *       end exhausts his own relay limits, not the host's pids or memory.
 *
 * Only the host can reach SOCKET: it lives in a root-only host directory that
 * is not in the VE's mount namespace, and the agent holds only the listening
 * descriptor. So the agent trusts what a connection asks for.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <sched.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include "fd-passing.h"

#ifndef TIOCGPTPEER
#define TIOCGPTPEER _IO('T', 0x41)
#endif

#define MAGIC 0x76657368u /* "vesh" */
#define REQ_MAX (60 * 1024)
#define MAX_GROUPS 256
#define MAX_CONNS 1024
#define TTY_GID 5
#define AGENT_NAME "vesh-agent"

enum { MSG_STARTED = 1, MSG_EXIT = 2, MSG_ERROR = 3, MSG_SIGNAL = 4, MSG_DETACH = 5, MSG_ATTACH = 6, MSG_ATTACHED = 7 };

/*
 * Held terminals (shells that survive a dropped connection). A request whose
 * `tty` has TTY_HOLD set makes the agent keep its own copy of the terminal's
 * master for as long as the host's connection for it lasts, so the worker's
 * copy going away (its client's TCP gone, the worker killed) is no hang-up.
 * The broker then decides:
 *   MSG_DETACH (value: buffer bytes)  nobody reads the terminal now: the
 *       agent reads it into a buffer that keeps the newest bytes (as a
 *       terminal's scrollback), so the program never blocks on output;
 *   MSG_ATTACH (value: rows << 16 | cols)  a new client takes it: the agent
 *       stops reading, answers MSG_ATTACHED with [master, a pipe holding the
 *       buffered output], sets the new window size and sends SIGWINCH to the
 *       terminal's foreground process group so full-screen programs repaint;
 *   MSG_SIGNAL SIGHUP  a hang-up: the agent lets its copy go first, so the
 *       terminal hangs up as any other once the last copy closes.
 * A host connection that closes ends the hold the same way: only the broker
 * that held the connection could re-attach the terminal.
 */
#define TTY_HOLD 2u
#define HOLD_MIN 1024u
#define HOLD_MAX (1024u * 1024u)

/*
 * "Deliver SIGKILL": a signal the relay can catch, sent by the SSH server in
 * place of SIGKILL (src/ssh/exit-status.ts names the same number). SIGRTMIN+9
 * with glibc; runc, which forwards every signal, passes it on too, and its
 * default action ends the process as well.
 */
#define KILL_RELAY_SIG 43

struct req_head {
  uint32_t magic;
  uint32_t tty;
  uint32_t uid, gid;
  uint16_t rows, cols;
  uint32_t ngroups, nenv, nargv;
  /* then ngroups uint32, then cwd\0 env\0... argv\0... */
};

struct msg {
  uint32_t type;
  int32_t value; /* pid, wait status, errno or signal number */
  char text[200];
};

static void restore_tty(void);

static void die(const char *what) {
  restore_tty();
  fprintf(stderr, "vesh-session: %s: %s\n", what, strerror(errno));
  exit(255);
}

static int send_msg_fds(int fd, uint32_t type, int32_t value, const char *text, const int *pass, int npass) {
  struct msg m;
  memset(&m, 0, sizeof m);
  m.type = type;
  m.value = value;
  if (text) snprintf(m.text, sizeof m.text, "%s", text);
  struct iovec iov = { &m, sizeof m };
  union fd_cmsg u;
  struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
  if (npass > 0) attach_fds(&mh, &u, pass, npass);
  ssize_t n;
  do n = sendmsg(fd, &mh, MSG_NOSIGNAL); while (n < 0 && errno == EINTR);
  return n == (ssize_t)sizeof m ? 0 : -1;
}

static int send_msg(int fd, uint32_t type, int32_t value, const char *text, int pass_fd) {
  return send_msg_fds(fd, type, value, text, &pass_fd, pass_fd >= 0 ? 1 : 0);
}

/* Receive one message; up to `maxfds` passed descriptors land in fds (the rest, if any, are closed). */
static ssize_t recv_with_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds, int *truncated) {
  union fd_cmsg u;
  struct iovec iov = { buf, len };
  struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf };
  ssize_t n;
  do n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC); while (n < 0 && errno == EINTR);
  *nfds = 0;
  if (truncated) *truncated = (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0;
  if (n < 0) return n;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    for (int i = 0; i < count; i++) {
      int fd;
      memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      if (*nfds < maxfds) fds[(*nfds)++] = fd;
      else close(fd);
    }
  }
  return n;
}

/* ------------------------------------------------------------------ listen */

static int cmd_listen(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: vesh-session listen SOCKET COMMAND...\n");
    return 2;
  }
  const char *path = argv[2];
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  if (strlen(path) >= sizeof sa.sun_path) {
    fprintf(stderr, "vesh-session: socket path too long: %s\n", path);
    return 2;
  }
  strcpy(sa.sun_path, path);
  int s = socket(AF_UNIX, SOCK_SEQPACKET, 0);
  if (s < 0) die("socket");
  if (unlink(path) < 0 && errno != ENOENT) die("unlink old socket");
  mode_t old = umask(077);
  if (bind(s, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
  umask(old);
  if (listen(s, 64) < 0) die("listen");
  int self = open("/proc/self/exe", O_RDONLY);
  if (self < 0) die("open /proc/self/exe");
  if (s != 3) {
    if (dup2(s, 3) < 0) die("dup2");
    close(s);
  }
  if (self != 4) {
    if (dup2(self, 4) < 0) die("dup2");
    close(self);
  }
  execvp(argv[3], argv + 3);
  die(argv[3]);
  return 255;
}

/* ------------------------------------------------------------------- agent */

struct conn {
  int fd;
  pid_t pid; /* 0 until a process was started */
  int master; /* our copy of a holdable terminal's master, or -1 */
  int held; /* detached: we read the terminal into ring */
  int master_eof; /* the VE side of the terminal is closed: nothing more to read */
  char *ring;
  size_t cap, start, len;
};

static struct conn conns[MAX_CONNS];
static int nconns;

static void let_go_of_terminal(struct conn *c) {
  if (c->master >= 0) close(c->master);
  c->master = -1;
  c->held = 0;
  free(c->ring);
  c->ring = NULL;
  c->cap = c->start = c->len = 0;
}

static void drop_conn(int i) {
  close(conns[i].fd);
  let_go_of_terminal(&conns[i]);
  conns[i] = conns[--nconns];
}

/* Keep the newest `cap` bytes: what does not fit pushes out the oldest. */
static void ring_put(struct conn *c, const char *data, size_t n) {
  if (n >= c->cap) {
    memcpy(c->ring, data + n - c->cap, c->cap);
    c->start = 0;
    c->len = c->cap;
    return;
  }
  size_t end = (c->start + c->len) % c->cap;
  size_t first = n < c->cap - end ? n : c->cap - end;
  memcpy(c->ring + end, data, first);
  memcpy(c->ring, data + first, n - first);
  c->len += n;
  if (c->len > c->cap) {
    c->start = (c->start + c->len - c->cap) % c->cap;
    c->len = c->cap;
  }
}

static void detach_terminal(struct conn *c, int32_t bytes) {
  if (c->master < 0 || c->held) return;
  size_t cap = bytes < (int32_t)HOLD_MIN ? HOLD_MIN : (uint32_t)bytes > HOLD_MAX ? HOLD_MAX : (size_t)bytes;
  c->ring = malloc(cap);
  if (!c->ring) {
    /* No room to hold it (the VE's memory limit): hang it up as the terminal's end would. */
    let_go_of_terminal(c);
    kill(c->pid, SIGHUP);
    return;
  }
  c->cap = cap;
  c->start = c->len = 0;
  c->held = 1;
  c->master_eof = 0;
  fcntl(c->master, F_SETFL, fcntl(c->master, F_GETFL) | O_NONBLOCK);
}

static void read_held_terminal(struct conn *c) {
  char tmp[16384];
  for (int rounds = 0; rounds < 16; rounds++) {
    ssize_t r = read(c->master, tmp, sizeof tmp);
    if (r > 0) {
      ring_put(c, tmp, (size_t)r);
      continue;
    }
    /* EIO: every slave descriptor is closed (the process is ending). */
    if (r == 0 || (errno != EAGAIN && errno != EINTR)) c->master_eof = 1;
    return;
  }
}

/* Hand the held terminal to a new client: [master, buffered output], then the redraw. */
static void attach_terminal(struct conn *c, int32_t size) {
  if (!c->held) {
    send_msg(c->fd, MSG_ERROR, EINVAL, "no held terminal on this connection", -1);
    return;
  }
  int p[2];
  if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0) {
    send_msg(c->fd, MSG_ERROR, errno, "cannot make a pipe for the held output", -1);
    return;
  }
  if (c->len > 65536) fcntl(p[1], F_SETPIPE_SZ, (int)c->len);
  /* What does not fit the pipe (pipe-user-pages-soft reached) is the oldest part: skip it. */
  long psize = fcntl(p[1], F_GETPIPE_SZ);
  size_t fit = psize > 0 ? (size_t)psize : 65536;
  size_t skip = c->len > fit ? c->len - fit : 0;
  size_t first_off = (c->start + skip) % c->cap, left = c->len - skip;
  size_t first = left < c->cap - first_off ? left : c->cap - first_off;
  if (first && write(p[1], c->ring + first_off, first) < 0) { /* the pipe took what it could */ }
  if (left > first && write(p[1], c->ring, left - first) < 0) { /* likewise */ }
  close(p[1]);
  free(c->ring);
  c->ring = NULL;
  c->cap = c->start = c->len = 0;
  c->held = 0;
  struct winsize old, ws = { .ws_row = (unsigned short)((uint32_t)size >> 16), .ws_col = (unsigned short)(size & 0xffff) };
  int known = ioctl(c->master, TIOCGWINSZ, &old) == 0;
  if (ws.ws_row && ws.ws_col) ioctl(c->master, TIOCSWINSZ, &ws);
  /* An unchanged size makes no SIGWINCH of its own; the program must still repaint for the new client. */
  if (!ws.ws_row || !ws.ws_col || (known && old.ws_row == ws.ws_row && old.ws_col == ws.ws_col)) {
    pid_t fg = tcgetpgrp(c->master);
    if (fg > 0) kill(-fg, SIGWINCH);
  }
  int pass[2] = { c->master, p[0] };
  send_msg_fds(c->fd, MSG_ATTACHED, c->pid, NULL, pass, 2);
  close(p[0]);
}

/* In the forked child: become the session process or die with a message on its stderr. */
static void child_exec(const struct req_head *h, const uint32_t *groups, const char *cwd, char **envv, char **argvv,
                       int master, const int *stdio_fds) {
  sigset_t none;
  sigemptyset(&none);
  for (int sig = 1; sig < NSIG; sig++) signal(sig, SIG_DFL);
  sigprocmask(SIG_SETMASK, &none, NULL);
  if (setsid() < 0) _exit(126);
  if (h->tty) {
    int slave = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY);
    if (slave < 0) {
      char *name = ptsname(master);
      slave = name ? open(name, O_RDWR | O_NOCTTY) : -1;
    }
    if (slave < 0) _exit(126);
    if (ioctl(slave, TIOCSCTTY, 0) < 0) _exit(126);
    /* As login does: the terminal belongs to the session user, group tty. */
    if (fchown(slave, h->uid, TTY_GID) < 0 && fchown(slave, h->uid, (gid_t)-1) < 0) { /* keep going */ }
    fchmod(slave, 0620);
    for (int i = 0; i < 3; i++)
      if (dup2(slave, i) < 0) _exit(126);
    if (slave > 2) close(slave);
    close(master);
  } else {
    for (int i = 0; i < 3; i++)
      if (dup2(stdio_fds[i], i) < 0) _exit(126);
  }
  gid_t gl[MAX_GROUPS];
  for (uint32_t i = 0; i < h->ngroups; i++) gl[i] = groups[i];
  if (setgroups(h->ngroups, gl) < 0 || setresgid(h->gid, h->gid, h->gid) < 0 || setresuid(h->uid, h->uid, h->uid) < 0) {
    dprintf(2, "vesh: cannot become uid %u gid %u: %s\r\n", h->uid, h->gid, strerror(errno));
    _exit(126);
  }
  /* A missing home is not fatal, as with sshd: start in / instead. */
  if (!cwd[0] || chdir(cwd) < 0) {
    if (chdir("/") < 0) { /* nothing better */ }
  }
  close_range(3, ~0U, 0);
  const char *file = argvv[0];
  if (!strchr(file, '/')) {
    const char *p = NULL;
    for (char **e = envv; *e; e++)
      if (!strncmp(*e, "PATH=", 5)) p = *e + 5;
    if (!p) p = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    char buf[PATH_MAX];
    for (const char *s = p; ; ) {
      const char *colon = strchr(s, ':');
      size_t len = colon ? (size_t)(colon - s) : strlen(s);
      if (len && len + strlen(file) + 2 < sizeof buf) {
        memcpy(buf, s, len);
        buf[len] = '/';
        strcpy(buf + len + 1, file);
        execve(buf, argvv, envv);
      }
      if (!colon) break;
      s = colon + 1;
    }
    errno = ENOENT;
  } else {
    execve(file, argvv, envv);
  }
  int err = errno;
  dprintf(2, "vesh: %s: %s\r\n", file, strerror(err));
  _exit(err == ENOENT ? 127 : 126);
}

/* The NUL-terminated string at *off in a message of n bytes (advancing *off past it), or NULL if none ends there. */
static char *next_str(char *buf, size_t n, size_t *off) {
  char *end = *off < n ? memchr(buf + *off, 0, n - *off) : NULL;
  if (!end) return NULL;
  char *str = buf + *off;
  *off = (size_t)(end - buf) + 1;
  return str;
}

/* Parse and run one request; returns the started pid, or -1 after telling the client why not. */
static pid_t start_request(int conn, char *buf, ssize_t n, int truncated, int *fds, int nfds, int *kept_master) {
  struct req_head h;
  if (truncated || n < (ssize_t)sizeof h) {
    send_msg(conn, MSG_ERROR, EMSGSIZE, "request too large or malformed", -1);
    return -1;
  }
  memcpy(&h, buf, sizeof h);
  int hold = (h.tty & TTY_HOLD) != 0;
  h.tty &= 1;
  if (h.magic != MAGIC || h.ngroups > MAX_GROUPS || h.nargv < 1 || h.nargv > 65536 || h.nenv > 65536 ||
      (!h.tty && nfds != 3)) {
    send_msg(conn, MSG_ERROR, EINVAL, "malformed request", -1);
    return -1;
  }
  size_t off = sizeof h;
  uint32_t groups[MAX_GROUPS];
  if (off + h.ngroups * 4 > (size_t)n) goto bad;
  memcpy(groups, buf + off, h.ngroups * 4);
  off += h.ngroups * 4;
  /* The strings cwd, env..., argv..., each NUL-terminated within the message,
     laid out as cwd, env..., NULL, argv..., NULL: envv and argvv point into it. */
  char **slots = calloc(1 + h.nenv + 1 + h.nargv + 1, sizeof(char *));
  if (!slots) {
    send_msg(conn, MSG_ERROR, ENOMEM, "out of memory", -1);
    return -1;
  }
  char **envv = slots + 1, **argvv = slots + 1 + h.nenv + 1;
  int ok = (slots[0] = next_str(buf, (size_t)n, &off)) != NULL;
  for (uint32_t i = 0; ok && i < h.nenv; i++) ok = (envv[i] = next_str(buf, (size_t)n, &off)) != NULL;
  for (uint32_t i = 0; ok && i < h.nargv; i++) ok = (argvv[i] = next_str(buf, (size_t)n, &off)) != NULL;
  if (!ok) {
    free(slots);
    goto bad;
  }

  int master = -1;
  if (h.tty) {
    master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (master < 0 || unlockpt(master) < 0) {
      int e = errno;
      if (master >= 0) close(master);
      free(slots);
      send_msg(conn, MSG_ERROR, e, "cannot open a terminal in the VE (/dev/ptmx)", -1);
      return -1;
    }
    struct winsize ws = { .ws_row = h.rows ? h.rows : 24, .ws_col = h.cols ? h.cols : 80 };
    ioctl(master, TIOCSWINSZ, &ws);
  }
  pid_t pid = fork();
  if (pid == 0) child_exec(&h, groups, slots[0], envv, argvv, master, fds);
  int e = errno;
  free(slots);
  if (pid < 0) {
    if (master >= 0) close(master);
    send_msg(conn, MSG_ERROR, e, "fork failed in the VE (process limit?)", -1);
    return -1;
  }
  send_msg(conn, MSG_STARTED, pid, NULL, master);
  if (master >= 0 && hold) *kept_master = master;
  else if (master >= 0) close(master);
  return pid;
bad:
  send_msg(conn, MSG_ERROR, EINVAL, "malformed request", -1);
  return -1;
}

static int cmd_agent(char **argv, char **envp) {
  int lfd = 3;
  /* runc started us as /proc/self/fd/4; take a name VE root recognises in ps. */
  if (strcmp(argv[0], AGENT_NAME)) {
    char *args[] = { AGENT_NAME, "agent", NULL };
    execve("/proc/self/fd/4", args, envp);
  }
  struct stat st;
  if (fstat(lfd, &st) < 0 || !S_ISSOCK(st.st_mode)) {
    fprintf(stderr, "vesh-session agent: fd 3 is not the listening socket\n");
    return 2;
  }
  close(4); /* our own binary, passed for exec only */
  prctl(PR_SET_NAME, AGENT_NAME); /* comm, which exec set to "4" */
  fcntl(lfd, F_SETFD, FD_CLOEXEC);
  fcntl(lfd, F_SETFL, O_NONBLOCK);
  int devnull = open("/dev/null", O_RDWR);
  if (devnull >= 0) {
    for (int i = 0; i < 3; i++) dup2(devnull, i);
    if (devnull > 2) close(devnull);
  }
  signal(SIGPIPE, SIG_IGN);
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGCHLD);
  sigprocmask(SIG_BLOCK, &mask, NULL);
  int sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
  if (sfd < 0) die("signalfd");

  static char buf[REQ_MAX + 1];
  static struct pollfd pfd[2 * MAX_CONNS + 2];
  static int mpos[MAX_CONNS];
  for (;;) {
    pfd[0] = (struct pollfd){ .fd = lfd, .events = nconns < MAX_CONNS ? POLLIN : 0 };
    pfd[1] = (struct pollfd){ .fd = sfd, .events = POLLIN };
    for (int i = 0; i < nconns; i++) pfd[2 + i] = (struct pollfd){ .fd = conns[i].fd, .events = POLLIN };
    int np = 2 + nconns;
    for (int i = 0; i < nconns; i++) {
      mpos[i] = -1;
      if (conns[i].held && !conns[i].master_eof) {
        mpos[i] = np;
        pfd[np++] = (struct pollfd){ .fd = conns[i].master, .events = POLLIN };
      }
    }
    int nready = poll(pfd, (nfds_t)np, -1);
    if (nready < 0) {
      if (errno == EINTR) continue;
      die("poll");
    }
    if (pfd[1].revents & POLLIN) {
      struct signalfd_siginfo si;
      while (read(sfd, &si, sizeof si) == sizeof si) { }
      int status;
      pid_t pid;
      while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (int i = 0; i < nconns; i++) {
          if (conns[i].pid == pid) {
            send_msg(conns[i].fd, MSG_EXIT, status, NULL, -1);
            drop_conn(i);
            break;
          }
        }
      }
    }
    /* Walk connections from the end: drop_conn moves the last one into the hole. */
    int polled = nconns;
    for (int i = polled - 1; i >= 0; i--) {
      if (pfd[2 + i].fd != conns[i].fd) continue;
      if (mpos[i] >= 0 && conns[i].held && pfd[mpos[i]].fd == conns[i].master &&
          (pfd[mpos[i]].revents & (POLLIN | POLLHUP | POLLERR)))
        read_held_terminal(&conns[i]);
      short re = pfd[2 + i].revents;
      if (!re) continue;
      int fds[3], nfds = 0, trunc = 0;
      ssize_t n = recv_with_fds(conns[i].fd, buf, REQ_MAX, fds, 3, &nfds, &trunc);
      if (n <= 0) {
        /* The host side went away: the process, if any, goes on (it has its own stdio). */
        if (n == 0 || (errno != EAGAIN && errno != EINTR)) drop_conn(i);
      } else if (conns[i].pid == 0) {
        int kept = -1;
        pid_t pid = start_request(conns[i].fd, buf, n, trunc, fds, nfds, &kept);
        if (pid < 0) drop_conn(i);
        else {
          conns[i].pid = pid;
          conns[i].master = kept;
        }
      } else {
        struct msg m;
        if (n >= (ssize_t)sizeof m) {
          memcpy(&m, buf, sizeof m);
          if (m.type == MSG_SIGNAL && m.value > 0 && m.value < NSIG) {
            /* A hang-up: our copy must not keep the terminal from hanging up. */
            if (m.value == SIGHUP) let_go_of_terminal(&conns[i]);
            kill(conns[i].pid, m.value);
          } else if (m.type == MSG_DETACH) {
            detach_terminal(&conns[i], m.value);
          } else if (m.type == MSG_ATTACH) {
            attach_terminal(&conns[i], m.value);
          }
        }
      }
      /* The child has its copies of the passed descriptors by now. */
      for (int k = 0; k < nfds; k++) close(fds[k]);
    }
    if (pfd[0].revents & POLLIN) {
      for (;;) {
        int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (c < 0) break;
        if (nconns >= MAX_CONNS) {
          close(c);
          break;
        }
        conns[nconns++] = (struct conn){ .fd = c, .pid = 0, .master = -1 };
      }
    }
  }
}

/* ------------------------------------------------------------------ attach */

static struct termios saved_tio;
static int tio_saved;

static void restore_tty(void) {
  if (tio_saved) tcsetattr(0, TCSADRAIN, &saved_tio);
}

/* Signals a client may send (RFC 4254), passed on to the process; SIGWINCH is ours. */
static const int forwarded[] = { SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGALRM, SIGABRT, SIGFPE, SIGILL, SIGSEGV, SIGPIPE,
                                 SIGCONT, SIGTSTP, SIGTTIN, SIGTTOU, KILL_RELAY_SIG };

/* End as a process killed by `sig` did (no core file of ours), so our parent sees the same. */
static void die_by_signal(int sig) {
  restore_tty();
  fflush(NULL);
  struct rlimit none = { 0, 0 };
  setrlimit(RLIMIT_CORE, &none);
  signal(sig, SIG_DFL);
  sigset_t one;
  sigemptyset(&one);
  sigaddset(&one, sig);
  sigprocmask(SIG_UNBLOCK, &one, NULL);
  raise(sig);
  exit(128 + sig); /* a signal whose default is not to end the process */
}

/*
 * Whether `sig` ends a process by default. The status we mirror comes from
 * the agent, which VE root can replace: a "killed by SIGSTOP" from it must
 * not stop this host process (it would hang the session, holding its host
 * resources), so only a signal that ends a process is raised; any other is
 * reported as the exit status 128+N.
 */
static int terminates_by_default(int sig) {
  if (sig <= 0 || sig >= NSIG) return 0;
  /* glibc keeps these two for itself (thread cancellation, setxid): raise() would not end us. */
  if (sig == SIGRTMIN - 2 || sig == SIGRTMIN - 1) return 0;
  switch (sig) {
  case SIGCHLD: case SIGCONT: case SIGSTOP: case SIGTSTP: case SIGTTIN: case SIGTTOU: case SIGURG: case SIGWINCH:
    return 0;
  default:
    return 1;
  }
}

static void exit_like(int status) {
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    if (terminates_by_default(sig)) die_by_signal(sig);
    restore_tty();
    exit(sig > 0 && sig < 128 ? 128 + sig : 255);
  }
  exit(WIFEXITED(status) ? WEXITSTATUS(status) : 255);
}

/* Signals runc turns into its exit code 128+N when they kill the process (the rest are ordinary exit codes). */
static int fatal_signal(int sig) {
  switch (sig) {
  case SIGHUP: case SIGINT: case SIGQUIT: case SIGILL: case SIGTRAP: case SIGABRT: case SIGBUS: case SIGFPE: case SIGKILL:
  case SIGUSR1: case SIGSEGV: case SIGUSR2: case SIGPIPE: case SIGALRM: case SIGTERM: case SIGXCPU: case SIGXFSZ: case SIGSYS:
    return 1;
  default:
    return 0;
  }
}

/*
 * No agent: run the engine's own exec as our child, forward what we are sent
 * to it (runc relays signals and window changes to the process), and end as
 * it reports the process ended.
 */
static void run_fallback(char **fallback, const char *why, int sfd) {
  restore_tty();
  if (!fallback || !fallback[0]) {
    fprintf(stderr, "vesh-session: %s\n", why);
    exit(255);
  }
  sigset_t none;
  sigemptyset(&none);
  pid_t pid = fork();
  if (pid < 0) die("fork");
  if (pid == 0) {
    signal(SIGPIPE, SIG_DFL);
    sigprocmask(SIG_SETMASK, &none, NULL);
    execvp(fallback[0], fallback);
    fprintf(stderr, "vesh-session: %s, and the fallback %s failed: %s\n", why, fallback[0], strerror(errno));
    _exit(255);
  }
  int kill_asked = 0;
  for (;;) {
    struct pollfd p = { .fd = sfd, .events = POLLIN };
    if (poll(&p, 1, -1) < 0 && errno != EINTR) die("poll");
    struct signalfd_siginfo si;
    while (read(sfd, &si, sizeof si) == sizeof si) {
      int sig = (int)si.ssi_signo;
      /* Only what our caller sends: the kernel's own (a resize or hang-up of
         the terminal we share with the child, our own SIGPIPE) reaches the
         child by itself. */
      if (sig == SIGCHLD || (pid_t)si.ssi_pid == getpid() || si.ssi_code == SI_KERNEL) continue;
      if (sig == KILL_RELAY_SIG) kill_asked = 1;
      kill(pid, sig);
    }
    int status;
    pid_t w = waitpid(pid, &status, WNOHANG);
    if (w == pid) {
      if (WIFEXITED(status) && WEXITSTATUS(status) > 128) {
        int sig = WEXITSTATUS(status) - 128;
        if (sig == KILL_RELAY_SIG && kill_asked) die_by_signal(SIGKILL);
        if (fatal_signal(sig)) die_by_signal(sig);
      }
      exit_like(status);
    }
  }
}

/* Copy buffer for one direction of the terminal relay. */
struct pipebuf {
  char data[65536];
  size_t len;
};

static int fill(int fd, struct pipebuf *b) {
  ssize_t n = read(fd, b->data + b->len, sizeof b->data - b->len);
  if (n > 0) b->len += (size_t)n;
  return (int)n;
}

static int flush(int fd, struct pipebuf *b) {
  ssize_t n = write(fd, b->data, b->len);
  if (n > 0) {
    memmove(b->data, b->data + n, b->len - (size_t)n);
    b->len -= (size_t)n;
  }
  return (int)n;
}

static void write_all_blocking(int fd, struct pipebuf *b) {
  int fl = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
  while (b->len) {
    if (flush(fd, b) < 0 && errno != EINTR) break;
  }
}

/* Append s and its NUL to a request being built; 0 when it does not fit in REQ_MAX. */
static int append_str(char *req, size_t *off, const char *s) {
  size_t len = strlen(s) + 1;
  if (*off + len > REQ_MAX) return 0;
  memcpy(req + *off, s, len);
  *off += len;
  return 1;
}

/* Decode base64 `in` into `out` (at most `cap` bytes); the length, or -1 for bad input or no room. */
static ssize_t base64_decode(const char *in, char *out, size_t cap) {
  size_t n = 0;
  uint32_t acc = 0;
  int bits = 0;
  for (const char *p = in; *p && *p != '='; p++) {
    int v;
    if (*p >= 'A' && *p <= 'Z') v = *p - 'A';
    else if (*p >= 'a' && *p <= 'z') v = *p - 'a' + 26;
    else if (*p >= '0' && *p <= '9') v = *p - '0' + 52;
    else if (*p == '+') v = 62;
    else if (*p == '/') v = 63;
    else return -1;
    acc = (acc << 6) | (uint32_t)v;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      if (n >= cap) return -1;
      out[n++] = (char)((acc >> bits) & 0xff);
    }
  }
  return (ssize_t)n;
}

#define REQ_ENV "VESH_SESSION_REQUEST"
#define REQ_FIELDS_MAX (2 * 65536 + 8)

static int cmd_attach(int argc, char **argv) {
  /* attach SOCKET TTY [FALLBACK...], the request in $VESH_SESSION_REQUEST */
  if (argc < 4) {
    fprintf(stderr, "vesh-session attach: too few arguments\n");
    return 255;
  }
  const char *sock = argv[2];
  int tty = atoi(argv[3]);
  char **fallback = argc > 4 ? argv + 4 : NULL;
  /* The request: UID GID GROUPS CWD NENV ENV... NARGV ARGV..., NUL-ended strings. */
  static char fields_buf[REQ_MAX];
  static char *field[REQ_FIELDS_MAX];
  const char *encoded = getenv(REQ_ENV);
  ssize_t flen = encoded ? base64_decode(encoded, fields_buf, sizeof fields_buf) : -1;
  /* Nothing we start (the fallback engine) needs it. */
  unsetenv(REQ_ENV);
  if (flen <= 0 || fields_buf[flen - 1] != 0) return fprintf(stderr, "vesh-session attach: no valid request in $%s\n", REQ_ENV), 255;
  int nf = 0;
  for (ssize_t at = 0; at < flen && nf < REQ_FIELDS_MAX; at += (ssize_t)strlen(fields_buf + at) + 1) field[nf++] = fields_buf + at;
  if (nf < 7) return fprintf(stderr, "vesh-session attach: request too short\n"), 255;
  int ai = 0;
  uint32_t uid = (uint32_t)strtoul(field[ai++], NULL, 10);
  uint32_t gid = (uint32_t)strtoul(field[ai++], NULL, 10);
  const char *groups_csv = field[ai++];
  const char *cwd = field[ai++];
  int nenv = atoi(field[ai++]);
  if (nenv < 0 || ai + nenv >= nf) return fprintf(stderr, "vesh-session attach: bad env count\n"), 255;
  char **env = field + ai;
  ai += nenv;
  int nargv = atoi(field[ai++]);
  if (nargv < 1 || ai + nargv > nf) return fprintf(stderr, "vesh-session attach: bad argv count\n"), 255;
  char **pargv = field + ai;

  /* Signals: forwarded ones, SIGWINCH and SIGCHLD come through a signalfd, so none is lost between here and the loop. */
  sigset_t mask;
  sigemptyset(&mask);
  for (size_t i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++) sigaddset(&mask, forwarded[i]);
  sigaddset(&mask, SIGWINCH);
  sigaddset(&mask, SIGCHLD);
  sigprocmask(SIG_BLOCK, &mask, NULL);
  signal(SIGPIPE, SIG_IGN);
  int sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
  if (sfd < 0) die("signalfd");

  /* Build the request. */
  static char req[REQ_MAX];
  struct req_head h = { .magic = MAGIC, .tty = tty ? 1 : 0, .uid = uid, .gid = gid, .nenv = (uint32_t)nenv, .nargv = (uint32_t)nargv };
  uint32_t groups[MAX_GROUPS];
  if (strcmp(groups_csv, "-")) {
    for (const char *p = groups_csv; *p; ) {
      if (h.ngroups >= MAX_GROUPS) break;
      groups[h.ngroups++] = (uint32_t)strtoul(p, (char **)&p, 10);
      if (*p == ',') p++;
      else if (*p) break;
    }
  }
  struct winsize ws;
  if (tty && ioctl(0, TIOCGWINSZ, &ws) == 0) {
    h.rows = ws.ws_row;
    h.cols = ws.ws_col;
  }
  /* Raw mode before anything else, so keys typed early are not echoed by our own terminal. */
  if (tty && isatty(0) && tcgetattr(0, &saved_tio) == 0) {
    struct termios raw = saved_tio;
    cfmakeraw(&raw);
    tio_saved = 1;
    tcsetattr(0, TCSADRAIN, &raw);
  }
  size_t off = sizeof h;
  memcpy(req + off, groups, h.ngroups * 4);
  off += h.ngroups * 4;
  memcpy(req, &h, sizeof h);
  int fits = append_str(req, &off, strcmp(cwd, "-") ? cwd : "");
  for (int i = 0; i < nenv; i++) fits = fits && append_str(req, &off, env[i]);
  for (int i = 0; i < nargv; i++) fits = fits && append_str(req, &off, pargv[i]);
  if (!fits) run_fallback(fallback, "request too large for the session agent", sfd);

  int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (s < 0) die("socket");
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", sock);
  if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
    close(s);
    run_fallback(fallback, "no session agent answers", sfd);
  }

  struct iovec iov = { req, off };
  union fd_cmsg u;
  struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
  const int stdio_fds[3] = { 0, 1, 2 };
  if (!tty) attach_fds(&mh, &u, stdio_fds, 3);
  if (sendmsg(s, &mh, MSG_NOSIGNAL) < 0) {
    if (errno == EMSGSIZE) run_fallback(fallback, "request too large for the session agent", sfd);
    run_fallback(fallback, "the session agent did not take the request", sfd);
  }

  struct msg m;
  int got[1], ngot = 0;
  ssize_t n = recv_with_fds(s, &m, sizeof m, got, 1, &ngot, NULL);
  if (n != (ssize_t)sizeof m) run_fallback(fallback, "the session agent went away", sfd);
  if (m.type == MSG_ERROR) {
    m.text[sizeof m.text - 1] = 0;
    restore_tty();
    fprintf(stderr, "vesh: %s: %s\r\n", m.text, strerror(m.value));
    return 255;
  }
  if (m.type != MSG_STARTED) run_fallback(fallback, "unexpected answer from the session agent", sfd);
  int master = tty ? (ngot ? got[0] : -1) : -1;
  if (tty && master < 0) {
    restore_tty();
    fprintf(stderr, "vesh: the session agent sent no terminal\n");
    return 255;
  }

  if (!tty) {
    /* The process has our stdio now; holding copies would only delay its EOFs. */
    int devnull = open("/dev/null", O_RDWR);
    for (int i = 0; i < 3 && devnull >= 0; i++) dup2(devnull, i);
    if (devnull > 2) close(devnull);
  }

  static struct pipebuf in, out; /* in: our stdin -> VE terminal; out: VE terminal -> our stdout */
  int in_eof = 0, master_eof = 0;
  if (tty) {
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    fcntl(1, F_SETFL, fcntl(1, F_GETFL) | O_NONBLOCK);
    fcntl(master, F_SETFL, fcntl(master, F_GETFL) | O_NONBLOCK);
  }
  for (;;) {
    struct pollfd p[5];
    int np = 0;
    p[np++] = (struct pollfd){ .fd = s, .events = POLLIN };
    p[np++] = (struct pollfd){ .fd = sfd, .events = POLLIN };
    int i_stdin = -1, i_master = -1, i_stdout = -1;
    if (tty) {
      if (!in_eof && in.len < sizeof in.data) { i_stdin = np; p[np++] = (struct pollfd){ .fd = 0, .events = POLLIN }; }
      short me = 0;
      if (!master_eof && out.len < sizeof out.data) me |= POLLIN;
      if (in.len) me |= POLLOUT;
      if (me) { i_master = np; p[np++] = (struct pollfd){ .fd = master, .events = me }; }
      if (out.len) { i_stdout = np; p[np++] = (struct pollfd){ .fd = 1, .events = POLLOUT }; }
    }
    if (poll(p, (nfds_t)np, -1) < 0) {
      if (errno == EINTR) continue;
      die("poll");
    }
    if (p[1].revents & POLLIN) {
      struct signalfd_siginfo si;
      while (read(sfd, &si, sizeof si) == sizeof si) {
        int sig = (int)si.ssi_signo;
        /* Our own SIGPIPE (a write to a closed stdout) is not the client's; SIGCHLD is nobody's here. */
        if (sig == SIGCHLD || (pid_t)si.ssi_pid == getpid()) continue;
        if (sig == SIGWINCH) {
          if (tty && ioctl(0, TIOCGWINSZ, &ws) == 0) ioctl(master, TIOCSWINSZ, &ws);
        } else {
          send_msg(s, MSG_SIGNAL, sig == KILL_RELAY_SIG ? SIGKILL : sig, NULL, -1);
        }
      }
    }
    if (i_stdin >= 0 && (p[i_stdin].revents & (POLLIN | POLLHUP | POLLERR))) {
      int r = fill(0, &in);
      if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) in_eof = 1;
    }
    if (i_master >= 0) {
      if (p[i_master].revents & POLLOUT) {
        if (flush(master, &in) < 0 && errno != EAGAIN && errno != EINTR) in.len = 0;
      }
      if (p[i_master].revents & (POLLIN | POLLHUP | POLLERR)) {
        int r = fill(master, &out);
        /* EIO: nobody holds the VE side open any more. */
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) master_eof = 1;
      }
    }
    if (i_stdout >= 0 && (p[i_stdout].revents & (POLLOUT | POLLERR | POLLHUP))) {
      if (flush(1, &out) < 0 && errno != EAGAIN && errno != EINTR) out.len = 0;
    }
    if (p[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      n = recv(s, &m, sizeof m, 0);
      if (n == (ssize_t)sizeof m && m.type == MSG_EXIT) {
        if (tty) {
          /* The process is gone: what it wrote is in the terminal already; pass it on. */
          while (!master_eof) {
            if (out.len == sizeof out.data) write_all_blocking(1, &out);
            int r = fill(master, &out);
            if (r <= 0 && !(r < 0 && errno == EINTR)) break;
          }
          write_all_blocking(1, &out);
          restore_tty();
        }
        exit_like(m.value);
      }
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        if (tty) {
          write_all_blocking(1, &out);
          restore_tty();
        }
        fprintf(stderr, "vesh: the session agent in the VE went away\n");
        return 255;
      }
    }
  }
}

/* ------------------------------------------------------------------- join */

/* Write `text` to DIR/NAME; 0, or -1 with errno (ENOENT: this hierarchy has no such file). */
static int write_cg_file(const char *dir, const char *name, const char *text) {
  char file[PATH_MAX];
  if (snprintf(file, sizeof file, "%s/%s", dir, name) >= (int)sizeof file) return errno = ENAMETOOLONG, -1;
  int fd = open(file, O_WRONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return -1;
  ssize_t n;
  do n = write(fd, text, strlen(text)); while (n < 0 && errno == EINTR);
  int e = errno;
  close(fd);
  errno = e;
  return n == (ssize_t)strlen(text) ? 0 : -1;
}

/* A number in DIR/NAME; "max" and anything unreadable are LLONG_MAX (no limit known). */
static long long read_cg_number(const char *dir, const char *name) {
  char file[PATH_MAX], buf[64];
  if (snprintf(file, sizeof file, "%s/%s", dir, name) >= (int)sizeof file) return LLONG_MAX;
  int fd = open(file, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return strcmp(name, "pids.current") ? LLONG_MAX : 0; /* no pids controller here: nothing counted */
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return LLONG_MAX;
  buf[n] = 0;
  char *end;
  long long v = strtoll(buf, &end, 10);
  return end == buf ? LLONG_MAX : v;
}

/* mkdir -p for a cgroup directory (the instance's parent may not exist in a hierarchy yet). */
static int make_cg_dir(char *dir) {
  if (mkdir(dir, 0755) == 0 || errno == EEXIST) return 0;
  if (errno != ENOENT) return -1;
  char *slash = strrchr(dir, '/');
  if (!slash || slash == dir) return -1;
  *slash = 0;
  int r = make_cg_dir(dir);
  *slash = '/';
  if (r < 0) return -1;
  return mkdir(dir, 0755) == 0 || errno == EEXIST ? 0 : -1;
}

static int cmd_join(int argc, char **argv) {
  /* join PIDS MEMORY DIR[:DIR...] COMMAND... */
  if (argc < 6) {
    fprintf(stderr, "usage: vesh-session join PIDS MEMORY DIR[:DIR...] COMMAND...\n");
    return 255;
  }
  const char *pids = argv[2], *memory = argv[3];
  static char dirs[8192];
  if (snprintf(dirs, sizeof dirs, "%s", argv[4]) >= (int)sizeof dirs) return fprintf(stderr, "vesh: cgroup list too long\n"), 255;
  for (char *dir = strtok(dirs, ":"); dir; dir = strtok(NULL, ":")) {
    if (make_cg_dir(dir) < 0) {
      fprintf(stderr, "vesh: cannot make the relay cgroup %s: %s\r\n", dir, strerror(errno));
      return 255;
    }
    /* Limits first, then us: never a moment in the cgroup without them. A
       memory limit below what is in use already fails (EBUSY): the one set
       before holds meanwhile. */
    if (write_cg_file(dir, "pids.max", pids) < 0 && errno != ENOENT) {
      fprintf(stderr, "vesh: cannot set pids.max of %s: %s\r\n", dir, strerror(errno));
      return 255;
    }
    if (write_cg_file(dir, "memory.limit_in_bytes", memory) < 0 && errno == ENOENT) write_cg_file(dir, "memory.max", memory);
    if (write_cg_file(dir, "cgroup.procs", "0") < 0) {
      fprintf(stderr, "vesh: cannot join the relay cgroup %s: %s\r\n", dir, strerror(errno));
      return 255;
    }
    /* pids.max stops fork and clone in the cgroup, not a process moving in:
       count ourselves, and leave (ending) when we made it one too many. */
    if (read_cg_number(dir, "pids.current") > read_cg_number(dir, "pids.max")) {
      fprintf(stderr, "vesh: this VE already has as many host processes serving its sessions as it may (%s): close some sessions and try again\r\n", pids);
      return 255;
    }
  }
  execvp(argv[5], argv + 5);
  fprintf(stderr, "vesh: cannot run %s: %s\r\n", argv[5], strerror(errno));
  return errno == ENOENT ? 127 : 126;
}

/* -------------------------------------------------------------- engine-ns */

/* Whether mount point MP is PATH, lies on the way to it, or lies below it. */
static int mount_on_path(const char *mp, const char *path) {
  size_t m = strlen(mp), p = strlen(path);
  if (m <= p) return strncmp(mp, path, m) == 0 && (m == 1 || path[m] == '/' || path[m] == '\0');
  return strncmp(mp, path, p) == 0 && (p == 1 || mp[p] == '/');
}

/* mountinfo's octal escapes (\040 for a space, \012 for a newline...), decoded in place. */
static void unescape_mount_point(char *s) {
  char *w = s;
  for (char *r = s; *r; r++) {
    if (r[0] == '\\' && r[1] >= '0' && r[1] <= '3' && r[2] >= '0' && r[2] <= '7' && r[3] >= '0' && r[3] <= '7') {
      *w++ = (char)((r[1] - '0') * 64 + (r[2] - '0') * 8 + (r[3] - '0'));
      r += 3;
    } else {
      *w++ = *r;
    }
  }
  *w = '\0';
}

static char *read_whole(const char *file) {
  int fd = open(file, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return NULL;
  size_t cap = 1 << 16, len = 0;
  char *buf = malloc(cap);
  for (;;) {
    if (!buf) break;
    if (len + 1 >= cap) {
      char *bigger = realloc(buf, cap *= 2);
      if (!bigger) { free(buf); buf = NULL; break; }
      buf = bigger;
    }
    ssize_t n = read(fd, buf + len, cap - len - 1);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    len += (size_t)n;
  }
  close(fd);
  if (buf) buf[len] = '\0';
  return buf;
}

/*
 * engine-ns KEEP...: make a mount namespace for the engine and hold it until
 * our stdin ends. The caller opens /proc/PID/ns/mnt once we print "ready"
 * and passes that descriptor to each VE start (vesh-setup mount
 * --engine-ns), which makes the engine's namespace from it rather than from
 * the host's. unshare(CLONE_NEWNS) copies every mount of the namespace it
 * starts from, and runc reads /proc/self/mountinfo several times and copies
 * the namespace again for the VE: with every VE's disk and root file system
 * mounted on the host (2 per VE), a start at 1000 VEs paid for 2000 mounts
 * several times over (measured: +40 ms of CPU per raw `runc run` with 2000
 * mounts more).
 *
 * A private copy of the host's namespace (nothing mounted on the host later
 * appears in it) that keeps only the mounts on the way to or below a KEEP
 * path (the engine's binaries, libraries and state directory) and the
 * kernel's /proc, /sys and /dev trees; every other mount is detached, so
 * this namespace holds no VE's file systems and keeps no other file system
 * of the host busy.
 */
static int cmd_engine_ns(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: vesh-session engine-ns KEEP...\n");
    return 2;
  }
  if (unshare(CLONE_NEWNS) != 0) die("unshare a mount namespace for the engine");
  if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) die("make the engine's namespace private");
  if (chdir("/") != 0) die("chdir /");
  char *info = read_whole("/proc/self/mountinfo");
  if (!info) die("read /proc/self/mountinfo");
  size_t n = 0, cap = 256;
  char **points = malloc(cap * sizeof *points);
  if (!points) die("malloc");
  for (char *line = info, *next; line && *line; line = next) {
    next = strchr(line, '\n');
    if (next) *next++ = '\0';
    /* ID PARENT MAJ:MIN ROOT MOUNTPOINT ...: the fifth field. */
    char *f = line;
    for (int i = 0; i < 4 && f; i++) {
      f = strchr(f, ' ');
      if (f) f++;
    }
    if (!f) continue;
    char *end = strchr(f, ' ');
    if (end) *end = '\0';
    unescape_mount_point(f);
    if (n == cap) {
      char **bigger = realloc(points, (cap *= 2) * sizeof *points);
      if (!bigger) die("realloc");
      points = bigger;
    }
    points[n++] = f;
  }
  static const char *const api[] = { "/proc", "/sys", "/dev" };
  /* Children come after their parents in mountinfo: the last first, so each detach takes only itself. */
  for (size_t i = n; i-- > 0;) {
    int keep = 0;
    for (size_t k = 0; k < sizeof api / sizeof api[0] && !keep; k++) keep = mount_on_path(points[i], api[k]);
    for (int k = 2; k < argc && !keep; k++) keep = argv[k][0] == '/' && mount_on_path(points[i], argv[k]);
    /* A mount already gone with its parent, or hidden under another: nothing to do. */
    if (!keep && umount2(points[i], MNT_DETACH | UMOUNT_NOFOLLOW) != 0 && errno != EINVAL && errno != ENOENT) {
      char what[PATH_MAX + 32];
      snprintf(what, sizeof what, "detach %s in the engine's namespace", points[i]);
      die(what);
    }
  }
  free(points);
  free(info);
  if (write(1, "ready\n", 6) != 6) die("write");
  for (;;) {
    char c;
    ssize_t r = read(0, &c, 1);
    if (r == 0 || (r < 0 && errno != EINTR)) return 0;
  }
}

/* ----------------------------------------------------------- raise-limits */

/*
 * raise-limits COMMAND...: exec COMMAND (the engine's create/run) with no
 * limit on POSIX message queue bytes, queued signals and locked memory. A
 * new user namespace takes its ceiling for these counters from its creator's
 * limits, and the kernel charges every VE's use of them to that creator
 * (host root) as well: with host root's usual 800 KiB of message queues, one
 * VE using its share would leave none for the others. Each VE process is
 * held to its own limits from the bundle instead (oci-bundle.ts).
 */
static int cmd_raise_limits(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: vesh-session raise-limits COMMAND...\n");
    return 2;
  }
  const int which[] = { RLIMIT_MSGQUEUE, RLIMIT_SIGPENDING, RLIMIT_MEMLOCK };
  for (size_t i = 0; i < sizeof which / sizeof which[0]; i++) {
    struct rlimit unl = { RLIM_INFINITY, RLIM_INFINITY };
    if (setrlimit(which[i], &unl) < 0) { /* not root: the engine runs with what we have */ }
  }
  execvp(argv[2], argv + 2);
  fprintf(stderr, "vesh: cannot run %s: %s\n", argv[2], strerror(errno));
  return errno == ENOENT ? 127 : 126;
}

int main(int argc, char **argv, char **envp) {
  if (argc >= 2 && !strcmp(argv[1], "listen")) return cmd_listen(argc, argv);
  if (argc >= 2 && !strcmp(argv[1], "agent")) return cmd_agent(argv, envp);
  if (argc >= 2 && !strcmp(argv[1], "attach")) return cmd_attach(argc, argv);
  if (argc >= 2 && !strcmp(argv[1], "join")) return cmd_join(argc, argv);
  if (argc >= 2 && !strcmp(argv[1], "raise-limits")) return cmd_raise_limits(argc, argv);
  if (argc >= 2 && !strcmp(argv[1], "engine-ns")) return cmd_engine_ns(argc, argv);
  fprintf(stderr, "usage: vesh-session listen SOCKET COMMAND... | agent | attach SOCKET TTY [FALLBACK...] | join PIDS MEMORY DIRS COMMAND... | raise-limits COMMAND... | engine-ns KEEP...\n");
  return 2;
}
