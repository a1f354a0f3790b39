/*
 * vesh-forward: the port-forward helper, run INSIDE a VE by the engine
 * (`runc exec --detach --preserve-fds 2 --user UID:GID VE /proc/self/fd/4`),
 * so it has every confinement a session process has: the VE's user, mount,
 * pid, network, uts and ipc namespaces, its cgroups, capabilities, seccomp
 * filter and no_new_privs, as the account's user. Every socket it makes is
 * the VE's: `localhost` is the VE's loopback, names resolve through the VE's
 * own /etc/hosts and resolv.conf, listeners are the VE's.
 *
 * fd 3 is our end of a SOCK_SEQPACKET socketpair whose other end is held by
 * vesh-forward-relay, a host process outside the VE that started us through
 * the engine. We speak fixed-size frames (forward-frame.h) on it, never
 * Node's IPC: the tenant can take this end over, and the relay checks every
 * frame and descriptor before the SSH server sees anything. The messages
 * themselves are described in src/ssh/forward-protocol.ts. Connected and
 * accepted sockets are handed to the relay, which checks them and hands them
 * to the server, which relays them to the SSH channel; no byte of the
 * forwarded data passes through here. When the relay goes away (EOF on fd 3),
 * so does this helper, closing its listeners.
 *
 * Built static (scripts/build-native.sh): the VE may hold no C library. Name
 * resolution uses the static C library's resolver ("files" and "dns", which
 * glibc builds in), in a child process per lookup (see struct connecting);
 * literal addresses and "localhost" need none of it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "fd-passing.h"
#include "forward-frame.h"

#define CHAN 3
#define MAX_LISTENERS 64
#define MAX_CONNECTS 64
#define CONNECT_TIMEOUT_MS 10000
#define MAX_ADDRS 16

/* ------------------------------------------------------------ output */

static void remove_agent_sockets(void);

/* One frame to the relay, with `fd` passed alongside when fd >= 0. Blocking: the relay always reads. */
static void send_frame(const struct fwd_frame *f, int fd) {
  struct iovec iov = { (void *)f, sizeof *f };
  union fd_cmsg u;
  struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
  if (fd >= 0) attach_fds(&mh, &u, &fd, 1);
  for (;;) {
    /* A datagram goes whole or not at all. */
    if (sendmsg(CHAN, &mh, MSG_NOSIGNAL) >= 0) return;
    if (errno != EINTR && errno != EAGAIN) {
      remove_agent_sockets(); /* the relay is gone, and with it the SSH connection */
      _exit(0);
    }
  }
}

static void send_simple(uint32_t type, long id, long port, int fd) {
  struct fwd_frame f;
  fwd_frame_init(&f, type, (uint32_t)id);
  f.port = (uint32_t)port;
  send_frame(&f, fd);
}

static void send_failed(long id, const char *code, const char *message) {
  struct fwd_frame f;
  fwd_frame_init(&f, FWD_FAILED, (uint32_t)id);
  snprintf(f.addr, sizeof f.addr, "%s", code);
  snprintf(f.text, sizeof f.text, "%s", message);
  send_frame(&f, -1);
}

static void send_errno(long id, int err, const char *what) {
  char m[FWD_TEXT_LEN];
  /* Cut to what a frame holds: the start of a message says what failed. */
  if (snprintf(m, sizeof m, "%s: %s", what, strerror(err)) >= (int)sizeof m) m[sizeof m - 1] = 0;
  const char *name = strerrorname_np(err);
  send_failed(id, name ? name : "ERROR", m);
}

/* ------------------------------------------------------------ input */

/* A request from the relay, as the handlers below take it. */
struct req {
  uint32_t type;
  char host[FWD_ADDR_LEN]; /* or a Unix socket's path */
  long id, port;
  uint32_t flags, mask;
};

/* ------------------------------------------------------------ sockets */

/*
 * A listener. A Unix one (streamlocal-forward, the agent socket) keeps its
 * path; the agent's also the directory made for it, both removed when the
 * listener closes or the relay goes away (the socket goes with the SSH
 * connection, as OpenSSH's does). A -R socket stays, as with OpenSSH, which is
 * what StreamLocalBindUnlink is for.
 */
