/*
 * vesh-forward-relay: the host side of port forwarding for one SSH
 * connection. The broker spawns it with one end of an AF_UNIX SOCK_SEQPACKET
 * socketpair as fd 3 (the server's channel) and the port-forward helper
 * program (vesh-forward) opened read-only as fd 4:
 *
 *   vesh-forward-relay -- ENGINE ARGS...
 *
 * where ENGINE ARGS is `runc exec --detach --preserve-fds 2 --user U:G VE
 * /proc/self/fd/4`. We make a SOCK_SEQPACKET socketpair, run the engine with
 * its VE end as fd 3 (and the program as fd 4), so the helper runs inside the
 * VE with all of its confinement, and then translate between the two sides:
 *
 *   JSON frames (fd 3)  <->  this relay  <->  frames (forward-frame.h)  <->  helper in the VE
 *
 * On fd 3 every message is one SEQPACKET datagram holding one flat JSON
 * object (src/ssh/forward-protocol.ts has the set), with the socket it
 * carries, if any, as SCM_RIGHTS on that same datagram: the server's side
 * (src/broker/forward-relay-client.ts, over src/system/frame-channel.ts)
 * takes the descriptor as a raw fd and never reads from it itself, so the
 * first bytes a VE service sends (an SSH or SMTP banner) reach whoever the
 * fd is handed to. Node's own IPC channel is not used: it turns a received
 * descriptor into a socket that starts reading at once, and it trusts its
 * peer completely.
 *
 * Why a relay: the helper's end is reachable by the tenant (VE root, or the
 * account's user, can ptrace it or take its descriptors with pidfd_getfd).
 * This process is host root outside the VE's namespaces, which the VE can
 * neither see nor trace; it reads fixed-size frames with a fixed-size
 * control buffer, accepts a frame only as an answer to a request it
 * forwarded (or for a listener the helper reported bound), and passes on
 * only descriptors it checked itself: connected, non-listening
 * AF_INET/AF_INET6 SOCK_STREAM TCP sockets, or AF_UNIX stream sockets for an
 * id it asked a Unix connect or listener for (streamlocal, the agent). Everything it writes to the
 * server it wrote itself, and every socket it hands to the server it made
 * itself: the bytes of each forwarded connection are copied here between the
 * VE's socket and a socketpair whose other end the server holds (see
 * "forwarded connections" for why).
 *
 * The helper's stderr (which the engine hands it) is read here with a cap
 * until the helper is ready, and shown only when the start fails; after that
 * it is closed, so nothing the VE writes there costs the server anything.
 *
 * Once the engine has exited (runc --detach: the helper runs), we drop to
 * nobody (65534) with no_new_privs and stay non-dumpable, before reading a
 * single frame from the VE.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "fd-passing.h"
#include "forward-frame.h"

#define SERVER 3
#define PROGRAM 4
#define NOBODY 65534
/* Requests in flight and listeners: beyond what one SSH connection may ask for (its channel budget, MAX_REMOTE_FORWARDS_PER_CONNECTION). */
#define MAX_PENDING 256
#define MAX_LISTENING 64
/* The server's requests are small flat objects; a frame beyond this is malformed. */
#define SERVER_FRAME_MAX 4096
/* What we keep of the helper's stderr for a failed start, and how much we read of it at most. */
#define ERR_TAIL 1024
#define ERR_READ_MAX 65536
/* At most one report of rejected frames to the server per this many ms (a hostile VE can send many). */
#define REJECT_REPORT_MS 10000
/* Control-message room for more descriptors than any frame may carry, so extra ones arrive and are closed here. */
#define CMSG_FDS 16
/* Forwarded connections at once: the connection's channel budget (MAX_CHANNELS_PER_CONNECTION) and some room for -R arrivals the server refuses. */
#define MAX_STREAMS 160
/* Bytes held per direction of a connection: one read's worth, passed on before the next read. */
#define STREAM_BUF 65536

static int ve = -1;
static pid_t engine_pid = -1;
static int engine_pidfd = -1;
static int errfd = -1;
static int ready;

static char errtail[ERR_TAIL];
static size_t errlen, errtotal;

struct idset { uint32_t ids[MAX_PENDING]; int n; int cap; };
static struct idset pending_connect = { .cap = MAX_PENDING };
static struct idset pending_listen = { .cap = MAX_LISTENING };
static struct idset listening = { .cap = MAX_LISTENING };
/* The same for Unix sockets (streamlocal) and the agent socket: their answers carry AF_UNIX sockets, and a listener no port. */
static struct idset pending_connect_unix = { .cap = MAX_PENDING };
static struct idset pending_listen_unix = { .cap = MAX_LISTENING };
static struct idset pending_agent = { .cap = MAX_LISTENING };
static struct idset listening_unix = { .cap = MAX_LISTENING };

static unsigned long rejected, rejected_reported;
static long long last_reject_report = -REJECT_REPORT_MS;
static char last_reject_reason[128];

