/*
 * vesh-worker-sandbox: starts one SSH worker (the process that parses
 * untrusted network input with ssh2) inside its sandbox.
 *
 *   vesh-worker-sandbox --uid N --gid N --app-root DIR [--nofile N]
 *       [--keep-fd N]... [--hide DIR]... -- PROGRAM ARGS...
 *
 * It runs as root and takes its arguments only from the broker (`vesh
 * serve`), which builds them in src/broker/worker-sandbox.ts; nothing here
 * comes from a client or a VE. Configuration reaches the worker over the
 * descriptors kept with --keep-fd, not through the environment: the worker's
 * environment is PATH, LANG and the VESH_* variables we were given.
 *
 * What the worker gets, in the order it is set up (every step checked; a
 * failure prints "vesh-worker-sandbox: <step>: <reason>" and exits 125
 * without running PROGRAM):
 *   - only fds 0-2 and the --keep-fd ones, the latter inheritable;
 *   - its own mount, network (only a down `lo`), IPC and UTS namespaces,
 *     hostname "vesh-worker"; the same pid namespace, but a /proc mounted
 *     hidepid=invisible,subset=pid: its own processes and nothing else
 *     (no /proc/sys, no other pids);
 *   - a read-only tmpfs root showing only /usr (and /bin, /sbin, /lib,
 *     /lib64: the same symlinks as on the host, or read-only binds where
 *     they are real directories), the app root at its own path (module
 *     resolution is unchanged), /dev with null, zero, random and urandom,
 *     and /proc. All binds are read-only and nosuid, nodev except the device
 *     nodes (there nodev would make them unusable; they are noexec instead).
 *     Each --hide DIR inside those trees gets an empty read-only tmpfs on
 *     top, so a data or key directory under the app root stays invisible;
 *   - RLIMIT_CORE 0 and RLIMIT_NOFILE N;
 *   - uid and gid N in all three slots, no supplementary groups, every
 *     capability set empty (bounding and ambient included), no_new_privs,
 *     and the SIGKILL parent-death signal: a worker never outlives the
 *     broker that started it.
 * No seccomp filter here: the worker installs its own once its modules are
 * loaded (src/native/vesh-fdpass.c, lockdown()).
 *
 * Why the binds are not recursive: a recursive bind of the app root would
 * copy every mount below it (a data directory's VE disks, say) into each
 * worker's namespace, where the copy keeps the filesystem busy after the
 * host unmounts it. With plain binds the worker holds no submount at all,
 * and once the root is built every mount is made private, so nothing the
 * host mounts later appears here.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/capability.h>
#include <linux/keyctl.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#define FAIL 125
#define MAX_KEEP 64
#define MAX_HIDE 32
#define DEFAULT_NOFILE 65536
/*
 * Where the new root is built: a tmpfs mounted over /tmp in our own mount
 * namespace (the host's /tmp is untouched). Sources are opened before it
 * covers /tmp, so an app root under /tmp still works.
 */
#define STAGE "/tmp"
#define HOSTNAME "vesh-worker"

extern char **environ;

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...) {
  va_list ap;
  fputs("vesh-worker-sandbox: ", stderr);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  _exit(FAIL);
}