struct listener {
  int fd;
  long id;
  int agent;
  char path[FWD_UNIX_PATH_MAX + 1];
  char dir[FWD_UNIX_PATH_MAX + 1];
};
/* Up to MAX_ADDRS addresses of one lookup, in its order. */
struct addrs { int n; socklen_t lens[MAX_ADDRS]; struct sockaddr_storage a[MAX_ADDRS]; };
/*
 * A connect on its way. A name that is not a literal address is looked up
 * by a child process (resolving: fd is the pipe it answers on, pid the
 * child), so a slow or silent DNS server in the VE holds up that connect
 * only, never the other forwards of the connection; then each address is
 * tried in turn (connecting: fd is the socket).
 */
struct connecting {
  int fd;
  int resolving;
  pid_t pid;
  long id;
  struct addrs addrs; /* the addresses to try */
  int cur;            /* and the one being tried */
  char host[256];
  long port;
  long long deadline;
};

static void remove_agent_socket(const struct listener *l);
static struct listener listeners[MAX_LISTENERS];
static int nlisteners;
static struct connecting connects[MAX_CONNECTS];
static int nconnects;

static long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Addresses for host:port. "localhost" is the VE's loopback whether or not the VE's /etc/hosts says so. */
static int resolve(const char *host, long port, int flags, struct addrinfo **out) {
  char ports[16];
  snprintf(ports, sizeof ports, "%ld", port);
  struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV | flags };
  if (!strcmp(host, "localhost")) host = "127.0.0.1";
  return getaddrinfo(host, ports, &hints, out);
}

/* Keep up to MAX_ADDRS of a lookup's addresses. */
static void take_addrs(struct addrs *out, const struct addrinfo *ai) {
  out->n = 0;
  for (; ai && out->n < MAX_ADDRS; ai = ai->ai_next) {
    if (ai->ai_addrlen > sizeof out->a[0]) continue;
    memcpy(&out->a[out->n], ai->ai_addr, ai->ai_addrlen);
    out->lens[out->n++] = ai->ai_addrlen;
  }
}

/*
 * The resolver child: looks the name up and writes, in one write (less than
 * PIPE_BUF, so the parent reads it whole), the getaddrinfo result code and
 * the addresses. It dies with its parent.
 */
struct resolved { int gai; struct addrs addrs; };
_Static_assert(sizeof(struct resolved) <= 4096, "one atomic pipe write");

static void resolver_child(int wfd, const char *host, long port) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() == 1) _exit(0);
  /* Nothing of the parent's (the channel, listeners, other connects): the answer goes out on fd 1. */
  if (dup2(wfd, 1) < 0) _exit(1);
  close_range(3, ~0U, 0);
  static struct resolved res;
  struct addrinfo *ai = NULL;
  res.gai = resolve(host, port, 0, &ai);
  if (!res.gai) take_addrs(&res.addrs, ai);
  ssize_t w = write(1, &res, sizeof res);
  _exit(w == (ssize_t)sizeof res ? 0 : 1);
}

static void format_addr(const struct sockaddr_storage *ss, char *addr, size_t cap, int *port) {
  addr[0] = 0;
  *port = 0;
  if (ss->ss_family == AF_INET) {
    const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
    inet_ntop(AF_INET, &a->sin_addr, addr, (socklen_t)cap);
    *port = ntohs(a->sin_port);
  } else if (ss->ss_family == AF_INET6) {
    const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
    inet_ntop(AF_INET6, &a->sin6_addr, addr, (socklen_t)cap);
    *port = ntohs(a->sin6_port);
  }
}

static void drop_connect(int i) {
  if (connects[i].fd >= 0) close(connects[i].fd);
  if (connects[i].resolving && connects[i].pid > 0) kill(connects[i].pid, SIGKILL);
  connects[i] = connects[--nconnects];
}

/* Start a non-blocking connect to the current address, moving on past ones that fail at once. 0: under way; -1: none left (errno). */
static int connect_next(struct connecting *c) {
  int err = ECONNREFUSED;
  for (; c->cur < c->addrs.n; c->cur++) {
    const struct sockaddr *sa = (const struct sockaddr *)&c->addrs.a[c->cur];
    int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) { err = errno; continue; }
    if (connect(fd, sa, c->addrs.lens[c->cur]) == 0 || errno == EINPROGRESS) {
      c->fd = fd;
      return 0;
    }
    err = errno;
    close(fd);
  }
  c->fd = -1;
  errno = err;
  return -1;
}

