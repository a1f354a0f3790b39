/*
 * fdpass.node: the Node addon (N-API 8 + libuv) for privilege separation.
 * The broker (root) and its SSH workers (unprivileged) talk in JSON frames
 * over AF_UNIX SOCK_SEQPACKET socketpairs, one frame per datagram, with
 * descriptors attached as SCM_RIGHTS. Node has no API for SCM_RIGHTS outside
 * its IPC channel, and that channel trusts its peer completely (a regular
 * file descriptor makes it abort, a line with no newline grows without
 * bound), so the frames are sent and received here, with fixed-size buffers
 * and every received descriptor accounted for.
 *
 * Also here: the pty pair the broker opens for a session, spawn() and reap()
 * (a process start that does not fork the broker), connectUnix() and
 * isPtyMaster() (the broker asking a VE's session agent, and checking the
 * terminal it hands back), sendDatagram() (systemd's NOTIFY_SOCKET), and
 * lockdown(), the worker's seccomp filter, installed once the worker has
 * loaded every module.
 *
 * Every failure throws an Error whose .code is the errno name (or ETRUNC for
 * a truncated frame) and whose message names the call.
 */
#define NAPI_VERSION 8
#define _GNU_SOURCE
#include <node_api.h>
#include <uv.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <signal.h>
#include <spawn.h>
#include <stdbool.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAX_FDS 16
/* A frame is at most 256 KiB; the socket buffers are sized with room to spare. */
#define SEQPACKET_BUF (1024 * 1024)

union fd_control {
  char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
  struct cmsghdr align;
};

/* ---- errors ---------------------------------------------------------- */

static napi_value throw_code(napi_env env, const char *code, const char *message) {
  napi_value c, m, e;
  napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &c);
  napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &m);
  napi_create_error(env, c, m, &e);
  napi_throw(env, e);
  return NULL;
}

static napi_value throw_errno(napi_env env, const char *call, int err) {
  char msg[256];
  const char *name = strerrorname_np(err);
  char fallback[16];
  if (name == NULL) {
    snprintf(fallback, sizeof fallback, "E%d", err);
    name = fallback;
  }
  snprintf(msg, sizeof msg, "%s: %s", call, strerror(err));
  return throw_code(env, name, msg);
}

static napi_value throw_type(napi_env env, const char *message) {
  napi_throw_type_error(env, "EINVAL", message);
  return NULL;
}

/* ---- argument helpers ------------------------------------------------ */

static int get_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return -1;
  if (argc < want) {
    throw_type(env, "too few arguments");
    return -1;
  }
  return 0;
}

static int get_fd(napi_env env, napi_value v, int *fd) {
  int32_t n;
  if (napi_get_value_int32(env, v, &n) != napi_ok || n < 0) {
    throw_type(env, "a descriptor must be a non-negative integer");
    return -1;
  }
  *fd = n;
  return 0;
}

static int get_u32(napi_env env, napi_value v, uint32_t *out, const char *what) {
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok || d < 0 || d > 0xffffffffu || d != (double)(uint32_t)d) {
    char msg[96];
    snprintf(msg, sizeof msg, "%s must be an integer from 0 to 2^32-1", what);
    throw_type(env, msg);
    return -1;
  }
  *out = (uint32_t)d;
  return 0;
}

static int get_string(napi_env env, napi_value v, char *buf, size_t size) {
  size_t len;
  if (napi_get_value_string_utf8(env, v, buf, size, &len) != napi_ok) {
    throw_type(env, "expected a string");
    return -1;
  }
  return 0;
}

static napi_value make_int(napi_env env, int64_t n) {
  napi_value v;
  napi_create_int64(env, n, &v);
  return v;
}

static napi_value make_undefined(napi_env env) {
  napi_value v;
  napi_get_undefined(env, &v);
  return v;
}

static void close_fds(const int *fds, int n) {
  for (int i = 0; i < n; i++) close(fds[i]);
}

/* ---- socketpair, blocking, close, dup, shutdown ---------------------- */