/* die() with the reason errno gives, after ": ". */
#define die_errno(fmt, ...) \
  do { \
    int saved_ = errno; \
    die(fmt ": %s", ##__VA_ARGS__, strerror(saved_)); \
  } while (0)

static unsigned long parse_number(const char *what, const char *s, unsigned long min, unsigned long max) {
  if (s == NULL) die("%s needs a value", what);
  if (*s < '0' || *s > '9') die("%s: not a number: %s", what, s);
  char *end;
  errno = 0;
  unsigned long v = strtoul(s, &end, 10);
  if (errno != 0 || *end != '\0') die("%s: not a number: %s", what, s);
  if (v < min || v > max) die("%s: %s is outside %lu..%lu", what, s, min, max);
  return v;
}

/*
 * An absolute directory given as its canonical path (no symlink, no "." or
 * ".." part, no trailing slash): the new root mirrors host paths, so a path
 * that is not canonical would name something else there.
 */
static const char *parse_directory(const char *what, const char *s) {
  if (s == NULL) die("%s needs a value", what);
  if (s[0] != '/') die("%s: must be an absolute path: %s", what, s);
  if (strlen(s) >= PATH_MAX) die("%s: path too long", what);
  struct stat st;
  if (stat(s, &st) != 0) die_errno("%s %s", what, s);
  if (!S_ISDIR(st.st_mode)) die("%s: not a directory: %s", what, s);
  char real[PATH_MAX];
  if (realpath(s, real) == NULL) die_errno("%s: resolve %s", what, s);
  if (strcmp(real, s) != 0) die("%s: give the canonical path %s, not %s", what, real, s);
  return s;
}

/* Whether path is root itself or lies below it. */
static int is_within(const char *path, const char *root) {
  size_t n = strlen(root);
  if (strcmp(root, "/") == 0) return 1;
  return strncmp(path, root, n) == 0 && (path[n] == '\0' || path[n] == '/');
}

struct options {
  uid_t uid;
  gid_t gid;
  const char *app_root;
  rlim_t nofile;
  int nofile_given;
  int keep[MAX_KEEP];
  int nkeep;
  const char *hide[MAX_HIDE];
  int nhide;
  char **program; /* PROGRAM ARGS..., NULL-terminated (argv's tail) */
};

static void parse_args(int argc, char **argv, struct options *o) {
  memset(o, 0, sizeof *o);
  int have_uid = 0, have_gid = 0;
  int i = 1;
  for (; i < argc; i++) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(a, "--") == 0) {
      i++;
      break;
    } else if (strcmp(a, "--uid") == 0) {
      /* 0 is root; (uid_t)-1 means "unchanged" to setresuid. */
      o->uid = (uid_t)parse_number("--uid", v, 1, 4294967294UL);
      have_uid = 1;
      i++;
    } else if (strcmp(a, "--gid") == 0) {
      o->gid = (gid_t)parse_number("--gid", v, 1, 4294967294UL);
      have_gid = 1;
      i++;
    } else if (strcmp(a, "--app-root") == 0) {
      o->app_root = parse_directory("--app-root", v);
      if (strcmp(o->app_root, "/") == 0) die("--app-root: / would show the whole host; give the directory holding dist/ and package.json");
      i++;
    } else if (strcmp(a, "--nofile") == 0) {
      o->nofile = (rlim_t)parse_number("--nofile", v, 64, 1048576);
      o->nofile_given = 1;
      i++;
    } else if (strcmp(a, "--keep-fd") == 0) {
      if (o->nkeep == MAX_KEEP) die("--keep-fd: at most %d descriptors", MAX_KEEP);
      o->keep[o->nkeep++] = (int)parse_number("--keep-fd", v, 3, 1048575);
      i++;
    } else if (strcmp(a, "--hide") == 0) {
      if (o->nhide == MAX_HIDE) die("--hide: at most %d directories", MAX_HIDE);
      o->hide[o->nhide++] = parse_directory("--hide", v);
      i++;
    } else {
      die("unknown option %s (usage: vesh-worker-sandbox --uid N --gid N --app-root DIR [--nofile N] [--keep-fd N]... [--hide DIR]... -- PROGRAM ARGS...)", a);
    }
  }
  if (!have_uid) die("--uid is required");
  if (!have_gid) die("--gid is required");
  if (o->app_root == NULL) die("--app-root is required");
  if (i >= argc) die("no program given after --");
  if (argv[i][0] != '/') die("PROGRAM must be an absolute path: %s", argv[i]);
  o->program = &argv[i];
}

static int compare_int(const void *a, const void *b) {
  int x = *(const int *)a, y = *(const int *)b;
  return (x > y) - (x < y);
}

static int close_range_syscall(unsigned int first, unsigned int last) {
  return (int)syscall(SYS_close_range, first, last, 0U);
}

static int is_kept(const struct options *o, int fd) {
  for (int i = 0; i < o->nkeep; i++)
    if (o->keep[i] == fd) return 1;
  return 0;
}