static void send_resolve_failed(const struct connecting *c, int gai) {
  char m[400];
  snprintf(m, sizeof m, "cannot resolve %s in the VE: %s", c->host, gai_strerror(gai));
  send_failed(c->id, "ENOTFOUND", m);
}

/* Addresses known (c->addrs): start connecting, or report and drop entry i. */
static void start_connecting(int i) {
  struct connecting *c = &connects[i];
  c->resolving = 0;
  if (connect_next(c) < 0) {
    char what[320];
    snprintf(what, sizeof what, "connect to %s:%ld", c->host, c->port);
    send_errno(c->id, errno, what);
    drop_connect(i);
  }
}

static void do_connect(const struct req *r) {
  if (nconnects >= MAX_CONNECTS) {
    send_failed(r->id, "EMFILE", "too many connections being opened at once");
    return;
  }
  int i = nconnects;
  struct connecting *c = &connects[i];
  memset(c, 0, sizeof *c);
  c->fd = -1;
  c->id = r->id;
  c->port = r->port;
  snprintf(c->host, sizeof c->host, "%s", r->host);
  c->deadline = now_ms() + CONNECT_TIMEOUT_MS;
  /* A literal address (or localhost) needs no lookup: straight on. */
  struct addrinfo *ai = NULL;
  int g = resolve(r->host, r->port, AI_NUMERICHOST, &ai);
  if (!g) {
    take_addrs(&c->addrs, ai);
    freeaddrinfo(ai);
    nconnects++;
    start_connecting(i);
    return;
  }
  if (g != EAI_NONAME) {
    send_resolve_failed(c, g);
    return;
  }
  int p[2];
  if (pipe2(p, O_CLOEXEC) < 0) {
    send_errno(c->id, errno, "a pipe for the name lookup");
    return;
  }
  pid_t pid = fork();
  if (pid < 0) {
    int err = errno;
    close(p[0]);
    close(p[1]);
    send_errno(c->id, err, "a process for the name lookup");
    return;
  }
  if (pid == 0) {
    close(p[0]);
    resolver_child(p[1], r->host, r->port);
  }
  close(p[1]);
  c->fd = p[0];
  c->pid = pid;
  c->resolving = 1;
  nconnects++;
}

/* The resolver child answered (or died): take its addresses and connect. */
static void finish_resolve(int i) {
  struct connecting *c = &connects[i];
  static struct resolved res;
  ssize_t n = read(c->fd, &res, sizeof res);
  close(c->fd);
  c->fd = -1;
  c->pid = 0; /* gone or going: SIGCHLD is ignored, so the kernel reaps it */
  if (n != (ssize_t)sizeof res) {
    send_failed(c->id, "ENOTFOUND", "the name lookup in the VE failed");
    drop_connect(i);
    return;
  }
  if (res.gai) {
    send_resolve_failed(c, res.gai);
    drop_connect(i);
    return;
  }
  c->addrs = res.addrs;
  if (c->addrs.n < 0 || c->addrs.n > MAX_ADDRS) c->addrs.n = 0;
  for (int k = 0; k < c->addrs.n; k++)
    if (c->addrs.lens[k] > sizeof c->addrs.a[k]) c->addrs.lens[k] = sizeof c->addrs.a[k];
  c->cur = 0;
  start_connecting(i);
}

/* A pending connect became writable (or timed out): report it, or try the next address. */
static void finish_connect(int i, int timed_out) {
  struct connecting *c = &connects[i];
  if (c->resolving) {
    if (!timed_out) {
      finish_resolve(i);
      return;
    }
    char m[400];
    snprintf(m, sizeof m, "looking up %s in the VE took longer than %d s", c->host, CONNECT_TIMEOUT_MS / 1000);
    send_failed(c->id, "ETIMEDOUT", m);
    drop_connect(i);
    return;
  }
  int err = 0;
  socklen_t len = sizeof err;
  if (timed_out) err = ETIMEDOUT;
  else if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
  if (!err) {
    send_simple(FWD_CONNECTED, c->id, 0, c->fd);
    drop_connect(i); /* closes our copy: the server has its own now */
    return;
  }
  close(c->fd);
  c->fd = -1;
  if (!timed_out && c->cur < c->addrs.n) {
    c->cur++;
    if (connect_next(c) == 0) return;
  }
  char what[320];
  snprintf(what, sizeof what, "connect to %s:%ld", c->host, c->port);
  send_errno(c->id, err, what);
  drop_connect(i);
}