static napi_value js_socketpair(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  char kind[16];
  if (get_args(env, info, 1, argv) || get_string(env, argv[0], kind, sizeof kind)) return NULL;
  int type;
  if (strcmp(kind, "seqpacket") == 0) type = SOCK_SEQPACKET;
  else if (strcmp(kind, "stream") == 0) type = SOCK_STREAM;
  else return throw_type(env, "socketpair kind must be 'seqpacket' or 'stream'");
  int sv[2];
  if (socketpair(AF_UNIX, type | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0) return throw_errno(env, "socketpair", errno);
  if (type == SOCK_SEQPACKET) {
    /* The default wmem (208 KiB) refuses a 256 KiB datagram with EMSGSIZE.
     * Root may go past net.core.wmem_max; others get up to it (the kernel
     * doubles it, which still fits one frame on a default host). */
    int size = SEQPACKET_BUF;
    for (int i = 0; i < 2; i++) {
      if (setsockopt(sv[i], SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size) < 0)
        (void)setsockopt(sv[i], SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
      if (setsockopt(sv[i], SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
        (void)setsockopt(sv[i], SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    }
  }
  napi_value arr;
  napi_create_array_with_length(env, 2, &arr);
  napi_set_element(env, arr, 0, make_int(env, sv[0]));
  napi_set_element(env, arr, 1, make_int(env, sv[1]));
  return arr;
}

static napi_value js_set_blocking(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int fd;
  bool blocking;
  if (get_args(env, info, 2, argv) || get_fd(env, argv[0], &fd)) return NULL;
  if (napi_get_value_bool(env, argv[1], &blocking) != napi_ok) return throw_type(env, "blocking must be a boolean");
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0) return throw_errno(env, "fcntl(F_GETFL)", errno);
  int nfl = blocking ? (fl & ~O_NONBLOCK) : (fl | O_NONBLOCK);
  if (nfl != fl && fcntl(fd, F_SETFL, nfl) < 0) return throw_errno(env, "fcntl(F_SETFL)", errno);
  return make_undefined(env);
}

static napi_value js_close_fd(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (get_args(env, info, 1, argv) || get_fd(env, argv[0], &fd)) return NULL;
  /* Linux frees the descriptor even when close reports EINTR: never retry. */
  if (close(fd) < 0 && errno != EINTR) return throw_errno(env, "close", errno);
  return make_undefined(env);
}

static napi_value js_dup_fd(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (get_args(env, info, 1, argv) || get_fd(env, argv[0], &fd)) return NULL;
  int n = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  if (n < 0) return throw_errno(env, "fcntl(F_DUPFD_CLOEXEC)", errno);
  return make_int(env, n);
}

static napi_value js_shutdown_fd(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int fd;
  char how[8];
  if (get_args(env, info, 2, argv) || get_fd(env, argv[0], &fd) || get_string(env, argv[1], how, sizeof how)) return NULL;
  int h;
  if (strcmp(how, "read") == 0) h = SHUT_RD;
  else if (strcmp(how, "write") == 0) h = SHUT_WR;
  else if (strcmp(how, "both") == 0) h = SHUT_RDWR;
  else return throw_type(env, "shutdown how must be 'read', 'write' or 'both'");
  if (shutdown(fd, h) < 0 && errno != ENOTCONN) return throw_errno(env, "shutdown", errno);
  return make_undefined(env);
}

/* ---- frames ---------------------------------------------------------- */

static napi_value js_send_frame(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int fd;
  if (get_args(env, info, 3, argv) || get_fd(env, argv[0], &fd)) return NULL;
  void *data;
  size_t len;
  bool isbuf;
  if (napi_is_buffer(env, argv[1], &isbuf) != napi_ok || !isbuf) return throw_type(env, "sendFrame data must be a Buffer");
  napi_get_buffer_info(env, argv[1], &data, &len);
  /* recv() returning 0 means the peer closed: an empty frame would read as that. */
  if (len == 0) return throw_code(env, "EINVAL", "sendFrame: a frame cannot be empty");
  bool isarr;
  uint32_t nfds = 0;
  if (napi_is_array(env, argv[2], &isarr) != napi_ok || !isarr) return throw_type(env, "sendFrame fds must be an array");
  napi_get_array_length(env, argv[2], &nfds);
  if (nfds > MAX_FDS) return throw_code(env, "EINVAL", "sendFrame: at most 16 descriptors per frame");
  int fds[MAX_FDS];
  for (uint32_t i = 0; i < nfds; i++) {
    napi_value el;
    napi_get_element(env, argv[2], i, &el);
    if (get_fd(env, el, &fds[i])) return NULL;
  }
  struct iovec iov = { .iov_base = data, .iov_len = len };
  struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
  union fd_control u;
  if (nfds > 0) {
    memset(&u, 0, sizeof u);
    mh.msg_control = u.buf;
    mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
  }
  ssize_t n;
  do n = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
  while (n < 0 && errno == EINTR);
  napi_value result;
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      napi_get_boolean(env, false, &result);
      return result;
    }
    return throw_errno(env, "sendmsg", errno);
  }
  /* SEQPACKET sends a datagram whole or not at all; a stream socket may not. */
  if ((size_t)n != len) return throw_code(env, "EMSGSIZE", "sendmsg: the frame was sent in part (not a SOCK_SEQPACKET socket?)");
  napi_get_boolean(env, true, &result);
  return result;
}

/*
 * One recvmsg into `buf`. Returns the byte count (0 = end), -1 with errno
 * set, or -2 after closing what arrived: *why is "ETRUNC" or "EBADMSG".
 */
static ssize_t recv_one(int fd, char *buf, size_t max, int *fds, int *nfds, const char **why, int flags) {
  struct iovec iov = { .iov_base = buf, .iov_len = max };
  union fd_control u;
  struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf };
  ssize_t n;
  do n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC | flags);
  while (n < 0 && errno == EINTR);
  *nfds = 0;
  if (n < 0) return -1;
  bool foreign = false;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c != NULL; c = CMSG_NXTHDR(&mh, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
      size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < k; i++) {
        int got;
        memcpy(&got, CMSG_DATA(c) + i * sizeof(int), sizeof got);
        /* The control buffer holds MAX_FDS; more cannot arrive (MSG_CTRUNC). */
        if (*nfds < MAX_FDS) fds[(*nfds)++] = got;
        else close(got);
      }
    } else {
      foreign = true;
    }
  }
  if (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
    close_fds(fds, *nfds);
    *nfds = 0;
    *why = "ETRUNC";
    return -2;
  }
  if (foreign) {
    close_fds(fds, *nfds);
    *nfds = 0;
    *why = "EBADMSG";
    return -2;
  }
  return n;
}

static int get_max_bytes(napi_env env, napi_value v, uint32_t *max) {
  if (get_u32(env, v, max, "maxBytes")) return -1;
  if (*max == 0 || *max > 64 * 1024 * 1024) {
    throw_type(env, "maxBytes must be from 1 to 64 MiB");
    return -1;
  }
  return 0;
}

/*
 * One receive buffer per thread (an addon may serve worker threads too),
 * grown to the largest maxBytes asked for: a read loop then costs no
 * allocation per frame.
 */
static __thread char *recv_buf;
static __thread size_t recv_cap;

static char *recv_buffer(size_t max) {
  if (recv_cap < max) {
    char *b = realloc(recv_buf, max);
    if (b == NULL) return NULL;
    recv_buf = b;
    recv_cap = max;
  }
  return recv_buf;
}

