/*
 * sys-probe: what a tenant tries against the VE's seccomp filter. Each probe
 * runs one syscall (family) in a child process of its own, so a probe that
 * succeeds, or is killed, changes nothing for the next, and prints
 *   NAME=ok | NAME=<errno name> | NAME=killed:<signal>
 * one per line. Probes whose name starts with "c_" are controls: calls a
 * Linux system needs and the filter must let through.
 *
 * With "--as-nobody" it first becomes uid/gid 65534 (a plain user in the VE).
 * Arguments are harmless: no probe can change anything outside the VE even
 * where the filter lets it through (modules and kexec get no image, mounts
 * target a private temporary directory, x_tables get an empty request).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <unistd.h>

#define HI ((long)1 << 32) /* set in the upper half of an int argument: the kernel ignores it */

static long sc(long nr, long a, long b, long c, long d, long e, long f) { return syscall(nr, a, b, c, d, e, f); }

static char buf[4096];

static void *thread_main(void *arg) { return arg; }

/* The i386 entry point (int 0x80) from a 64-bit process: getpid is 20 there. */
static long i386_getpid(void) {
  long ret;
  __asm__ volatile("int $0x80" : "=a"(ret) : "a"(20L) : "memory");
  return ret;
}

static long probe(const char *name) {
  int s;
#define IS(n) (strcmp(name, n) == 0)
  if (IS("keyctl")) return sc(SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -3 /* session */, 1, 0, 0, 0);
  if (IS("add_key")) return sc(SYS_add_key, (long)"user", (long)"vesh-probe", (long)"x", 1, -2, 0);
  if (IS("request_key")) return sc(SYS_request_key, (long)"user", (long)"vesh-probe", 0, 0, 0, 0);
  if (IS("bpf")) return sc(SYS_bpf, 0 /* BPF_MAP_CREATE */, (long)buf, 72, 0, 0, 0);
  if (IS("perf_event_open")) {
    memset(buf, 0, 128);
    *(uint32_t *)buf = 1;             /* PERF_TYPE_SOFTWARE */
    *(uint32_t *)(buf + 4) = 128;     /* size */
    return sc(SYS_perf_event_open, (long)buf, 0, -1, -1, 0, 0);
  }
  if (IS("userfaultfd")) return sc(323, 0, 0, 0, 0, 0, 0);
  if (IS("io_uring_setup")) { memset(buf, 0, 120); return sc(425, 1, (long)buf, 0, 0, 0, 0); }
  if (IS("open_by_handle_at")) {
    memset(buf, 0, 64);
    *(uint32_t *)buf = 8;             /* handle_bytes */
    return sc(304, AT_FDCWD, (long)buf, O_RDONLY, 0, 0, 0);
  }
  if (IS("fsopen")) return sc(430, (long)"tmpfs", 0, 0, 0, 0, 0);
  if (IS("fsconfig")) return sc(431, -1, 0, 0, 0, 0, 0);
  if (IS("fsmount")) return sc(432, -1, 0, 0, 0, 0, 0);
  if (IS("fspick")) return sc(433, AT_FDCWD, (long)"/", 0, 0, 0, 0);
  if (IS("open_tree")) return sc(428, AT_FDCWD, (long)"/", 1 /* OPEN_TREE_CLONE */, 0, 0, 0);
  if (IS("move_mount")) return sc(429, -1, (long)"", AT_FDCWD, (long)"/tmp", 4 /* F_EMPTY_PATH */, 0);
  if (IS("mount_setattr")) { memset(buf, 0, 32); return sc(442, AT_FDCWD, (long)"/tmp", 0, (long)buf, 32, 0); }
  if (IS("mount")) return sc(SYS_mount, (long)"none", (long)"/tmp", (long)"tmpfs", 0, 0, 0);
  if (IS("setns")) {
    int fd = open("/proc/self/ns/uts", O_RDONLY);
    return sc(SYS_setns, fd, 0, 0, 0, 0, 0);
  }
  if (IS("unshare_newuser")) return sc(SYS_unshare, CLONE_NEWUSER, 0, 0, 0, 0, 0);
  if (IS("clone_newuser")) {
    long r = sc(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0, 0);
    if (r == 0) _exit(0);
    return r;
  }
  if (IS("clone_newuser_hibits")) {
    /* clone() reads only the low 32 bits of its flags. */
    long r = sc(SYS_clone, HI | CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0, 0);
    if (r == 0) _exit(0);
    return r;
  }
  if (IS("clone3")) {
    memset(buf, 0, 88);
    *(uint64_t *)buf = CLONE_NEWUSER;
    *(uint64_t *)(buf + 32) = SIGCHLD; /* exit_signal */
    long r = sc(435, (long)buf, 88, 0, 0, 0, 0);
    if (r == 0) _exit(0);
    return r;
  }
  if (IS("kexec_load")) return sc(SYS_kexec_load, 0, 0, 0, 0, 0, 0);
  if (IS("kexec_file_load")) return sc(320, -1, -1, 0, 0, 0, 0);
  if (IS("init_module")) return sc(SYS_init_module, (long)buf, 0, (long)"", 0, 0, 0);
  if (IS("finit_module")) return sc(313, -1, (long)"", 0, 0, 0, 0);
  if (IS("delete_module")) return sc(SYS_delete_module, (long)"vesh_probe_none", 0, 0, 0, 0, 0);
  if (IS("kcmp")) return sc(312, getpid(), getpid(), 0, 0, 0, 0);
  if (IS("swapon")) return sc(SYS_swapon, (long)"/nonexistent", 0, 0, 0, 0, 0);
  if (IS("syslog")) return sc(SYS_syslog, 10 /* SYSLOG_ACTION_SIZE_BUFFER */, 0, 0, 0, 0, 0);
  if (IS("personality_read_implies_exec")) return sc(SYS_personality, 0x0400000, 0, 0, 0, 0, 0);
  /* Netfilter configuration (runtime.veFirewall). */
  if (IS("netlink_netfilter")) return socket(AF_NETLINK, SOCK_RAW, 12);
  if (IS("netlink_netfilter_hibits")) return sc(SYS_socket, HI | AF_NETLINK, SOCK_RAW, HI | 12, 0, 0, 0);
  if (IS("xt_set_replace")) {
    if ((s = socket(AF_INET, SOCK_RAW, IPPROTO_RAW)) < 0) return s;
    return setsockopt(s, SOL_IP, 64 /* IPT_SO_SET_REPLACE */, buf, 0);
  }
  if (IS("xt_set_replace_hibits")) {
    if ((s = socket(AF_INET, SOCK_RAW, IPPROTO_RAW)) < 0) return s;
    return sc(SYS_setsockopt, s, HI | SOL_IP, HI | 64, (long)buf, 0, 0);
  }
  if (IS("ip6t_set_replace")) {
    if ((s = socket(AF_INET6, SOCK_RAW, IPPROTO_RAW)) < 0) return s;
    return setsockopt(s, SOL_IPV6, 64 /* IP6T_SO_SET_REPLACE */, buf, 0);
  }
  if (IS("ebt_set_entries")) {
    if ((s = socket(AF_INET, SOCK_RAW, IPPROTO_RAW)) < 0) return s;
    return setsockopt(s, SOL_IP, 128 /* EBT_SO_SET_ENTRIES */, buf, 0);
  }
  /* Socket families a Linux system does not use. */
  if (IS("af_vsock")) return socket(40, SOCK_STREAM, 0);
  if (IS("af_vsock_hibits")) return sc(SYS_socket, HI | 40, SOCK_STREAM, 0, 0, 0, 0);
  if (IS("af_alg")) return socket(38, SOCK_SEQPACKET, 0);
  if (IS("af_tipc")) return socket(30, SOCK_RDM, 0);
  if (IS("af_key")) return socket(15, SOCK_RAW, 2);
  if (IS("netlink_crypto")) return socket(AF_NETLINK, SOCK_RAW, 21);
  /* Syscalls the profile does not name: a number no kernel has, and recent real ones. */
  if (IS("unassigned_1000")) return sc(1000, 0, 0, 0, 0, 0, 0);
  if (IS("statmount")) return sc(457, 0, 0, 0, 0, 0, 0);
  if (IS("listmount")) return sc(458, 0, 0, 0, 0, 0, 0);
  /* open_tree_attr (Linux 6.15): open_tree with attributes, which the old deny list did not name. */
  if (IS("open_tree_attr")) return sc(467, AT_FDCWD, (long)"/", 0, 0, 0, 0);
  /* The i386 syscall table, from a 64-bit process. */
  if (IS("i386_int80")) return i386_getpid();
  /* Controls: must pass. */
  if (IS("c_getpid")) return getpid();
  if (IS("c_fork")) { pid_t p = fork(); if (p == 0) _exit(0); if (p > 0) waitpid(p, NULL, 0); return p; }
  if (IS("c_thread")) { pthread_t t; int r = pthread_create(&t, NULL, thread_main, NULL); if (r) { errno = r; return -1; } return pthread_join(t, NULL); }
  if (IS("c_unshare_files")) return sc(SYS_unshare, CLONE_FILES | CLONE_FS, 0, 0, 0, 0, 0);
  if (IS("c_personality_query")) return personality(0xffffffff);
  if (IS("c_socket_unix")) return socket(AF_UNIX, SOCK_STREAM, 0);
  if (IS("c_socketpair_unix")) { int sv[2]; return socketpair(AF_UNIX, SOCK_STREAM, 0, sv); }
  if (IS("c_socket_inet")) return socket(AF_INET, SOCK_DGRAM, 0);
  if (IS("c_socket_inet6")) return socket(AF_INET6, SOCK_STREAM, 0);
  if (IS("c_socket_route")) return socket(AF_NETLINK, SOCK_RAW, 0 /* NETLINK_ROUTE */);
  if (IS("c_socket_diag")) return socket(AF_NETLINK, SOCK_RAW, 4 /* NETLINK_SOCK_DIAG */);
  if (IS("c_socket_packet")) return socket(AF_PACKET, SOCK_RAW, 0);
  if (IS("c_setsockopt_ttl")) { int v = 64; s = socket(AF_INET, SOCK_DGRAM, 0); return setsockopt(s, SOL_IP, IP_TTL, &v, sizeof v); }
  if (IS("c_setsockopt_reuseaddr")) { int v = 1; s = socket(AF_INET, SOCK_STREAM, 0); return setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &v, sizeof v); }
  if (IS("c_setsockopt_v6only")) { int v = 1; s = socket(AF_INET6, SOCK_STREAM, 0); return setsockopt(s, SOL_IPV6, IPV6_V6ONLY, &v, sizeof v); }
  if (IS("c_setsockopt_nodelay")) { int v = 1; s = socket(AF_INET, SOCK_STREAM, 0); return setsockopt(s, IPPROTO_TCP, 1 /* TCP_NODELAY */, &v, sizeof v); }
