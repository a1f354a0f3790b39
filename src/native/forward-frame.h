/*
 * The frames between the port-forward helper inside a VE (vesh-forward.c)
 * and its relay on the host (vesh-forward-relay.c), over a SOCK_SEQPACKET
 * socketpair the relay makes.
 *
 * Why our own framing and not Node's IPC channel: the helper runs as the
 * account's user inside the VE, so VE root and that user can take over its
 * end of the channel (ptrace, pidfd_getfd) and send anything. Node trusts its
 * IPC peer completely (a regular-file descriptor makes it abort(), a line
 * without a newline grows its buffer without bound). So the VE side speaks
 * this: fixed-size frames, one a datagram, at most one descriptor with a
 * frame that is meant to carry one. The relay, a host process the VE cannot
 * see or trace, checks each frame and each descriptor before the server
 * sees anything, and speaks its own JSON frames to the server.
 *
 * A frame is exactly sizeof(struct fwd_frame) bytes; a datagram of any other
 * length, or with a wrong magic, unknown type, or string without its NUL, is
 * dropped whole with any descriptor it carried.
 */
#ifndef VESH_FORWARD_FRAME_H
#define VESH_FORWARD_FRAME_H

#include <stdint.h>
#include <string.h>

#define FWD_MAGIC 0x76736632u /* "vsf2": bump with any change of the layout */

enum fwd_type {
  /* helper → relay */
  FWD_READY = 1,     /* once, at start */
  FWD_CONNECTED = 2, /* id: connect succeeded; carries the connected socket */
  FWD_FAILED = 3,    /* id: connect or listen failed; code in addr, message in text */
  FWD_LISTENING = 4, /* id: listener bound on port (0 for a Unix socket; an agent socket's path in addr) */
  FWD_ACCEPTED = 5,  /* id (the listener's): a -R connection; carries it; peer in addr/port */
  FWD_CLOSED = 6,    /* id: listener closed */
  /* relay → helper */
  FWD_CONNECT = 16,  /* id: connect to addr:port (for -L) */
  FWD_LISTEN = 17,   /* id: listen on addr:port (for -R); port 0 = any */
  FWD_UNLISTEN = 18, /* id: close that listener */
  FWD_CONNECT_UNIX = 19, /* id: connect to the Unix socket at path addr (for direct-streamlocal) */
  FWD_LISTEN_UNIX = 20,  /* id: listen on the Unix socket path addr (streamlocal-forward); flags, mask */
  FWD_LISTEN_AGENT = 21, /* id: listen on a fresh agent socket (a new 0700 directory in /tmp); mask */
};

/* FWD_LISTEN_UNIX flags. */
#define FWD_UNLINK_FIRST 1u /* remove an existing socket at the path before bind (StreamLocalBindUnlink) */

/* What a Unix socket path fits in: sun_path less its NUL. */
#define FWD_UNIX_PATH_MAX 107

#define FWD_ADDR_LEN 256
#define FWD_TEXT_LEN 256

struct fwd_frame {
  uint32_t magic;
  uint32_t type;
  uint32_t id;
  uint32_t port;
  uint32_t flags; /* FWD_LISTEN_UNIX: FWD_UNLINK_FIRST */
  uint32_t mask;  /* FWD_LISTEN_UNIX, FWD_LISTEN_AGENT: the umask the socket is bound under (StreamLocalBindMask) */
  /* host (connect, listen), socket path (unix connect, unix listen; the agent socket's path in its FWD_LISTENING), peer address (accepted), error code (failed) */
  char addr[FWD_ADDR_LEN];
  char text[FWD_TEXT_LEN]; /* message (failed) */
};

/* A frame of `type` for `id`, strings empty. */
static inline void fwd_frame_init(struct fwd_frame *f, uint32_t type, uint32_t id) {
  memset(f, 0, sizeof *f);
  f->magic = FWD_MAGIC;
  f->type = type;
  f->id = id;
}

/* Whether both strings of a received frame end inside their fields. */
static inline int fwd_strings_ok(const struct fwd_frame *f) {
  return memchr(f->addr, 0, sizeof f->addr) != NULL && memchr(f->text, 0, sizeof f->text) != NULL;
}

#endif