static napi_value js_recv_frame(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int fd;
  uint32_t max;
  if (get_args(env, info, 2, argv) || get_fd(env, argv[0], &fd) || get_max_bytes(env, argv[1], &max)) return NULL;
  char *buf = recv_buffer(max);
  if (buf == NULL) return throw_errno(env, "malloc", ENOMEM);
  int fds[MAX_FDS], nfds;
  const char *why = NULL;
  ssize_t n = recv_one(fd, buf, max, fds, &nfds, &why, MSG_DONTWAIT);
  napi_value result;
  if (n == -1) {
    int err = errno;
    if (err == EAGAIN || err == EWOULDBLOCK) {
      napi_get_null(env, &result);
      return result;
    }
    return throw_errno(env, "recvmsg", err);
  }
  if (n == -2) {
    return throw_code(env, why, strcmp(why, "ETRUNC") == 0
      ? "recvmsg: the frame or its descriptors were truncated (over maxBytes or over 16 descriptors); the descriptors that arrived were closed"
      : "recvmsg: control data other than SCM_RIGHTS; the descriptors that arrived were closed");
  }
  if (n == 0) {
    close_fds(fds, nfds);
    napi_get_boolean(env, false, &result);
    return result;
  }
  napi_value data, arr;
  void *copy;
  if (napi_create_buffer_copy(env, (size_t)n, buf, &copy, &data) != napi_ok) {
    close_fds(fds, nfds);
    return throw_errno(env, "recvFrame buffer", ENOMEM);
  }
  napi_create_array_with_length(env, (size_t)nfds, &arr);
  for (int i = 0; i < nfds; i++) napi_set_element(env, arr, (uint32_t)i, make_int(env, fds[i]));
  napi_create_object(env, &result);
  napi_set_named_property(env, result, "data", data);
  napi_set_named_property(env, result, "fds", arr);
  return result;
}

/* ---- callSync: one blocking request/answer --------------------------- */

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits for `events` until `deadline`: 1 ready, 0 timed out, -1 errno. */
static int wait_for(int fd, short events, int64_t deadline) {
  for (;;) {
    int64_t left = deadline - now_ms();
    if (left < 0) left = 0;
    struct pollfd p = { .fd = fd, .events = events };
    int r = poll(&p, 1, (int)(left > 0x7fffffff ? 0x7fffffff : left));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -1;
    if (r == 0) return left == 0 ? 0 : (now_ms() >= deadline ? 0 : 1);
    return 1;
  }
}

static napi_value js_call_sync(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int fd;
  uint32_t timeout, max;
  if (get_args(env, info, 4, argv) || get_fd(env, argv[0], &fd)) return NULL;
  void *data;
  size_t len;
  bool isbuf;
  if (napi_is_buffer(env, argv[1], &isbuf) != napi_ok || !isbuf) return throw_type(env, "callSync data must be a Buffer");
  napi_get_buffer_info(env, argv[1], &data, &len);
  if (len == 0) return throw_code(env, "EINVAL", "callSync: a frame cannot be empty");
  if (get_u32(env, argv[2], &timeout, "timeoutMs") || get_max_bytes(env, argv[3], &max)) return NULL;
  int64_t deadline = now_ms() + timeout;
  for (;;) {
    ssize_t n = send(fd, data, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) {
      if ((size_t)n != len) return throw_code(env, "EMSGSIZE", "callSync send: the frame was sent in part (not a SOCK_SEQPACKET socket?)");
      break;
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return throw_errno(env, "callSync send", errno);
    int w = wait_for(fd, POLLOUT, deadline);
    if (w < 0) return throw_errno(env, "callSync poll", errno);
    if (w == 0) return throw_code(env, "ETIMEDOUT", "callSync: the request could not be sent in time");
  }
  char *buf = malloc(max);
  if (buf == NULL) return throw_errno(env, "malloc", ENOMEM);
  for (;;) {
    int fds[MAX_FDS], nfds;
    const char *why = NULL;
    ssize_t n = recv_one(fd, buf, max, fds, &nfds, &why, MSG_DONTWAIT);
    if (n > 0 && nfds > 0) {
      close_fds(fds, nfds);
      free(buf);
      return throw_code(env, "EBADMSG", "callSync: the answer carried descriptors (closed)");
    }
    if (n > 0) {
      napi_value out;
      void *copy;
      napi_status st = napi_create_buffer_copy(env, (size_t)n, buf, &copy, &out);
      free(buf);
      if (st != napi_ok) return throw_errno(env, "callSync buffer", ENOMEM);
      return out;
    }
    if (n == 0) {
      free(buf);
      return throw_code(env, "EPIPE", "callSync: the peer closed the socket before answering");
    }
    if (n == -2) {
      free(buf);
      return throw_code(env, why, strcmp(why, "ETRUNC") == 0 ? "callSync: the answer was truncated (over maxBytes)" : "callSync: the answer carried control data other than SCM_RIGHTS");
    }
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      int err = errno;
      free(buf);
      return throw_errno(env, "callSync recv", err);
    }
    int w = wait_for(fd, POLLIN, deadline);
    if (w <= 0) {
      int err = errno;
      free(buf);
      if (w < 0) return throw_errno(env, "callSync poll", err);
      return throw_code(env, "ETIMEDOUT", "callSync: no answer in time");
    }
  }
}

/* ---- watch: readiness on the event loop ------------------------------ */

/*
 * The JS object returned by watch() wraps one of these. While the poll is
 * active the object holds a strong reference to itself (like a socket, it
 * lives until closed, keeping the loop alive); close() drops it. The memory
 * is freed once both the poll handle has closed and the object was collected.
 */
struct watch {
  uv_poll_t poll;
  napi_env env;
  napi_ref callback;
  napi_ref self;
  napi_async_context actx;
  int events;
  bool closing;
  bool handle_closed;
  bool finalized;
};

static void watch_on_env_teardown(void *arg);

static void watch_maybe_free(struct watch *w) {
  if (w->handle_closed && w->finalized) free(w);
}