static void do_listen(const struct req *r) {
  for (int i = 0; i < nlisteners; i++)
    if (listeners[i].id == r->id) return;
  if (nlisteners >= MAX_LISTENERS) {
    send_failed(r->id, "EMFILE", "too many listeners on this connection");
    return;
  }
  struct addrinfo *ai = NULL;
  int g = resolve(r->host, r->port, AI_PASSIVE, &ai);
  if (g) {
    char m[400];
    snprintf(m, sizeof m, "cannot resolve %s in the VE: %s", r->host, gai_strerror(g));
    send_failed(r->id, "ENOTFOUND", m);
    return;
  }
  int fd = -1, err = EADDRNOTAVAIL;
  for (struct addrinfo *a = ai; a && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) { err = errno; continue; }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, a->ai_addr, a->ai_addrlen) < 0 || listen(fd, 511) < 0) {
      err = errno;
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(ai);
  if (fd < 0) {
    char what[320];
    snprintf(what, sizeof what, "listen on %s:%ld", r->host, r->port);
    send_errno(r->id, err, what);
    return;
  }
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  char addr[64];
  int port = (int)r->port;
  if (getsockname(fd, (struct sockaddr *)&ss, &len) == 0) format_addr(&ss, addr, sizeof addr, &port);
  listeners[nlisteners++] = (struct listener){ .fd = fd, .id = r->id };
  send_simple(FWD_LISTENING, r->id, port, -1);
}

static void do_unlisten(long id) {
  for (int i = 0; i < nlisteners; i++) {
    if (listeners[i].id == id) {
      close(listeners[i].fd);
      remove_agent_socket(&listeners[i]);
      listeners[i] = listeners[--nlisteners];
      break;
    }
  }
  send_simple(FWD_CLOSED, id, 0, -1);
}

static void accept_all(int i) {
  for (;;) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    int fd = accept4(listeners[i].fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return; /* EAGAIN, or a connection that went away before we took it */
    struct fwd_frame f;
    int port;
    fwd_frame_init(&f, FWD_ACCEPTED, (uint32_t)listeners[i].id);
    format_addr(&ss, f.addr, sizeof f.addr, &port);
    f.port = (uint32_t)port;
    send_frame(&f, fd);
    close(fd);
  }
}

/* ------------------------------------------------------------ Unix sockets */

/*
 * Every path is the VE's: this process runs in the VE's mount namespace as
 * the account's user, so the kernel resolves it there (a symlink to a host
 * path names the VE's file of that name, /proc/<pid>/root the VE's own
 * processes' roots) and decides with the user's credentials what may be
 * connected to or bound. Only absolute paths that fit sun_path are taken:
 * no abstract sockets (a leading NUL), no silent truncation.
 */
static int unix_address(const char *path, struct sockaddr_un *sa, socklen_t *len) {
  size_t n = strlen(path);
  if (path[0] != '/' || n > FWD_UNIX_PATH_MAX) return -1;
  memset(sa, 0, sizeof *sa);
  sa->sun_family = AF_UNIX;
  memcpy(sa->sun_path, path, n);
  *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
  return 0;
}

static void send_bad_path(long id, const char *path) {
  char m[FWD_TEXT_LEN];
  snprintf(m, sizeof m, "not an absolute socket path of at most %d bytes: %.120s", FWD_UNIX_PATH_MAX, path);
  send_failed(id, strlen(path) > FWD_UNIX_PATH_MAX ? "ENAMETOOLONG" : "EINVAL", m);
}

static void do_connect_unix(const struct req *r) {
  struct sockaddr_un sa;
  socklen_t len;
  if (unix_address(r->host, &sa, &len) < 0) { send_bad_path(r->id, r->host); return; }
  /*
   * Non-blocking: a Unix connect does not wait for the listener to accept,
   * only for room in its backlog; a full backlog fails at once (EAGAIN)
   * rather than holding up every other forward of the connection.
   */
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) { send_errno(r->id, errno, "a socket"); return; }
  if (connect(fd, (struct sockaddr *)&sa, len) < 0) {
    int err = errno;
    close(fd);
    char what[320];
    snprintf(what, sizeof what, "connect to %.200s", r->host);
    send_errno(r->id, err, what);
    return;
  }
  send_simple(FWD_CONNECTED, r->id, 0, fd);
  close(fd);
}