static long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int idset_has(const struct idset *s, uint32_t id) {
  for (int i = 0; i < s->n; i++)
    if (s->ids[i] == id) return 1;
  return 0;
}

static int idset_add(struct idset *s, uint32_t id) {
  if (idset_has(s, id)) return 1;
  if (s->n >= s->cap) return 0;
  s->ids[s->n++] = id;
  return 1;
}

static int idset_remove(struct idset *s, uint32_t id) {
  for (int i = 0; i < s->n; i++) {
    if (s->ids[i] == id) {
      s->ids[i] = s->ids[--s->n];
      return 1;
    }
  }
  return 0;
}

/* ------------------------------------------------------------ to the server (frames) */

/*
 * One frame to the server: `body` (a JSON object) as one datagram, with `fd`
 * as SCM_RIGHTS on it when fd >= 0. A datagram goes whole or not at all.
 * Blocking: the server always reads. The server's socketpair is
 * non-blocking (that flag is on our end's open file description, which only
 * we hold), so a full queue is waited out with poll rather than spun on.
 */
static void server_msg(int fd, const char *body) {
  struct iovec iov = { (void *)body, strlen(body) };
  union fd_cmsg u;
  struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
  if (fd >= 0) attach_fds(&mh, &u, &fd, 1);
  for (;;) {
    if (sendmsg(SERVER, &mh, MSG_NOSIGNAL) >= 0) return;
    if (errno == EINTR) continue;
    if (errno == EAGAIN) {
      struct pollfd p = { .fd = SERVER, .events = POLLOUT };
      poll(&p, 1, -1);
      continue;
    }
    _exit(0); /* the server is gone */
  }
}

/* A JSON string body from bytes the VE chose: quotes, backslashes, controls and non-ASCII escaped. */
static void json_escape(char *out, size_t cap, const char *s) {
  size_t o = 0;
  for (; *s && o + 7 < cap; s++) {
    unsigned char ch = (unsigned char)*s;
    if (ch == '"' || ch == '\\') { out[o++] = '\\'; out[o++] = (char)ch; }
    else if (ch < 0x20 || ch >= 0x7f) o += (size_t)snprintf(out + o, cap - o, "\\u%04x", ch);
    else out[o++] = (char)ch;
  }
  out[o] = 0;
}

static void server_failed(uint32_t id, const char *code, const char *message) {
  char c[160], m[1100], body[1400];
  json_escape(c, sizeof c, code);
  json_escape(m, sizeof m, message);
  snprintf(body, sizeof body, "{\"t\":\"failed\",\"id\":%u,\"code\":\"%s\",\"message\":\"%s\"}", id, c, m);
  server_msg(-1, body);
}

/*
 * A frame from the VE was dropped: tell the server (which logs it, so an
 * admin sees a tenant tampering with its helper), at most once per
 * REJECT_REPORT_MS, with the count since the last report.
 */
static void reject(const char *reason) {
  rejected++;
  snprintf(last_reject_reason, sizeof last_reject_reason, "%s", reason);
  long long t = now_ms();
  if (t - last_reject_report < REJECT_REPORT_MS) return;
  last_reject_report = t;
  char r[300], body[400];
  json_escape(r, sizeof r, last_reject_reason);
  snprintf(body, sizeof body, "{\"t\":\"rejected\",\"count\":%lu,\"reason\":\"%s\"}", rejected - rejected_reported, r);
  rejected_reported = rejected;
  server_msg(-1, body);
}

/* ------------------------------------------------------------ from the server (frames) */

/*
 * The server's messages are flat JSON objects of strings and integers
 * ({"t":"connect","id":1,"host":"localhost","port":80}), one a frame.
 * Anything else in a frame (nested values, escapes beyond the simple ones,
 * text after the object, a NUL byte) makes it malformed, and a malformed
 * frame is ignored.
 */
struct req {
  char t[16];
  char host[FWD_ADDR_LEN];
  char path[FWD_ADDR_LEN];
  long id, port, mask;
  int has_id, has_port, has_mask, unlink;
};

static const char *skip_ws(const char *p) {
  while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n') p++;
  return p;
}

static const char *parse_string(const char *p, char *out, size_t cap) {
  if (*p != '"') return NULL;
  p++;
  size_t o = 0;
  while (*p && *p != '"') {
    char ch = *p++;
    if (ch == '\\') {
      ch = *p++;
      if (ch == 'n') ch = '\n';
      else if (ch == 't') ch = '\t';
      else if (ch != '"' && ch != '\\' && ch != '/') return NULL;
    }
    if (o + 1 >= cap) return NULL;
    out[o++] = ch;
  }
  if (*p != '"') return NULL;
  out[o] = 0;
  return p + 1;
}