static void watch_on_handle_closed(uv_handle_t *h) {
  struct watch *w = (struct watch *)h->data;
  w->handle_closed = true;
  watch_maybe_free(w);
}

static void watch_stop(struct watch *w) {
  if (w->closing) return;
  w->closing = true;
  napi_remove_env_cleanup_hook(w->env, watch_on_env_teardown, w);
  uv_poll_stop(&w->poll);
  uv_close((uv_handle_t *)&w->poll, watch_on_handle_closed);
  napi_delete_reference(w->env, w->callback);
  w->callback = NULL;
  napi_async_destroy(w->env, w->actx);
  napi_reference_unref(w->env, w->self, NULL);
}

static void watch_on_env_teardown(void *arg) {
  watch_stop(arg);
}

static void watch_on_event(uv_poll_t *h, int status, int events) {
  struct watch *w = (struct watch *)h->data;
  if (w->closing) return;
  bool error = status < 0;
  bool readable = !error && (events & (UV_READABLE | UV_DISCONNECT)) != 0;
  bool writable = !error && (events & UV_WRITABLE) != 0;
  /* libuv keeps reporting a failed descriptor: stop until JS closes us. */
  if (error) uv_poll_stop(&w->poll);
  napi_env env = w->env;
  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  napi_value cb, recv, argv[3], ignored;
  napi_get_reference_value(env, w->callback, &cb);
  /* napi_make_callback needs an object as `this`. */
  napi_get_global(env, &recv);
  napi_get_boolean(env, readable, &argv[0]);
  napi_get_boolean(env, writable, &argv[1]);
  napi_get_boolean(env, error, &argv[2]);
  napi_status st = napi_make_callback(env, w->actx, recv, cb, 3, argv, &ignored);
  if (st == napi_pending_exception) {
    napi_value exc;
    napi_get_and_clear_last_exception(env, &exc);
    napi_fatal_exception(env, exc);
  }
  napi_close_handle_scope(env, scope);
}

static void watch_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  struct watch *w = data;
  napi_delete_reference(env, w->self);
  w->finalized = true;
  watch_maybe_free(w);
}

static struct watch *watch_this(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  napi_value self;
  if (napi_get_cb_info(env, info, &argc, argv, &self, NULL) != napi_ok) return NULL;
  void *p = NULL;
  if (napi_unwrap(env, self, &p) != napi_ok || p == NULL) {
    throw_type(env, "not a watch object");
    return NULL;
  }
  return p;
}

static napi_value js_watch_set_writable(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  struct watch *w = watch_this(env, info, 1, argv);
  if (w == NULL) return NULL;
  bool want;
  if (napi_get_value_bool(env, argv[0], &want) != napi_ok) return throw_type(env, "setWritable takes a boolean");
  if (w->closing) return make_undefined(env);
  int events = UV_READABLE | UV_DISCONNECT | (want ? UV_WRITABLE : 0);
  if (events != w->events) {
    int r = uv_poll_start(&w->poll, events, watch_on_event);
    if (r < 0) return throw_errno(env, "uv_poll_start", -r);
    w->events = events;
  }
  return make_undefined(env);
}

static napi_value js_watch_close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  struct watch *w = watch_this(env, info, 0, argv);
  if (w == NULL) return NULL;
  watch_stop(w);
  return make_undefined(env);
}

static napi_value js_watch(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int fd;
  if (get_args(env, info, 2, argv) || get_fd(env, argv[0], &fd)) return NULL;
  napi_valuetype t;
  napi_typeof(env, argv[1], &t);
  if (t != napi_function) return throw_type(env, "watch needs a callback function");
  uv_loop_t *loop;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) return throw_code(env, "EINVAL", "watch: no event loop");
  struct watch *w = calloc(1, sizeof *w);
  if (w == NULL) return throw_errno(env, "calloc", ENOMEM);
  int r = uv_poll_init(loop, &w->poll, fd);
  if (r < 0) {
    free(w);
    return throw_errno(env, "uv_poll_init", -r);
  }
  w->poll.data = w;
  w->env = env;
  w->events = UV_READABLE | UV_DISCONNECT;
  r = uv_poll_start(&w->poll, w->events, watch_on_event);
  if (r < 0) {
    /* An initialised handle must be closed; the close callback frees it. */
    w->closing = true;
    w->finalized = true;
    uv_close((uv_handle_t *)&w->poll, watch_on_handle_closed);
    return throw_errno(env, "uv_poll_start", -r);
  }
  napi_value obj, name, fn;
  napi_create_object(env, &obj);
  napi_create_function(env, "setWritable", NAPI_AUTO_LENGTH, js_watch_set_writable, NULL, &fn);
  napi_set_named_property(env, obj, "setWritable", fn);
  napi_create_function(env, "close", NAPI_AUTO_LENGTH, js_watch_close, NULL, &fn);
  napi_set_named_property(env, obj, "close", fn);
  napi_create_reference(env, argv[1], 1, &w->callback);
  napi_create_string_utf8(env, "vesh.fdpass.watch", NAPI_AUTO_LENGTH, &name);
  napi_async_init(env, obj, name, &w->actx);
  napi_wrap(env, obj, w, watch_finalize, NULL, &w->self);
  napi_reference_ref(env, w->self, NULL);
  /* A worker thread's environment can end with the watch open. */
  napi_add_env_cleanup_hook(env, watch_on_env_teardown, w);
  return obj;
}

/* ---- terminals ------------------------------------------------------- */