/* Bind and listen on `path` under umask `mask`. The fd, or -1 with errno. */
static int bind_unix(const char *path, uint32_t mask, int unlink_first) {
  struct sockaddr_un sa;
  socklen_t len;
  if (unix_address(path, &sa, &len) < 0) { errno = EINVAL; return -1; }
  if (unlink_first) {
    /* Only a socket is removed (StreamLocalBindUnlink): a file or FIFO in the way still fails the bind. */
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode) && unlink(path) < 0) return -1;
  }
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  mode_t old = umask((mode_t)(mask & 0777));
  int b = bind(fd, (struct sockaddr *)&sa, len);
  int err = errno;
  umask(old);
  if (b < 0 || listen(fd, 128) < 0) {
    if (b == 0) { err = errno; unlink(path); }
    close(fd);
    errno = err;
    return -1;
  }
  return fd;
}

static int listener_room(long id) {
  for (int i = 0; i < nlisteners; i++)
    if (listeners[i].id == id) return 0;
  if (nlisteners >= MAX_LISTENERS) {
    send_failed(id, "EMFILE", "too many listeners on this connection");
    return 0;
  }
  return 1;
}

static void do_listen_unix(const struct req *r) {
  if (!listener_room(r->id)) return;
  if (r->host[0] != '/' || strlen(r->host) > FWD_UNIX_PATH_MAX) { send_bad_path(r->id, r->host); return; }
  int fd = bind_unix(r->host, r->mask, (r->flags & FWD_UNLINK_FIRST) != 0);
  if (fd < 0) {
    char what[320];
    snprintf(what, sizeof what, "listen on %.200s", r->host);
    send_errno(r->id, errno, what);
    return;
  }
  struct listener *l = &listeners[nlisteners++];
  memset(l, 0, sizeof *l);
  l->fd = fd;
  l->id = r->id;
  snprintf(l->path, sizeof l->path, "%s", r->host);
  send_simple(FWD_LISTENING, r->id, 0, -1);
}