static int parse_req(const char *p, struct req *r) {
  memset(r, 0, sizeof *r);
  p = skip_ws(p);
  if (*p++ != '{') return -1;
  p = skip_ws(p);
  if (*p == '}') return *skip_ws(p + 1) ? -1 : 0;
  for (;;) {
    char key[32], sval[FWD_ADDR_LEN];
    p = parse_string(skip_ws(p), key, sizeof key);
    if (!p) return -1;
    p = skip_ws(p);
    if (*p++ != ':') return -1;
    p = skip_ws(p);
    if (*p == '"') {
      p = parse_string(p, sval, sizeof sval);
      if (!p) return -1;
      /* A value too long for its field makes the frame malformed, never a truncated value. */
      size_t len = strlen(sval);
      if (!strcmp(key, "t")) { if (len >= sizeof r->t) return -1; memcpy(r->t, sval, len + 1); }
      else if (!strcmp(key, "host")) { if (len >= sizeof r->host) return -1; memcpy(r->host, sval, len + 1); }
      else if (!strcmp(key, "path")) { if (len >= sizeof r->path) return -1; memcpy(r->path, sval, len + 1); }
    } else if (*p == '-' || (*p >= '0' && *p <= '9')) {
      char *end;
      errno = 0;
      long v = strtol(p, &end, 10);
      if (errno || end == p) return -1;
      p = end;
      if (!strcmp(key, "id")) { r->id = v; r->has_id = 1; }
      else if (!strcmp(key, "port")) { r->port = v; r->has_port = 1; }
      else if (!strcmp(key, "mask")) { r->mask = v; r->has_mask = 1; }
    } else if (!strncmp(p, "true", 4) || !strncmp(p, "null", 4)) {
      if (!strcmp(key, "unlink") && *p == 't') r->unlink = 1;
      p += 4;
    } else if (!strncmp(p, "false", 5)) {
      p += 5;
    } else {
      return -1;
    }
    p = skip_ws(p);
    if (*p == ',') { p++; continue; }
    if (*p == '}') return *skip_ws(p + 1) ? -1 : 0;
    return -1;
  }
}

/* One frame to the helper. Never blocks: a helper that stops reading fails that request, never the relay. 0 or -1. */
static int ve_send(const struct fwd_frame *f) {
  for (;;) {
    if (send(ve, f, sizeof *f, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0) return 0;
    if (errno == EINTR) continue;
    if (errno == EAGAIN) return -1;
    _exit(0); /* the helper is gone: so is forwarding for this connection */
  }
}

/* A Unix socket path as a frame carries it: absolute (no abstract socket, no leading NUL) and within sun_path. */
static int unix_path_ok(const char *p) {
  size_t n = strlen(p);
  if (p[0] != '/' || n > FWD_UNIX_PATH_MAX) return 0;
  for (size_t i = 0; i < n; i++)
    if ((unsigned char)p[i] < 0x20 || (unsigned char)p[i] == 0x7f) return 0;
  return 1;
}

/* connect_unix {id, path}, listen_unix {id, path, mask, unlink}, listen_agent {id, mask}: on to the helper, which does them in the VE. */
static void handle_unix_request(const struct req *r, uint32_t id) {
  int connect = !strcmp(r->t, "connect_unix"), agent = !strcmp(r->t, "listen_agent");
  int mask_ok = r->has_mask && r->mask >= 0 && r->mask <= 0777;
  if ((!agent && !unix_path_ok(r->path)) || (!connect && !mask_ok)) return; /* malformed: ignored, as any */
  struct idset *set = connect ? &pending_connect_unix : agent ? &pending_agent : &pending_listen_unix;
  if (!idset_add(set, id)) {
    server_failed(id, "EMFILE", connect ? "too many connections being opened at once" : "too many listeners being opened at once");
    return;
  }
  struct fwd_frame f;
  fwd_frame_init(&f, connect ? FWD_CONNECT_UNIX : agent ? FWD_LISTEN_AGENT : FWD_LISTEN_UNIX, id);
  if (!agent) snprintf(f.addr, sizeof f.addr, "%s", r->path);
  if (!connect) f.mask = (uint32_t)r->mask;
  if (!connect && !agent && r->unlink) f.flags = FWD_UNLINK_FIRST;
  if (ve_send(&f) < 0) {
    idset_remove(set, id);
    server_failed(id, "EAGAIN", "the port-forward helper in the VE is not taking requests");
  }
}

static void handle_server_request(const char *text) {
  struct req r;
  if (parse_req(text, &r) < 0) return;
  if (!r.has_id || r.id < 0 || r.id > (long)UINT32_MAX) return;
  uint32_t id = (uint32_t)r.id;
  int port_ok = r.has_port && r.port >= 0 && r.port <= 65535;
  int connect = !strcmp(r.t, "connect") && port_ok && r.port > 0 && r.host[0];
  int listen = !strcmp(r.t, "listen") && port_ok && r.host[0];
  if (connect || listen) {
    struct idset *set = connect ? &pending_connect : &pending_listen;
    if (!idset_add(set, id)) {
      server_failed(id, "EMFILE", connect ? "too many connections being opened at once" : "too many listeners being opened at once");
      return;
    }
    struct fwd_frame f;
    fwd_frame_init(&f, connect ? FWD_CONNECT : FWD_LISTEN, id);
    f.port = (uint32_t)r.port;
    snprintf(f.addr, sizeof f.addr, "%s", r.host);
    if (ve_send(&f) < 0) {
      idset_remove(set, id);
      server_failed(id, "EAGAIN", "the port-forward helper in the VE is not taking requests");
    }
  } else if (!strcmp(r.t, "connect_unix") || !strcmp(r.t, "listen_unix") || !strcmp(r.t, "listen_agent")) {
    handle_unix_request(&r, id);
  } else if (!strcmp(r.t, "unlisten")) {
    /* Forgotten here first: whatever the helper does, nothing more is accepted for this id. */
    idset_remove(&listening, id);
    idset_remove(&pending_listen, id);
    idset_remove(&listening_unix, id);
    idset_remove(&pending_listen_unix, id);
    idset_remove(&pending_agent, id);
    struct fwd_frame f;
    fwd_frame_init(&f, FWD_UNLISTEN, id);
    ve_send(&f);
  }
}

/*
 * Take one request frame from the server: one recvmsg is one datagram. A
 * frame that does not fit SERVER_FRAME_MAX, carries control data (the server
 * never sends us a descriptor) or holds a NUL is malformed: its descriptors
 * are closed and the frame is ignored, as a malformed one is.
 */
static void read_server_frame(void) {
  static char text[SERVER_FRAME_MAX + 1];
  union { char buf[CMSG_SPACE(sizeof(int) * CMSG_FDS)]; struct cmsghdr align; } ctl;
  struct iovec iov = { text, SERVER_FRAME_MAX };
  struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf, .msg_controllen = sizeof ctl.buf };
  ssize_t n = recvmsg(SERVER, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  if (n < 0) {
    if (errno == EINTR || errno == EAGAIN) return;
    _exit(0);
  }
  if (n == 0) _exit(0); /* the server closed the channel (it never sends an empty frame): we, and so the helper, are done */
  int control = 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
    control = 1;
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS && c->cmsg_len >= CMSG_LEN(0)) {
      size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < k; i++) {
        int fd;
        memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        close(fd);
      }
    }
  }
  if (control || (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || memchr(text, 0, (size_t)n)) return;
  text[n] = 0;
  handle_server_request(text);
}