static napi_value js_open_pty(napi_env env, napi_callback_info info) {
  (void)info;
  int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
  if (master < 0) return throw_errno(env, "posix_openpt", errno);
  char name[128];
  int err;
  if (grantpt(master) < 0 || unlockpt(master) < 0) {
    err = errno;
    close(master);
    return throw_errno(env, "grantpt/unlockpt", err);
  }
  if ((err = ptsname_r(master, name, sizeof name)) != 0) {
    close(master);
    return throw_errno(env, "ptsname_r", err);
  }
  int slave = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
  if (slave < 0) {
    err = errno;
    close(master);
    return throw_errno(env, "open pty slave", err);
  }
  int fl = fcntl(master, F_GETFL);
  if (fl < 0 || fcntl(master, F_SETFL, fl | O_NONBLOCK) < 0) {
    err = errno;
    close(master);
    close(slave);
    return throw_errno(env, "fcntl pty master", err);
  }
  napi_value obj;
  napi_create_object(env, &obj);
  napi_set_named_property(env, obj, "master", make_int(env, master));
  napi_set_named_property(env, obj, "slave", make_int(env, slave));
  return obj;
}

static napi_value js_set_winsize(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int fd;
  uint32_t cols, rows;
  if (get_args(env, info, 3, argv) || get_fd(env, argv[0], &fd) || get_u32(env, argv[1], &cols, "cols") || get_u32(env, argv[2], &rows, "rows")) return NULL;
  if (cols > 0xffff || rows > 0xffff) return throw_type(env, "cols and rows must be at most 65535");
  struct winsize ws = { .ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols };
  if (ioctl(fd, TIOCSWINSZ, &ws) < 0) return throw_errno(env, "ioctl(TIOCSWINSZ)", errno);
  return make_undefined(env);
}

static napi_value js_peer_cred(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (get_args(env, info, 1, argv) || get_fd(env, argv[0], &fd)) return NULL;
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) return throw_errno(env, "getsockopt(SO_PEERCRED)", errno);
  napi_value obj;
  napi_create_object(env, &obj);
  napi_set_named_property(env, obj, "pid", make_int(env, cred.pid));
  napi_set_named_property(env, obj, "uid", make_int(env, cred.uid));
  napi_set_named_property(env, obj, "gid", make_int(env, cred.gid));
  return obj;
}

/*
 * tcpIdle(fd): what the kernel knows of a TCP socket's recent traffic, read
 * with TCP_INFO: ms since data last came from the peer and since we last
 * sent some, and the TCP state. The broker reads it on its own copy of a
 * client's socket to end connections that went silent, whatever the worker
 * that parses them does (src/broker/client-alive-backstop.ts).
 */
static napi_value js_tcp_idle(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (get_args(env, info, 1, argv) || get_fd(env, argv[0], &fd)) return NULL;
  struct tcp_info ti;
  socklen_t len = sizeof ti;
  memset(&ti, 0, sizeof ti);
  if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0) return throw_errno(env, "getsockopt(TCP_INFO)", errno);
  napi_value obj;
  napi_create_object(env, &obj);
  napi_set_named_property(env, obj, "lastDataRecvMs", make_int(env, ti.tcpi_last_data_recv));
  napi_set_named_property(env, obj, "lastDataSentMs", make_int(env, ti.tcpi_last_data_sent));
  napi_set_named_property(env, obj, "state", make_int(env, ti.tcpi_state));
  return obj;
}

/*
 * quickAck(fd): ACK what has arrived on a TCP socket now, and leave the
 * kernel's delayed-ACK ("pingpong") mode for the next segments
 * (TCP_QUICKACK, which the kernel clears again on its own). A client that
 * leaves Nagle on (OpenSSH's ssh without a terminal, ssh2's client) holds
 * its next small packet until its last one is ACKed; when the server has
 * no reply to the last one (a KEXINIT crossing ours, a NEWKEYS), that wait
 * is the server's whole delayed-ACK timer, ~40 ms. The worker calls this
 * after each short read.
 */
static napi_value js_quick_ack(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (get_args(env, info, 1, argv) || get_fd(env, argv[0], &fd)) return NULL;
  int one = 1;
  if (setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one) < 0) return throw_errno(env, "setsockopt(TCP_QUICKACK)", errno);
  return make_undefined(env);
}

/* ---- a VE's session agent: connect, and the terminal it hands back ----- */

/*
 * connectUnix(path): a SOCK_SEQPACKET connection to the listening socket at
 * path, nonblocking and close-on-exec. Unix connects complete at once or not
 * at all: a full backlog is EAGAIN, never a wait in the event loop.
 */
static napi_value js_connect_unix(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  size_t len;
  if (get_args(env, info, 1, argv)) return NULL;
  if (napi_get_value_string_utf8(env, argv[0], sa.sun_path, sizeof sa.sun_path, &len) != napi_ok) return throw_type(env, "connectUnix path must be a string");
  if (len == 0 || len >= sizeof sa.sun_path - 1) return throw_type(env, "connectUnix path is empty or too long for a unix socket");
  int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (s < 0) return throw_errno(env, "socket", errno);
  if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
    int err = errno;
    close(s);
    return throw_errno(env, "connect", err);
  }
  return make_int(env, s);
}

/*
 * isPtyMaster(fd): whether fd is the master side of a pseudo-terminal (a
 * character device on which TIOCGPTN answers, which only a master does).
 * A VE's agent hands one back for a terminal session; anything else it
 * sends (a FIFO, a socket, a file of its tree) must not reach a worker.
 */
static napi_value js_is_pty_master(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (get_args(env, info, 1, argv) || get_fd(env, argv[0], &fd)) return NULL;
  struct stat st;
  unsigned int n;
  bool ok = fstat(fd, &st) == 0 && S_ISCHR(st.st_mode) && ioctl(fd, TIOCGPTN, &n) == 0;
  napi_value result;
  napi_get_boolean(env, ok, &result);
  return result;
}

/*
 * sendDatagram(path, data): one AF_UNIX datagram to path, "@name" meaning an
 * abstract address: systemd's NOTIFY_SOCKET. Node's dgram has no AF_UNIX.
 * Returns whether it was sent (false: the queue was full, EAGAIN).
 */
