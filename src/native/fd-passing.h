/*
 * Passing descriptors with a message (SCM_RIGHTS), shared by the native
 * helpers: the session helper hands stdio and terminals between the host and
 * the VE's agent, the forward helper hands sockets to the SSH server.
 */
#ifndef VESH_FD_PASSING_H
#define VESH_FD_PASSING_H

#include <string.h>
#include <sys/socket.h>

#define FD_PASS_MAX 4

/* Room for up to FD_PASS_MAX descriptors, aligned for a cmsghdr. */
union fd_cmsg {
  char buf[CMSG_SPACE(sizeof(int) * FD_PASS_MAX)];
  struct cmsghdr align;
};

/* Attach fds[0..n) (1 <= n <= FD_PASS_MAX) to `mh`, using `u` as the control buffer. */
static inline void attach_fds(struct msghdr *mh, union fd_cmsg *u, const int *fds, int n) {
  memset(u, 0, sizeof *u);
  mh->msg_control = u->buf;
  mh->msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)n);
  struct cmsghdr *c = CMSG_FIRSTHDR(mh);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)n);
  memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)n);
}

#endif