/* ------------------------------------------------------------ forwarded connections */

/*
 * Why the bytes of a forwarded connection pass through here instead of the
 * VE's socket going to the server: whoever holds a descriptor of that socket
 * shares its open file description, O_NONBLOCK included, and VE root can hold
 * one (it can answer a connect with a socket of its own, or take the
 * helper's with pidfd_getfd). A socket the server's event loop reads and
 * writes could then be switched to blocking from inside the VE, and one
 * write() to a peer that never reads would stop the server for every tenant.
 * So the server gets one end of a socketpair made here, which nobody else
 * ever holds, and we copy between it and the VE's socket with MSG_DONTWAIT,
 * which does not block whatever the VE does to the socket's flags. A
 * stalled or hostile peer stalls only its own connection; each direction
 * holds at most STREAM_BUF bytes, and reading stops while they wait, so the
 * kernel's socket buffers keep their backpressure end to end. EOF travels as
 * a half-close each way; the pair closes when both directions are done, or
 * at once on an error.
 */
struct half {
  char *buf;
  size_t off, len;
  int eof;  /* the source said EOF */
  int shut; /* and we passed it on (shutdown SHUT_WR of the destination) */
};

struct stream {
  int ve, srv;
  struct half down; /* VE → server */
  struct half up;   /* server → VE */
};

static struct stream streams[MAX_STREAMS];
static int nstreams;

static void close_stream(int i) {
  struct stream *st = &streams[i];
  close(st->ve);
  close(st->srv);
  free(st->down.buf);
  free(st->up.buf);
  streams[i] = streams[--nstreams];
}

/* Take `ve` (a checked connected socket) into a stream; returns the server's end of a new socketpair, or -1 (ve closed). */
static int open_stream(int ve_fd) {
  int sp[2];
  if (nstreams >= MAX_STREAMS || socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sp) < 0) {
    close(ve_fd);
    return -1;
  }
  struct stream *st = &streams[nstreams];
  memset(st, 0, sizeof *st);
  st->down.buf = malloc(STREAM_BUF);
  st->up.buf = malloc(STREAM_BUF);
  if (!st->down.buf || !st->up.buf) {
    free(st->down.buf);
    free(st->up.buf);
    close(sp[0]);
    close(sp[1]);
    close(ve_fd);
    return -1;
  }
  st->ve = ve_fd;
  st->srv = sp[0];
  nstreams++;
  return sp[1];
}