static napi_value js_send_datagram(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  size_t len;
  void *data;
  size_t size;
  if (get_args(env, info, 2, argv)) return NULL;
  if (napi_get_value_string_utf8(env, argv[0], sa.sun_path, sizeof sa.sun_path, &len) != napi_ok) return throw_type(env, "sendDatagram path must be a string");
  if (len < 2 || len >= sizeof sa.sun_path - 1) return throw_type(env, "sendDatagram path is empty or too long for a unix socket");
  if (napi_get_buffer_info(env, argv[1], &data, &size) != napi_ok) return throw_type(env, "sendDatagram data must be a Buffer");
  socklen_t salen = sizeof sa;
  if (sa.sun_path[0] == '@') {
    sa.sun_path[0] = '\0';
    salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);
  }
  int s = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (s < 0) return throw_errno(env, "socket", errno);
  ssize_t n = sendto(s, data, size, MSG_NOSIGNAL, (struct sockaddr *)&sa, salen);
  int err = errno;
  close(s);
  if (n < 0 && err != EAGAIN) return throw_errno(env, "sendto", err);
  napi_value result;
  napi_get_boolean(env, n >= 0, &result);
  return result;
}

/* ---- lockdown: the worker's seccomp filter --------------------------- */

#if defined(__x86_64__)
#define FILTER_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define FILTER_ARCH AUDIT_ARCH_AARCH64
#else
#error "the worker's seccomp filter knows x86_64 and aarch64 only"
#endif
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the filter reads the low 32 bits of an argument at its first word (little-endian)"
#endif

#define ARG0_LO offsetof(struct seccomp_data, args[0])

/*
 * What a worker does: ssh2 in JavaScript with Node's OpenSSL, on sockets it
 * was given, answering the broker over its socketpair, logging to stdout.
 * The list was taken from `strace -f -c` of that workload (an ssh2 server
 * fed a TCP socket over SCM_RIGHTS, OpenSSH logins, exec over socketpair
 * pipes, a pty master, SFTP, pino, timers, crypto) plus close neighbours
 * that the same code may reach on another kernel or libc.
 * Everything else fails with ENOSYS (so glibc falls back, e.g. clone3 ->
 * clone); a foreign arch or the x32 ABI kills the process.
 */
static const int allowed_syscalls[] = {
  /* descriptors and I/O */
  __NR_read, __NR_write, __NR_readv, __NR_writev, __NR_pread64, __NR_pwrite64,
  __NR_preadv, __NR_pwritev, __NR_preadv2, __NR_pwritev2, __NR_close, __NR_close_range,
  __NR_lseek, __NR_dup, __NR_dup3, __NR_fcntl, __NR_flock, __NR_fsync, __NR_fdatasync,
  __NR_ftruncate, __NR_fallocate, __NR_fadvise64, __NR_pipe2, __NR_eventfd2,
  __NR_copy_file_range, __NR_sendfile, __NR_splice,
  /* files, read side (module loading is over, but Node may still stat or read) */
  __NR_openat, __NR_newfstatat, __NR_fstat, __NR_statx, __NR_fstatfs, __NR_statfs,
  __NR_faccessat, __NR_faccessat2, __NR_readlinkat, __NR_getdents64, __NR_getcwd,
  /* memory */
  __NR_mmap, __NR_munmap, __NR_mprotect, __NR_mremap, __NR_madvise, __NR_brk,
  __NR_msync, __NR_mincore, __NR_membarrier, __NR_mlock, __NR_munlock,
  /* V8 write-protects JIT code with protection keys where the CPU has them. */
  __NR_pkey_alloc, __NR_pkey_free, __NR_pkey_mprotect,
  /* signals */
  __NR_rt_sigaction, __NR_rt_sigprocmask, __NR_rt_sigreturn, __NR_rt_sigpending,
  __NR_rt_sigtimedwait, __NR_rt_sigsuspend, __NR_sigaltstack, __NR_restart_syscall,
  /* kill/tgkill/tkill reach only processes of the same uid (the kernel's check). */
  __NR_kill, __NR_tgkill, __NR_tkill,
  /* waiting */
  __NR_epoll_create1, __NR_epoll_ctl, __NR_epoll_pwait, __NR_epoll_pwait2,
  __NR_ppoll, __NR_pselect6, __NR_futex, __NR_futex_waitv, __NR_nanosleep, __NR_clock_nanosleep,
  __NR_timerfd_create, __NR_timerfd_settime, __NR_timerfd_gettime, __NR_sched_yield,
  /* sockets it was given (socket and socketpair: AF_UNIX only, below) */
  __NR_sendmsg, __NR_recvmsg, __NR_sendmmsg, __NR_recvmmsg, __NR_sendto, __NR_recvfrom,
  __NR_shutdown, __NR_getsockname, __NR_getpeername, __NR_getsockopt, __NR_setsockopt,
  /* threads, process facts, time */
  __NR_set_robust_list, __NR_get_robust_list, __NR_set_tid_address, __NR_rseq,
  __NR_exit, __NR_exit_group, __NR_wait4, __NR_waitid,
  __NR_getpid, __NR_gettid, __NR_getppid, __NR_getuid, __NR_geteuid, __NR_getgid,
  __NR_getegid, __NR_getgroups, __NR_getresuid, __NR_getresgid, __NR_getpgid, __NR_getsid,
  __NR_getrlimit, __NR_prlimit64, __NR_getrusage, __NR_getpriority, __NR_sysinfo, __NR_times,
  __NR_uname, __NR_sched_getaffinity, __NR_sched_getparam, __NR_sched_getscheduler,
  __NR_clock_gettime, __NR_clock_getres, __NR_gettimeofday, __NR_getrandom, __NR_capget,
  /* Node, V8 and libuv name threads, set dumpability, query the THP mode. */
  __NR_prctl,
  /*
   * Every ioctl: a worker holds only sockets, pipes, a pty master (it sets a
   * session's window size with TIOCSWINSZ; libuv makes descriptors
   * non-blocking with FIONBIO) and its stdio; the dangerous ioctls (TIOCSTI, TIOCLINUX) need a tty this process
   * controls or capabilities it does not hold, and the pty masters it gets
   * belong to sessions it serves anyway.
   */
  __NR_ioctl,
#ifdef __NR_open
  __NR_open, __NR_stat, __NR_lstat, __NR_access, __NR_readlink, __NR_getdents,
  __NR_pipe, __NR_dup2, __NR_poll, __NR_select, __NR_epoll_create, __NR_epoll_wait,
  __NR_eventfd, __NR_arch_prctl, __NR_getpgrp, __NR_time,
#endif
};