#undef IS
  fprintf(stderr, "sys-probe: unknown probe %s\n", name);
  _exit(2);
}

static const char *PROBES[] = {
  "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
  "open_by_handle_at", "fsopen", "fsconfig", "fsmount", "fspick", "open_tree", "move_mount", "mount_setattr",
  "mount", "setns", "unshare_newuser", "clone_newuser", "clone_newuser_hibits", "clone3", "kexec_load",
  "kexec_file_load", "init_module", "finit_module", "delete_module", "kcmp", "swapon", "syslog",
  "personality_read_implies_exec", "netlink_netfilter", "netlink_netfilter_hibits", "xt_set_replace",
  "xt_set_replace_hibits", "ip6t_set_replace", "ebt_set_entries", "af_vsock", "af_vsock_hibits", "af_alg",
  "af_tipc", "af_key", "netlink_crypto", "unassigned_1000", "statmount", "listmount", "open_tree_attr",
  "i386_int80",
  "c_getpid", "c_fork", "c_thread", "c_unshare_files", "c_personality_query", "c_socket_unix",
  "c_socketpair_unix", "c_socket_inet", "c_socket_inet6", "c_socket_route", "c_socket_diag", "c_socket_packet",
  "c_setsockopt_ttl", "c_setsockopt_reuseaddr", "c_setsockopt_v6only", "c_setsockopt_nodelay",
};

int main(int argc, char **argv) {
  int first = 1;
  if (argc > 1 && strcmp(argv[1], "--as-nobody") == 0) {
    if (setgroups(0, NULL) || setgid(65534) || setuid(65534)) { perror("sys-probe: becoming nobody"); return 2; }
    first = 2;
  }
  const char **names = argc > first ? (const char **)argv + first : PROBES;
  size_t n = argc > first ? (size_t)(argc - first) : sizeof PROBES / sizeof *PROBES;
  for (size_t i = 0; i < n; i++) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) { perror("sys-probe: fork"); return 2; }
    if (pid == 0) {
      errno = 0;
      long r = probe(names[i]);
      if (r < 0) printf("%s=%s\n", names[i], strerrorname_np(errno) ? strerrorname_np(errno) : "E?");
      else printf("%s=ok\n", names[i]);
      fflush(stdout);
      _exit(0);
    }
    int st;
    if (waitpid(pid, &st, 0) < 0) { perror("sys-probe: waitpid"); return 2; }
    if (WIFSIGNALED(st)) printf("%s=killed:%s\n", names[i], sigabbrev_np(WTERMSIG(st)) ? sigabbrev_np(WTERMSIG(st)) : "?");
  }
  return 0;
}