/* Move what is there from src to dst through h, never blocking. -1: the connection failed. */
static int pump(int src, int dst, struct half *h, int readable, int writable) {
  if (readable && h->len == 0 && !h->eof) {
    ssize_t n = recv(src, h->buf, STREAM_BUF, MSG_DONTWAIT);
    if (n > 0) {
      h->off = 0;
      h->len = (size_t)n;
      writable = 1; /* try at once: the destination has room more often than not */
    } else if (n == 0) {
      h->eof = 1;
    } else if (errno != EAGAIN && errno != EINTR) {
      return -1;
    }
  }
  if (writable && h->len > 0) {
    ssize_t n = send(dst, h->buf + h->off, h->len, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      h->off += (size_t)n;
      h->len -= (size_t)n;
    } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
      return -1;
    }
  }
  if (h->eof && h->len == 0 && !h->shut) {
    shutdown(dst, SHUT_WR);
    h->shut = 1;
  }
  return 0;
}

/* ------------------------------------------------------------ from the VE (frames) */

/*
 * Whether `fd` is what a forward may carry: a connected TCP socket over IPv4
 * or IPv6 (is_unix = 0), or a connected AF_UNIX stream socket (is_unix = 1, for
 * streamlocal and the agent), never a listener. NULL when it is, else why not.
 */
static const char *check_stream_socket(int fd, int is_unix) {
  struct stat st;
  if (fstat(fd, &st) < 0 || !S_ISSOCK(st.st_mode)) return "a descriptor that is not a socket";
  int v = 0;
  socklen_t len = sizeof v;
  if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &v, &len) < 0) return "a socket of no domain";
  if (is_unix ? v != AF_UNIX : (v != AF_INET && v != AF_INET6)) return is_unix ? "a socket that is not AF_UNIX" : "a socket that is not AF_INET or AF_INET6";
  len = sizeof v;
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &v, &len) < 0 || v != SOCK_STREAM) return "a socket that is not SOCK_STREAM";
  len = sizeof v;
  if (!is_unix && (getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &v, &len) < 0 || v != IPPROTO_TCP)) return "a socket that is not TCP";
  len = sizeof v;
  if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &v, &len) < 0 || v != 0) return "a listening socket";
  struct sockaddr_storage ss;
  socklen_t sl = sizeof ss;
  if (getpeername(fd, (struct sockaddr *)&ss, &sl) < 0) return "a socket that is not connected";
  return NULL;
}

/* An address the helper reported for a peer: shown to the SSH client, so only a literal IPv4/IPv6 address. */
static void peer_address(const char *in, char *out, size_t cap) {
  unsigned char buf[sizeof(struct in6_addr)];
  if (inet_pton(AF_INET, in, buf) == 1 || inet_pton(AF_INET6, in, buf) == 1) snprintf(out, cap, "%s", in);
  else out[0] = 0;
}

static void close_all(const int *fds, int n) {
  for (int i = 0; i < n; i++) close(fds[i]);
}

/*
 * The helper bound a Unix listener. A -R socket's answer names no port and
 * no path (the server knows the path it asked for); the agent socket's names
 * the path the helper chose, which must look like what it makes
 * (/tmp/ssh-XXXXXXXXXX/agent.PID) before it is passed on and shown to the
 * session as SSH_AUTH_SOCK.
 */
static void listening_unix_reported(const struct fwd_frame *f) {
  int agent = idset_has(&pending_agent, f->id);
  char body[400];
  if (agent) {
    /* Exactly /tmp/ssh-XXXXXXXXXX/agent.DIGITS: ten letters or digits (mkdtemp's), no "..", nothing else. */
    const char *p = f->addr;
    size_t n = strlen(p);
    int ok = n <= FWD_UNIX_PATH_MAX && !strncmp(p, "/tmp/ssh-", 9) && n > 9 + 10 + 7 && !strncmp(p + 19, "/agent.", 7);
    for (size_t i = 9; ok && i < 19; i++)
      ok = (p[i] >= 'A' && p[i] <= 'Z') || (p[i] >= 'a' && p[i] <= 'z') || (p[i] >= '0' && p[i] <= '9');
    for (size_t i = 26; ok && i < n; i++) ok = p[i] >= '0' && p[i] <= '9';
    if (!ok || f->port != 0) {
      idset_remove(&pending_agent, f->id);
      server_failed(f->id, "EPROTO", "the port-forward helper in the VE reported an agent socket path it does not make");
      reject("an agent socket at an unexpected path");
      return;
    }
    idset_remove(&pending_agent, f->id);
    snprintf(body, sizeof body, "{\"t\":\"listening\",\"id\":%u,\"port\":0,\"path\":\"%s\"}", f->id, p);
  } else {
    if (f->port != 0) { reject("a Unix listener on a port"); return; }
    idset_remove(&pending_listen_unix, f->id);
    snprintf(body, sizeof body, "{\"t\":\"listening\",\"id\":%u,\"port\":0}", f->id);
  }
  if (!idset_add(&listening_unix, f->id)) { server_failed(f->id, "EMFILE", "too many listeners on this connection"); return; }
  server_msg(-1, body);
}