/* Room for the program: two instructions per allowed syscall plus the rules around them. */
#define MAX_PROG (2 * (sizeof allowed_syscalls / sizeof allowed_syscalls[0]) + 32)
struct prog {
  struct sock_filter ins[MAX_PROG];
  unsigned short n;
  bool overflow;
};

static void emit(struct prog *p, unsigned short code, unsigned char jt, unsigned char jf, unsigned int k) {
  struct sock_filter f = BPF_JUMP(code, k, jt, jf);
  if (p->n >= MAX_PROG) {
    p->overflow = true;
    return;
  }
  p->ins[p->n++] = f;
}

/*
 * nr allowed only when the low 32 bits of arg0 pass `jmp k`, otherwise EPERM.
 * A keeps the syscall number on the path that skips the rule.
 */
static void emit_arg0_rule(struct prog *p, int nr, unsigned short jmp, unsigned int k) {
  emit(p, BPF_JMP | BPF_JEQ | BPF_K, 0, 4, (unsigned int)nr);
  emit(p, BPF_LD | BPF_W | BPF_ABS, 0, 0, ARG0_LO);
  emit(p, BPF_JMP | jmp | BPF_K, 0, 1, k);
  emit(p, BPF_RET | BPF_K, 0, 0, SECCOMP_RET_ALLOW);
  emit(p, BPF_RET | BPF_K, 0, 0, SECCOMP_RET_ERRNO | EPERM);
}

static napi_value js_lockdown(napi_env env, napi_callback_info info) {
  (void)info;
  struct prog p = { .n = 0, .overflow = false };
  emit(&p, BPF_LD | BPF_W | BPF_ABS, 0, 0, offsetof(struct seccomp_data, arch));
  emit(&p, BPF_JMP | BPF_JEQ | BPF_K, 1, 0, FILTER_ARCH);
  emit(&p, BPF_RET | BPF_K, 0, 0, SECCOMP_RET_KILL_PROCESS);
  emit(&p, BPF_LD | BPF_W | BPF_ABS, 0, 0, offsetof(struct seccomp_data, nr));
#ifdef __x86_64__
  /* x32 syscalls carry this bit and would skip the numbers checked below. */
  emit(&p, BPF_JMP | BPF_JGE | BPF_K, 0, 1, 0x40000000u);
  emit(&p, BPF_RET | BPF_K, 0, 0, SECCOMP_RET_KILL_PROCESS);
#endif
  for (size_t i = 0; i < sizeof allowed_syscalls / sizeof allowed_syscalls[0]; i++) {
    emit(&p, BPF_JMP | BPF_JEQ | BPF_K, 0, 1, (unsigned int)allowed_syscalls[i]);
    emit(&p, BPF_RET | BPF_K, 0, 0, SECCOMP_RET_ALLOW);
  }
  /* Threads (libuv's pool starts lazily), never a new process. */
  emit_arg0_rule(&p, __NR_clone, BPF_JSET, CLONE_THREAD);
  /* A worker makes no network socket; AF_UNIX for socketpairs it may need. */
  emit_arg0_rule(&p, __NR_socket, BPF_JEQ, AF_UNIX);
  emit_arg0_rule(&p, __NR_socketpair, BPF_JEQ, AF_UNIX);
  emit(&p, BPF_RET | BPF_K, 0, 0, SECCOMP_RET_ERRNO | ENOSYS);

  if (p.overflow) return throw_code(env, "E2BIG", "lockdown: the seccomp program outgrew its buffer (a bug in vesh-fdpass.c)");
  struct sock_fprog fprog = { .len = p.n, .filter = p.ins };
  /*
   * Non-dumpable first: the filter allows openat, so without this another
   * process of the worker's uid (a sibling worker serving other tenants)
   * could open /proc/PID/mem of this one, with no Yama on some hosts.
   */
  if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0) return throw_errno(env, "prctl(PR_SET_DUMPABLE)", errno);
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) return throw_errno(env, "prctl(PR_SET_NO_NEW_PRIVS)", errno);
  long r = syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &fprog);
  if (r < 0) return throw_errno(env, "seccomp(SECCOMP_SET_MODE_FILTER, TSYNC)", errno);
  /* With TSYNC a positive result is the id of a thread that could not be synced. */
  if (r > 0) {
    char msg[128];
    snprintf(msg, sizeof msg, "seccomp: thread %ld could not take the filter (TSYNC)", r);
    return throw_code(env, "ESRCH", msg);
  }
  return make_undefined(env);
}


/* ---- spawn without fork ---------------------------------------------- */

/*
 * The broker starts a session's relay for every session. Node's
 * child_process forks the whole broker for that (libuv uses fork on Linux),
 * and a fork copies the page tables: measured here 2 ms at 46 MB of RSS,
 * 5.4 ms at 98 MB, 12.8 ms at 200 MB, all of it with the broker's event
 * loop stopped — while SSH workers wait on it for key-exchange signatures.
 * posix_spawn (glibc: clone with CLONE_VM|CLONE_VFORK) costs the same at any
 * size. The child is watched through a pidfd (readable when it ends) and
 * reaped with waitid(P_PIDFD), so libuv, which reaps only its own children,
 * never sees it.
 */

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