/* The agent socket: a fresh 0700 directory in the VE's /tmp (mkdtemp), made by and so owned by the session's user, and agent.<pid> in it. */
static void do_listen_agent(const struct req *r) {
  if (!listener_room(r->id)) return;
  char dir[] = "/tmp/ssh-XXXXXXXXXX";
  /* glibc's mkdtemp draws the last six: the first four come from here, so all ten are random (as OpenSSH's are). */
  static const char letters[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
  unsigned char rnd[4];
  if (getrandom(rnd, sizeof rnd, GRND_NONBLOCK) == (ssize_t)sizeof rnd)
    for (size_t i = 0; i < sizeof rnd; i++) dir[9 + i] = letters[rnd[i] % (sizeof letters - 1)];
  if (!mkdtemp(dir)) { send_errno(r->id, errno, "a directory for the agent socket in /tmp"); return; }
  struct listener l;
  memset(&l, 0, sizeof l);
  snprintf(l.dir, sizeof l.dir, "%s", dir);
  snprintf(l.path, sizeof l.path, "%s/agent.%ld", dir, (long)getpid());
  int fd = bind_unix(l.path, r->mask, 0);
  if (fd < 0) {
    int err = errno;
    rmdir(dir);
    send_errno(r->id, err, "the agent socket");
    return;
  }
  l.fd = fd;
  l.id = r->id;
  l.agent = 1;
  listeners[nlisteners++] = l;
  struct fwd_frame f;
  fwd_frame_init(&f, FWD_LISTENING, (uint32_t)r->id);
  snprintf(f.addr, sizeof f.addr, "%s", l.path);
  send_frame(&f, -1);
}

/* An agent socket and its directory go when its listener does. */
static void remove_agent_socket(const struct listener *l) {
  if (!l->agent) return;
  unlink(l->path);
  rmdir(l->dir);
}

static void remove_agent_sockets(void) {
  for (int i = 0; i < nlisteners; i++) remove_agent_socket(&listeners[i]);
}

/* A frame from the relay (which sends only well-formed ones; checked anyway, as everything that crosses). */
static void handle_frame(const struct fwd_frame *f) {
  if (f->magic != FWD_MAGIC || !fwd_strings_ok(f)) return;
  struct req r = { .type = f->type, .id = (long)f->id, .port = (long)f->port, .flags = f->flags, .mask = f->mask };
  snprintf(r.host, sizeof r.host, "%s", f->addr);
  int port_ok = r.port >= 0 && r.port <= 65535;
  if (r.type == FWD_CONNECT && port_ok && r.port > 0 && r.host[0]) do_connect(&r);
  else if (r.type == FWD_LISTEN && port_ok && r.host[0]) do_listen(&r);
  else if (r.type == FWD_UNLISTEN) do_unlisten(r.id);
  else if (r.type == FWD_CONNECT_UNIX && r.host[0]) do_connect_unix(&r);
  else if (r.type == FWD_LISTEN_UNIX && r.host[0]) do_listen_unix(&r);
  else if (r.type == FWD_LISTEN_AGENT) do_listen_agent(&r);
}

int main(void) {
  struct stat st;
  int type = 0;
  socklen_t tlen = sizeof type;
  if (fstat(CHAN, &st) < 0 || !S_ISSOCK(st.st_mode) || getsockopt(CHAN, SOL_SOCKET, SO_TYPE, &type, &tlen) < 0 || type != SOCK_SEQPACKET) {
    fprintf(stderr, "vesh-forward: fd 3 is not the relay's channel; the SSH server starts this helper through vesh-forward-relay\n");
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  signal(SIGCHLD, SIG_IGN); /* name-lookup children are reaped by the kernel */
  prctl(PR_SET_NAME, "vesh-forward"); /* comm, which exec set to "4": a name VE root recognises in ps */
  /*
   * Not dumpable: another process of the account's user in the VE can then
   * neither ptrace us nor take our descriptors (pidfd_getfd). VE root still
   * can (CAP_SYS_PTRACE in the VE's user namespace); the relay on the host is
   * what makes that harmless.
   */
  prctl(PR_SET_DUMPABLE, 0);
  /* Nothing else of the caller's: the channel, stderr for our own complaints. */
  close_range(4, ~0U, 0);
  int devnull = open("/dev/null", O_RDWR);
  if (devnull >= 0) {
    dup2(devnull, 0);
    dup2(devnull, 1);
    if (devnull > 2) close(devnull);
  }
  send_simple(FWD_READY, 0, 0, -1);

  struct pollfd pfd[1 + MAX_LISTENERS + MAX_CONNECTS];
  for (;;) {
    int np = 0;
    pfd[np++] = (struct pollfd){ .fd = CHAN, .events = POLLIN };
    for (int i = 0; i < nlisteners; i++) pfd[np++] = (struct pollfd){ .fd = listeners[i].fd, .events = POLLIN };
    for (int i = 0; i < nconnects; i++) pfd[np++] = (struct pollfd){ .fd = connects[i].fd, .events = connects[i].resolving ? POLLIN : POLLOUT };
    long long soonest = -1;
    for (int i = 0; i < nconnects; i++)
      if (soonest < 0 || connects[i].deadline < soonest) soonest = connects[i].deadline;
    int timeout = soonest < 0 ? -1 : (int)(soonest > now_ms() ? soonest - now_ms() : 0);
    if (poll(pfd, (nfds_t)np, timeout) < 0) {
      if (errno == EINTR) continue;
      remove_agent_sockets();
      return 1;
    }
    /* Connects first, from the end (drop_connect moves the last into the hole), then listeners, then the channel. */
    long long t = now_ms();
    for (int i = nconnects - 1; i >= 0; i--) {
      int k = 1 + nlisteners + i;
      if (pfd[k].revents & (POLLIN | POLLOUT | POLLERR | POLLHUP)) finish_connect(i, 0);
      else if (connects[i].deadline <= t) finish_connect(i, 1);
    }
    for (int i = 0; i < nlisteners && 1 + i < np; i++)
      if (pfd[1 + i].fd == listeners[i].fd && (pfd[1 + i].revents & POLLIN)) accept_all(i);
    if (pfd[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      /* One frame a datagram; one byte of room more tells an oversized one, which is dropped. */
      static union { struct fwd_frame f; char raw[sizeof(struct fwd_frame) + 1]; } in;
      ssize_t n = recv(CHAN, &in, sizeof in, MSG_DONTWAIT);
      if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN)) {
        remove_agent_sockets(); /* the relay went away: so did the SSH connection */
        return 0;
      }
      if (n == (ssize_t)sizeof in.f) handle_frame(&in.f);
    }
  }
}