/* Take one datagram from the helper: check it whole, pass on what is right, drop the rest. */
static void read_ve_frame(void) {
  union { struct fwd_frame f; char raw[sizeof(struct fwd_frame) + 1]; } in;
  union { char buf[CMSG_SPACE(sizeof(int) * CMSG_FDS)]; struct cmsghdr align; } ctl;
  struct iovec iov = { &in, sizeof in };
  struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf, .msg_controllen = sizeof ctl.buf };
  ssize_t n = recvmsg(ve, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  if (n < 0) {
    if (errno == EINTR || errno == EAGAIN) return;
    _exit(0);
  }
  if (n == 0) _exit(0); /* the helper closed its end: forwarding for this connection is over */

  int fds[CMSG_FDS], nfds = 0, foreign_cmsg = 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS && c->cmsg_len >= CMSG_LEN(0)) {
      size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < k && nfds < CMSG_FDS; i++) memcpy(&fds[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
    } else {
      foreign_cmsg = 1;
    }
  }
  const struct fwd_frame *f = &in.f;
  const char *why = NULL;
  if (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) why = "an oversized frame or too many descriptors";
  else if (foreign_cmsg) why = "a frame with control data other than descriptors";
  else if (n != (ssize_t)sizeof *f) why = "a frame of the wrong size";
  else if (f->magic != FWD_MAGIC || !fwd_strings_ok(f)) why = "a malformed frame";
  if (why) {
    close_all(fds, nfds);
    reject(why);
    return;
  }

  int carries = f->type == FWD_CONNECTED || f->type == FWD_ACCEPTED;
  if (nfds != (carries ? 1 : 0)) {
    close_all(fds, nfds);
    if (f->type == FWD_CONNECTED && idset_remove(&pending_connect, f->id)) server_failed(f->id, "EPROTO", "the port-forward helper in the VE answered without exactly one socket");
    reject(carries ? "a connection frame without exactly one descriptor" : "a descriptor with a frame that carries none");
    return;
  }

  char body[1200];
  switch (f->type) {
    case FWD_READY:
      if (ready) { reject("a second ready"); return; }
      ready = 1;
      /* Started: what the VE writes to its stderr from now on is not ours to read (L11). */
      if (errfd >= 0) { close(errfd); errfd = -1; }
      server_msg(-1, "{\"t\":\"ready\"}");
      return;
    case FWD_CONNECTED: {
      int is_unix = 0;
      if (!idset_remove(&pending_connect, f->id)) {
        if (!idset_remove(&pending_connect_unix, f->id)) { close(fds[0]); reject("a connection nobody asked for"); return; }
        is_unix = 1;
      }
      const char *bad = check_stream_socket(fds[0], is_unix);
      if (bad) {
        close(fds[0]);
        char m[200];
        snprintf(m, sizeof m, "the port-forward helper in the VE handed over %s", bad);
        server_failed(f->id, "EPROTO", m);
        reject(bad);
        return;
      }
      int server_end = open_stream(fds[0]);
      if (server_end < 0) {
        server_failed(f->id, "EMFILE", "too many forwarded connections on this SSH connection");
        return;
      }
      snprintf(body, sizeof body, "{\"t\":\"connected\",\"id\":%u}", f->id);
      server_msg(server_end, body);
      close(server_end); /* the server has its own now */
      return;
    }
    case FWD_ACCEPTED: {
      int is_unix = idset_has(&listening_unix, f->id);
      if (!is_unix && !idset_has(&listening, f->id)) { close(fds[0]); reject("a connection for no listener"); return; }
      const char *bad = check_stream_socket(fds[0], is_unix);
      if (bad) { close(fds[0]); reject(bad); return; }
      char addr[FWD_ADDR_LEN];
      peer_address(f->addr, addr, sizeof addr);
      int server_end = open_stream(fds[0]);
      if (server_end < 0) { reject("more forwarded connections than the relay holds"); return; }
      snprintf(body, sizeof body, "{\"t\":\"accepted\",\"id\":%u,\"remoteAddress\":\"%s\",\"remotePort\":%u}", f->id, addr, f->port <= 65535 ? f->port : 0);
      server_msg(server_end, body);
      close(server_end);
      return;
    }
    case FWD_FAILED:
      if (idset_remove(&pending_connect, f->id) || idset_remove(&pending_listen, f->id) || idset_remove(&pending_connect_unix, f->id) ||
          idset_remove(&pending_listen_unix, f->id) || idset_remove(&pending_agent, f->id))
        server_failed(f->id, f->addr, f->text);
      else reject("an answer to no request");
      return;
    case FWD_LISTENING:
      if (idset_has(&pending_listen_unix, f->id) || idset_has(&pending_agent, f->id)) {
        listening_unix_reported(f);
        return;
      }
      if (!idset_has(&pending_listen, f->id)) { reject("an answer to no request"); return; }
      if (f->port < 1 || f->port > 65535) { reject("a listener on no port"); return; }
      idset_remove(&pending_listen, f->id);
      if (!idset_add(&listening, f->id)) { server_failed(f->id, "EMFILE", "too many listeners on this connection"); return; }
      snprintf(body, sizeof body, "{\"t\":\"listening\",\"id\":%u,\"port\":%u}", f->id, f->port);
      server_msg(-1, body);
      return;
    case FWD_CLOSED:
      idset_remove(&listening, f->id);
      idset_remove(&listening_unix, f->id);
      return;
    default:
      reject("a frame of unknown type");
      return;
  }
}