static void free_strv(char **v) {
  if (!v) return;
  for (char **p = v; *p; p++) free(*p);
  free(v);
}

/* A JS array of strings as a NULL-terminated vector (NULL with an exception pending on failure). */
static char **get_strv(napi_env env, napi_value arr, uint32_t max) {
  bool is_array = false;
  uint32_t n = 0;
  if (napi_is_array(env, arr, &is_array) != napi_ok || !is_array || napi_get_array_length(env, arr, &n) != napi_ok || n > max) {
    throw_type(env, "expected an array of strings (not too long)");
    return NULL;
  }
  char **v = calloc((size_t)n + 1, sizeof *v);
  if (!v) {
    throw_errno(env, "calloc", ENOMEM);
    return NULL;
  }
  for (uint32_t i = 0; i < n; i++) {
    napi_value el;
    size_t len = 0;
    if (napi_get_element(env, arr, i, &el) != napi_ok || napi_get_value_string_utf8(env, el, NULL, 0, &len) != napi_ok) {
      free_strv(v);
      throw_type(env, "expected an array of strings");
      return NULL;
    }
    v[i] = malloc(len + 1);
    if (!v[i]) {
      free_strv(v);
      throw_errno(env, "malloc", ENOMEM);
      return NULL;
    }
    napi_get_value_string_utf8(env, el, v[i], len + 1, &len);
    if (strlen(v[i]) != len) {
      free_strv(v);
      throw_type(env, "a string with a NUL byte cannot be passed to exec");
      return NULL;
    }
  }
  return v;
}

/*
 * spawn(file, argv, env, stdio: [fd0, fd1, fd2]) -> { pid, pidfd }
 * The child gets stdio[i] as descriptor i, every signal at its default
 * action and none blocked (the broker ignores SIGPIPE; a session must not
 * inherit that), and nothing else of ours: every other descriptor of the
 * broker is close-on-exec.
 */
static napi_value js_spawn(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  char file[4096];
  if (get_args(env, info, 4, argv) || get_string(env, argv[0], file, sizeof file)) return NULL;
  if (file[0] != '/') return throw_type(env, "spawn: the program must be an absolute path");
  int stdio[3];
  for (uint32_t i = 0; i < 3; i++) {
    napi_value el;
    if (napi_get_element(env, argv[3], i, &el) != napi_ok || get_fd(env, el, &stdio[i])) return NULL;
  }
  char **args = get_strv(env, argv[1], 65536);
  if (!args) return NULL;
  char **envp = get_strv(env, argv[2], 65536);
  if (!envp) {
    free_strv(args);
    return NULL;
  }
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t attr;
  sigset_t all, none;
  sigfillset(&all);
  sigemptyset(&none);
  posix_spawn_file_actions_init(&fa);
  posix_spawnattr_init(&attr);
  /* Sources above 2 (the broker's 0-2 are its own stdio), so no dup2 overwrites a later source. */
  for (int i = 0; i < 3; i++) posix_spawn_file_actions_adddup2(&fa, stdio[i], i);
  posix_spawnattr_setsigdefault(&attr, &all);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);
  pid_t pid = -1;
  int err = posix_spawn(&pid, file, &fa, &attr, args, envp);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  free_strv(args);
  free_strv(envp);
  if (err != 0) return throw_errno(env, "posix_spawn", err);
  int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
  if (pidfd < 0) {
    int e = errno;
    /* Without a pidfd we could not reap it: end it now rather than leave a zombie. */
    kill(pid, SIGKILL);
    siginfo_t si;
    waitid(P_PID, (id_t)pid, &si, WEXITED);
    return throw_errno(env, "pidfd_open", e);
  }
  napi_value out;
  napi_create_object(env, &out);
  napi_set_named_property(env, out, "pid", make_int(env, pid));
  napi_set_named_property(env, out, "pidfd", make_int(env, pidfd));
  return out;
}

/* reap(pidfd) -> null while it runs, else { code, signal } (signal: its number, or 0); the pidfd stays open. */
static napi_value js_reap(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (get_args(env, info, 1, argv) || get_fd(env, argv[0], &fd)) return NULL;
  siginfo_t si;
  memset(&si, 0, sizeof si);
  if (syscall(SYS_waitid, P_PIDFD, fd, &si, WEXITED | WNOHANG, NULL) < 0) return throw_errno(env, "waitid(P_PIDFD)", errno);
  napi_value nul;
  napi_get_null(env, &nul);
  if (si.si_pid == 0) return nul;
  napi_value out;
  napi_create_object(env, &out);
  int exited = si.si_code == CLD_EXITED;
  napi_set_named_property(env, out, "code", make_int(env, exited ? si.si_status : -1));
  napi_set_named_property(env, out, "signal", make_int(env, exited ? 0 : si.si_status));
  return out;
}

/* ---- module ---------------------------------------------------------- */

static napi_value init(napi_env env, napi_value exports) {
  static const struct { const char *name; napi_callback fn; } fns[] = {
    { "socketpair", js_socketpair }, { "setBlocking", js_set_blocking },
    { "sendFrame", js_send_frame }, { "recvFrame", js_recv_frame },
    { "watch", js_watch }, { "callSync", js_call_sync },
    { "closeFd", js_close_fd }, { "dupFd", js_dup_fd }, { "shutdownFd", js_shutdown_fd },
    { "openPty", js_open_pty }, { "setWinsize", js_set_winsize },
    { "peerCred", js_peer_cred }, { "tcpIdle", js_tcp_idle }, { "quickAck", js_quick_ack },
    { "lockdown", js_lockdown },
    { "spawn", js_spawn }, { "reap", js_reap },
    { "connectUnix", js_connect_unix }, { "isPtyMaster", js_is_pty_master },
    { "sendDatagram", js_send_datagram },
  };
  for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
    napi_value f;
    napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].fn, NULL, &f);
    napi_set_named_property(env, exports, fns[i].name, f);
  }
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