/* For kernels before 5.9 (no close_range): close what /proc/self/fd lists, in rounds, until nothing is left. */
static void close_listed_fds(const struct options *o) {
  for (;;) {
    int found[256];
    int n = 0;
    DIR *d = opendir("/proc/self/fd");
    if (d == NULL) die_errno("close inherited descriptors: open /proc/self/fd");
    int self = dirfd(d);
    struct dirent *e;
    errno = 0;
    while (n < (int)(sizeof found / sizeof found[0]) && (e = readdir(d)) != NULL) {
      if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
      int fd = atoi(e->d_name);
      if (fd > 2 && fd != self && !is_kept(o, fd)) found[n++] = fd;
    }
    if (errno != 0) die_errno("close inherited descriptors: read /proc/self/fd");
    if (closedir(d) != 0) die_errno("close inherited descriptors: close /proc/self/fd");
    if (n == 0) return;
    for (int i = 0; i < n; i++)
      if (close(found[i]) != 0 && errno != EBADF) die_errno("close inherited descriptor %d", found[i]);
  }
}

/* Step 2: nothing of the broker's reaches the worker but 0-2 and the kept descriptors. */
static void close_other_fds(struct options *o) {
  qsort(o->keep, (size_t)o->nkeep, sizeof o->keep[0], compare_int);
  for (int i = 0; i < o->nkeep; i++) {
    int flags = fcntl(o->keep[i], F_GETFD);
    if (flags < 0) die_errno("--keep-fd %d", o->keep[i]);
    if (fcntl(o->keep[i], F_SETFD, flags & ~FD_CLOEXEC) != 0) die_errno("make descriptor %d inheritable", o->keep[i]);
  }
  unsigned int first = 3;
  for (int i = 0; i < o->nkeep; i++) {
    unsigned int k = (unsigned int)o->keep[i];
    if (k > first && close_range_syscall(first, k - 1) != 0) {
      if (errno == ENOSYS) {
        close_listed_fds(o);
        return;
      }
      die_errno("close descriptors %u..%u", first, k - 1);
    }
    if (k + 1 > first) first = k + 1;
  }
  if (close_range_syscall(first, ~0U) != 0) {
    if (errno == ENOSYS) {
      close_listed_fds(o);
      return;
    }
    die_errno("close descriptors from %u", first);
  }
}