/* ------------------------------------------------------------ start */

/* Read what is there of the helper's stderr (non-blocking). 1: there may be more; 0: nothing now, or closed. */
static int read_stderr(void) {
  char buf[4096];
  ssize_t n = read(errfd, buf, sizeof buf);
  if (n < 0 && errno == EINTR) return 1;
  if (n < 0 && errno == EAGAIN) return 0;
  if (n <= 0) { close(errfd); errfd = -1; return 0; }
  errtotal += (size_t)n;
  /* Keep the last ERR_TAIL-1 bytes: the engine says what went wrong at the end. */
  if ((size_t)n >= sizeof errtail - 1) {
    memcpy(errtail, buf + n - (sizeof errtail - 1), sizeof errtail - 1);
    errlen = sizeof errtail - 1;
  } else {
    size_t keep = errlen + (size_t)n > sizeof errtail - 1 ? sizeof errtail - 1 - (size_t)n : errlen;
    memmove(errtail, errtail + errlen - keep, keep);
    memcpy(errtail + keep, buf, (size_t)n);
    errlen = keep + (size_t)n;
  }
  if (errtotal >= ERR_READ_MAX) { close(errfd); errfd = -1; return 0; }
  return 1;
}

/* Give up before the helper is ready: what the engine and the helper said goes to the server on our stderr. */
static void fail_start(const char *what) {
  while (errfd >= 0 && read_stderr()) {}
  errtail[errlen] = 0;
  for (size_t i = 0; i < errlen; i++)
    if ((unsigned char)errtail[i] < 0x20 && errtail[i] != '\n') errtail[i] = ' ';
  fprintf(stderr, "%s%s%s\n", what, errlen ? ": " : "", errtail);
  if (engine_pid > 0) kill(engine_pid, SIGKILL);
  _exit(1);
}

/* The engine is done and the helper runs: nothing left needs root. */
static void drop_privileges(void) {
  if (setgroups(0, NULL) < 0 || setresgid(NOBODY, NOBODY, NOBODY) < 0 || setresuid(NOBODY, NOBODY, NOBODY) < 0) fail_start("vesh-forward-relay: cannot drop privileges");
  prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
  prctl(PR_SET_DUMPABLE, 0);
  prctl(PR_SET_PDEATHSIG, SIGKILL); /* cleared by the change of credentials */
  if (getppid() == 1) _exit(0);
}

static void start_engine(char **argv) {
  int sv[2], ep[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0 || pipe2(ep, O_CLOEXEC) < 0) {
    perror("vesh-forward-relay: socketpair/pipe");
    _exit(1);
  }
  pid_t pid = fork();
  if (pid < 0) {
    perror("vesh-forward-relay: fork");
    _exit(1);
  }
  if (pid == 0) {
    /* fd 3: the VE's end of the channel (in place of the server's); fd 4: the program; 2: the pipe we read. */
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (devnull < 0 || dup2(devnull, 0) < 0 || dup2(devnull, 1) < 0 || dup2(ep[1], 2) < 0 || dup2(sv[1], SERVER) < 0) _exit(127);
    close_range(PROGRAM + 1, ~0U, 0);
    signal(SIGPIPE, SIG_DFL);
    execvp(argv[0], argv);
    dprintf(2, "vesh-forward-relay: cannot run %s: %s\n", argv[0], strerror(errno));
    _exit(127);
  }
  close(sv[1]);
  close(ep[1]);
  close(PROGRAM);
  ve = sv[0];
  errfd = ep[0];
  fcntl(errfd, F_SETFL, O_NONBLOCK);
  engine_pid = pid;
  engine_pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
  if (engine_pidfd < 0) fail_start("vesh-forward-relay: pidfd_open");
}

/* The engine exited: with 0 the helper runs (--detach), anything else means it never did. */
static void reap_engine(void) {
  int st;
  pid_t p = waitpid(engine_pid, &st, WNOHANG);
  if (p == 0) return;
  close(engine_pidfd);
  engine_pidfd = -1;
  engine_pid = -1;
  if (p < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
    char what[128];
    if (p > 0 && WIFSIGNALED(st)) snprintf(what, sizeof what, "the engine was killed by signal %d", WTERMSIG(st));
    else snprintf(what, sizeof what, "the engine exited with status %d", p > 0 ? WEXITSTATUS(st) : -1);
    fail_start(what);
  }
  drop_privileges();
}

/* Whether fd 3 is what the server must give us: one end of an AF_UNIX SOCK_SEQPACKET socketpair. */
static int server_channel_ok(void) {
  struct stat st;
  int v = 0;
  socklen_t len = sizeof v;
  if (fstat(SERVER, &st) < 0 || !S_ISSOCK(st.st_mode)) return 0;
  if (getsockopt(SERVER, SOL_SOCKET, SO_DOMAIN, &v, &len) < 0 || v != AF_UNIX) return 0;
  len = sizeof v;
  return getsockopt(SERVER, SOL_SOCKET, SO_TYPE, &v, &len) == 0 && v == SOCK_SEQPACKET;
}

int main(int argc, char **argv) {
  struct stat st;
  if (argc < 3 || strcmp(argv[1], "--") != 0 || !server_channel_ok() || fstat(PROGRAM, &st) < 0) {
    fprintf(stderr, "usage: vesh-forward-relay -- ENGINE ARGS...\n"
                    "  fd 3: the server's channel, an AF_UNIX SOCK_SEQPACKET socket (one JSON object a frame, a socket as SCM_RIGHTS);\n"
                    "  fd 4: the port-forward helper program, opened read-only.\n"
                    "The vesh broker starts this (src/broker/forward-relay-client.ts); it is not run by hand.\n");
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() == 1) return 0;
  start_engine(argv + 2);

  for (;;) {
    static struct pollfd pfd[4 + 2 * MAX_STREAMS];
    int np = 0, iserver, ive = -1, ierr = -1, iengine = -1;
    iserver = np;
    pfd[np++] = (struct pollfd){ .fd = SERVER, .events = POLLIN };
    /* Frames from the VE only once the engine is gone and we are nobody. */
    if (engine_pidfd < 0) { ive = np; pfd[np++] = (struct pollfd){ .fd = ve, .events = POLLIN }; }
    if (errfd >= 0) { ierr = np; pfd[np++] = (struct pollfd){ .fd = errfd, .events = POLLIN }; }
    if (engine_pidfd >= 0) { iengine = np; pfd[np++] = (struct pollfd){ .fd = engine_pidfd, .events = POLLIN }; }
    /* Each stream: read a side only while its buffer is empty, wait to write only while the other's is not. */
    int istreams = np;
    for (int i = 0; i < nstreams; i++) {
      struct stream *st = &streams[i];
      short ve_ev = (short)((!st->down.eof && st->down.len == 0 ? POLLIN : 0) | (st->up.len > 0 ? POLLOUT : 0));
      short srv_ev = (short)((!st->up.eof && st->up.len == 0 ? POLLIN : 0) | (st->down.len > 0 ? POLLOUT : 0));
      /* A side we wait for nothing on is left out, or its POLLHUP would wake us again and again while the other drains. */
      pfd[np++] = (struct pollfd){ .fd = ve_ev ? st->ve : -1, .events = ve_ev };
      pfd[np++] = (struct pollfd){ .fd = srv_ev ? st->srv : -1, .events = srv_ev };
    }
    if (poll(pfd, (nfds_t)np, -1) < 0) {
      if (errno == EINTR) continue;
      _exit(1);
    }
    /* Streams first, from the end (close_stream moves the last, already done, into the hole). */
    for (int i = nstreams - 1; i >= 0; i--) {
      struct stream *st = &streams[i];
      short vr = pfd[istreams + 2 * i].revents, nr = pfd[istreams + 2 * i + 1].revents;
      const short in = POLLIN | POLLHUP | POLLERR, out = POLLOUT | POLLHUP | POLLERR;
      if (pump(st->ve, st->srv, &st->down, vr & in, nr & out) < 0 || pump(st->srv, st->ve, &st->up, nr & in, vr & out) < 0 || (st->down.shut && st->up.shut)) close_stream(i);
    }
    if (ierr >= 0 && (pfd[ierr].revents & (POLLIN | POLLHUP | POLLERR))) read_stderr();
    if (iengine >= 0 && (pfd[iengine].revents & POLLIN)) reap_engine();
    if (ive >= 0 && (pfd[ive].revents & (POLLIN | POLLHUP | POLLERR))) {
      if (!ready && (pfd[ive].revents & POLLHUP) && !(pfd[ive].revents & POLLIN)) fail_start("the port-forward helper closed its channel before it was ready");
      read_ve_frame();
    }
    if (pfd[iserver].revents & (POLLIN | POLLHUP | POLLERR)) read_server_frame();
  }
}