/* The highest capability number this kernel knows, read while the host's /proc is still ours. */
static int read_cap_last_cap(void) {
  int fd = open("/proc/sys/kernel/cap_last_cap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) die_errno("open /proc/sys/kernel/cap_last_cap");
  char buf[16];
  ssize_t n = read(fd, buf, sizeof buf - 1);
  if (n <= 0) die_errno("read /proc/sys/kernel/cap_last_cap");
  close(fd);
  buf[n] = '\0';
  char *end;
  long v = strtol(buf, &end, 10);
  if (end == buf || v < 0 || v > 255) die("read /proc/sys/kernel/cap_last_cap: unexpected content");
  return (int)v;
}

/* A host tree the worker sees, opened before the staging tmpfs covers /tmp. */
struct piece {
  char host[PATH_MAX];
  int fd;
  int is_symlink; /* then target holds the link text and fd is -1 */
  char target[PATH_MAX];
};

static int open_path(const char *path, int want_dir) {
  int fd = open(path, O_PATH | O_CLOEXEC | O_NOFOLLOW | (want_dir ? O_DIRECTORY : 0));
  if (fd < 0) die_errno("open %s", path);
  return fd;
}

static void stage_path(char *out, const char *host) {
  if (snprintf(out, PATH_MAX, "%s%s", STAGE, host) >= PATH_MAX) die("path too long: %s", host);
}

/* mkdir -p of host path `host` inside the stage; existing directories (a bind below) are fine. */
static void make_dirs_in_stage(const char *host) {
  char p[PATH_MAX];
  stage_path(p, host);
  for (char *s = p + strlen(STAGE) + 1; ; s++) {
    if (*s == '/' || *s == '\0') {
      char c = *s;
      *s = '\0';
      if (mkdir(p, 0755) != 0 && errno != EEXIST) die_errno("mkdir %s in the new root", p + strlen(STAGE));
      struct stat st;
      if (lstat(p, &st) != 0) die_errno("stat %s in the new root", p + strlen(STAGE));
      if (!S_ISDIR(st.st_mode)) die("%s in the new root is not a directory", p + strlen(STAGE));
      *s = c;
      if (c == '\0') break;
    }
  }
}

/* Bind host tree `fd` (named `what`) on `target`, then make that one mount read-only with `flags` added. */
static void bind_read_only(int fd, const char *target, const char *what, unsigned long flags) {
  char src[64];
  snprintf(src, sizeof src, "/proc/self/fd/%d", fd);
  if (mount(src, target, NULL, MS_BIND, NULL) != 0) die_errno("bind-mount %s", what);
  if (mount(NULL, target, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, NULL) != 0) die_errno("remount %s read-only", what);
}

static const char *const TOP_LEVEL[] = {"/bin", "/sbin", "/lib", "/lib64"};
#define NTOP (sizeof TOP_LEVEL / sizeof TOP_LEVEL[0])
static const char *const DEVICES[] = {"/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"};
#define NDEV (sizeof DEVICES / sizeof DEVICES[0])

/* Step 4: the new root, pivoted into. */
static void build_root(const struct options *o) {
  if (mount(NULL, "/", NULL, MS_SLAVE | MS_REC, NULL) != 0) die_errno("make / a slave mount (so nothing propagates back to the host)");

  struct piece usr, app, top[NTOP];
  int dev[NDEV];
  snprintf(usr.host, PATH_MAX, "/usr");
  usr.fd = open_path("/usr", 1);
  snprintf(app.host, PATH_MAX, "%s", o->app_root);
  app.fd = open_path(o->app_root, 1);
  for (size_t i = 0; i < NTOP; i++) {
    struct piece *t = &top[i];
    snprintf(t->host, PATH_MAX, "%s", TOP_LEVEL[i]);
    t->fd = -1;
    t->is_symlink = 0;
    struct stat st;
    if (lstat(t->host, &st) != 0) {
      if (errno == ENOENT) continue;
      die_errno("stat %s", t->host);
    }
    if (S_ISLNK(st.st_mode)) {
      ssize_t n = readlink(t->host, t->target, sizeof t->target - 1);
      if (n < 0) die_errno("readlink %s", t->host);
      t->target[n] = '\0';
      t->is_symlink = 1;
    } else if (S_ISDIR(st.st_mode)) {
      t->fd = open_path(t->host, 1);
    }
  }
  for (size_t i = 0; i < NDEV; i++) {
    dev[i] = open_path(DEVICES[i], 0);
    struct stat st;
    if (fstat(dev[i], &st) != 0) die_errno("stat %s", DEVICES[i]);
    if (!S_ISCHR(st.st_mode)) die("%s is not a character device", DEVICES[i]);
  }

  /* Trees the worker sees; a --hide DIR among them gets covered, one holding them is refused. */
  const char *visible[2 + NTOP];
  size_t nvisible = 0;
  visible[nvisible++] = "/usr";
  visible[nvisible++] = o->app_root;
  for (size_t i = 0; i < NTOP; i++)
    if (top[i].fd >= 0) visible[nvisible++] = top[i].host;
  int cover[MAX_HIDE];
  for (int h = 0; h < o->nhide; h++) {
    cover[h] = 0;
    for (size_t v = 0; v < nvisible; v++) {
      if (is_within(visible[v], o->hide[h])) die("--hide %s: it holds %s, which the worker needs (move that directory out of it)", o->hide[h], visible[v]);
      if (is_within(o->hide[h], visible[v])) cover[h] = 1;
    }
  }

  /* The root itself: only directories, symlinks and mount points, so nosuid, nodev, noexec. */
  if (mount("tmpfs", STAGE, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=64k,nr_inodes=256") != 0) die_errno("mount the new root's tmpfs on " STAGE);

  char target[PATH_MAX];
  make_dirs_in_stage("/usr");
  stage_path(target, "/usr");
  bind_read_only(usr.fd, target, "/usr", MS_NOSUID | MS_NODEV);
  for (size_t i = 0; i < NTOP; i++) {
    stage_path(target, top[i].host);
    if (top[i].is_symlink) {
      if (symlink(top[i].target, target) != 0) die_errno("symlink %s -> %s in the new root", top[i].host, top[i].target);
    } else if (top[i].fd >= 0) {
      make_dirs_in_stage(top[i].host);
      bind_read_only(top[i].fd, target, top[i].host, MS_NOSUID | MS_NODEV);
    }
  }
  make_dirs_in_stage(o->app_root);
  stage_path(target, o->app_root);
  bind_read_only(app.fd, target, o->app_root, MS_NOSUID | MS_NODEV);

  for (int h = 0; h < o->nhide; h++) {
    if (!cover[h]) continue;
    stage_path(target, o->hide[h]);
    if (mount("tmpfs", target, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0555,size=4k,nr_inodes=2") != 0) die_errno("--hide %s: mount an empty tmpfs over it", o->hide[h]);
  }

  /*
   * /dev: a tmpfs holding mount points only. The device binds must not be
   * nodev (the kernel checks nodev on the mount the node is opened through,
   * which is the bind, not this tmpfs), so they are read-only, nosuid and
   * noexec; a read-only mount still allows writing to a device node.
   */
  make_dirs_in_stage("/dev");
  stage_path(target, "/dev");
  if (mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=4k,nr_inodes=16") != 0) die_errno("mount a tmpfs on /dev");
  for (size_t i = 0; i < NDEV; i++) {
    stage_path(target, DEVICES[i]);
    int f = open(target, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
    if (f < 0) die_errno("create the mount point %s", DEVICES[i]);
    close(f);
    bind_read_only(dev[i], target, DEVICES[i], MS_NOSUID | MS_NOEXEC);
  }

  make_dirs_in_stage("/proc");
  stage_path(target, "/proc");
  if (mount("proc", target, "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible,subset=pid") != 0)
    die_errno("mount /proc (hidepid=invisible,subset=pid needs Linux 5.8)");

  /* Our descriptors to host trees must be gone before the old root is detached. */
  if (close(usr.fd) != 0 || close(app.fd) != 0) die_errno("close the source descriptors");
  for (size_t i = 0; i < NTOP; i++)
    if (top[i].fd >= 0 && close(top[i].fd) != 0) die_errno("close the source descriptor of %s", top[i].host);
  for (size_t i = 0; i < NDEV; i++)
    if (close(dev[i]) != 0) die_errno("close the source descriptor of %s", DEVICES[i]);

  /* pivot_root(".", ".") stacks the old root on the new one, so it needs no directory of its own (runc does the same). */
  if (chdir(STAGE) != 0) die_errno("chdir to the new root");
  if (syscall(SYS_pivot_root, ".", ".") != 0) die_errno("pivot_root");
  if (umount2(".", MNT_DETACH) != 0) die_errno("detach the old root");
  if (chdir("/") != 0) die_errno("chdir /");
  if (mount(NULL, "/", NULL, MS_PRIVATE | MS_REC, NULL) != 0) die_errno("make the new root's mounts private");
  if (mount(NULL, "/dev", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) die_errno("remount /dev read-only");
  if (mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) die_errno("remount / read-only");
}

/* Step 5. */
static void set_limits(const struct options *o) {
  struct rlimit core = {0, 0};
  if (setrlimit(RLIMIT_CORE, &core) != 0) die_errno("setrlimit RLIMIT_CORE 0");
  struct rlimit cur;
  if (getrlimit(RLIMIT_NOFILE, &cur) != 0) die_errno("getrlimit RLIMIT_NOFILE");
  rlim_t n = o->nofile;
  /*
   * The default may not exceed our own hard limit: raising it needs
   * CAP_SYS_RESOURCE, which a container's root may lack (this project's
   * test host: hard limit 20000). An explicit --nofile is set as given.
   */
  if (!o->nofile_given) n = cur.rlim_max < DEFAULT_NOFILE ? cur.rlim_max : DEFAULT_NOFILE;
  struct rlimit nofile = {n, n};
  if (setrlimit(RLIMIT_NOFILE, &nofile) != 0)
    die_errno("setrlimit RLIMIT_NOFILE %llu (this launcher's hard limit is %llu)", (unsigned long long)n, (unsigned long long)cur.rlim_max);
}

static void read_caps(struct __user_cap_data_struct data[2]) {
  struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
  if (syscall(SYS_capget, &hdr, data) != 0) die_errno("capget");
}

/* Step 6: the worker's identity, with nothing left to regain root by. */
static void drop_privileges(const struct options *o, int last_cap, pid_t parent) {
  for (int c = 0;; c++) {
    if (prctl(PR_CAPBSET_DROP, c, 0, 0, 0) != 0) {
      /* Past the last capability the kernel knows: EINVAL. */
      if (errno == EINVAL && c > last_cap) break;
      die_errno("drop capability %d from the bounding set", c);
    }
  }
  if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0) die_errno("clear the ambient capabilities");
  if (setgroups(0, NULL) != 0) die_errno("setgroups (none)");
  if (setresgid(o->gid, o->gid, o->gid) != 0) die_errno("setresgid %u", (unsigned)o->gid);
  if (setresuid(o->uid, o->uid, o->uid) != 0) die_errno("setresuid %u", (unsigned)o->uid);
  /*
   * A session keyring of its own: the broker's would stay "possessed" by the
   * worker whatever its uid, with the possessor's rights to every key in it.
   * ENOSYS: a kernel without keyrings, nothing to leave behind.
   */
  if (syscall(SYS_keyctl, KEYCTL_JOIN_SESSION_KEYRING, NULL) < 0 && errno != ENOSYS) die_errno("join a new session keyring");
  /* Leaving uid 0 clears the permitted set unless securebits say otherwise; clear it ourselves either way. */
  struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
  struct __user_cap_data_struct none[2];
  memset(none, 0, sizeof none);
  if (syscall(SYS_capset, &hdr, none) != 0) die_errno("capset (none)");

  uid_t ru, eu, su;
  gid_t rg, eg, sg;
  if (getresuid(&ru, &eu, &su) != 0) die_errno("getresuid");
  if (getresgid(&rg, &eg, &sg) != 0) die_errno("getresgid");
  if (ru != o->uid || eu != o->uid || su != o->uid) die("verify the uid: got %u/%u/%u, wanted %u", (unsigned)ru, (unsigned)eu, (unsigned)su, (unsigned)o->uid);
  if (rg != o->gid || eg != o->gid || sg != o->gid) die("verify the gid: got %u/%u/%u, wanted %u", (unsigned)rg, (unsigned)eg, (unsigned)sg, (unsigned)o->gid);
  int ngroups = getgroups(0, NULL);
  if (ngroups != 0) die("verify the supplementary groups: %d left", ngroups);
  struct __user_cap_data_struct caps[2];
  read_caps(caps);
  for (int i = 0; i < 2; i++)
    if (caps[i].effective || caps[i].permitted || caps[i].inheritable) die("verify the capabilities: some are left");
  for (int c = 0; c <= last_cap; c++) {
    if (prctl(PR_CAPBSET_READ, c, 0, 0, 0) != 0) die("verify the bounding set: capability %d is left", c);
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, c, 0, 0) != 0) die("verify the ambient set: capability %d is left", c);
  }
  if (setuid(0) == 0) die("verify: setuid(0) succeeded after the drop");
  if (setgid(0) == 0) die("verify: setgid(0) succeeded after the drop");

  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die_errno("PR_SET_NO_NEW_PRIVS");
  /*
   * Not dumpable until execve. The kernel sets dumpable back to 1 at execve
   * of a readable binary when real and effective ids agree (node is
   * readable), so the worker sets it to 0 again itself once started.
   */
  if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) die_errno("PR_SET_DUMPABLE 0");
  /* After the id change, which clears it; execve of a plain binary keeps it. */
  if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) die_errno("PR_SET_PDEATHSIG");
  if (getppid() != parent) die("the broker (pid %d) exited while the worker was starting", (int)parent);
}

/* Step 7: PATH, LANG and our own VESH_* variables; the broker passes everything else over the kept descriptors. */
static char **worker_environment(void) {
  size_t n = 0;
  for (char **e = environ; *e != NULL; e++) n++;
  char **env = calloc(n + 3, sizeof *env);
  if (env == NULL) die_errno("allocate the environment");
  size_t k = 0;
  env[k++] = "PATH=/usr/bin:/bin";
  env[k++] = "LANG=C.UTF-8";
  for (char **e = environ; *e != NULL; e++)
    if (strncmp(*e, "VESH_", 5) == 0) env[k++] = *e;
  env[k] = NULL;
  return env;
}

int main(int argc, char **argv) {
  pid_t parent = getppid();
  struct options o;
  parse_args(argc, argv, &o);
  if (geteuid() != 0) die("must run as root (it is started by vesh serve)");

  close_other_fds(&o);

  if (unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS) != 0) die_errno("unshare the mount, network, IPC and UTS namespaces");
  if (sethostname(HOSTNAME, strlen(HOSTNAME)) != 0) die_errno("sethostname");
  int last_cap = read_cap_last_cap();

  build_root(&o);
  set_limits(&o);
  drop_privileges(&o, last_cap, parent);
  umask(077);

  char **env = worker_environment();
  execve(o.program[0], o.program, env);
  die_errno("execve %s (the sandbox shows only /usr and the app root)", o.program[0]);
}
