/*
 * vesh-setup: the host-side steps of a VE start that would otherwise cost a
 * process start each (7-15 ms apiece on our 2-core VMs, measured), done with
 * direct system calls in one short-lived process.
 *
 *   vesh-setup mount IMAGE|- PRIVATE UPPER WORK CTL MARKER ROOTFS LOWERDIR|- ROOTID LOWERIDS|-
 *                    [--console FILE] [--engine-ns FD] [-- CMD ARG…]
 *       Attach IMAGE (the VE's ext4 disk image) to a free loop device in
 *       direct-I/O mode with VE_DISK_READ_AHEAD_KB of read-ahead and mount it on PRIVATE ("-": no image, or already
 *       mounted), make UPPER and CTL owned by ROOTID (VE root) and WORK
 *       (all three direct children of PRIVATE, reached from its descriptor
 *       without following a symlink), remove CTL/MARKER (the last run's
 *       shutdown marker, "-": none), and mount the overlay of LOWERDIR (the
 *       template) and UPPER on ROOTFS ("-": already mounted); both mounts
 *       nosuid,nodev. LOWERIDS "FROM:COUNT" shows LOWERDIR to the overlay
 *       through an idmapped mount on which the template's ids FROM..
 *       FROM+COUNT-1 appear as ROOTID..ROOTID+COUNT-1 (the VE's own range;
 *       FROM is 0 for an unshifted template), so one template on disk serves
 *       VEs of different ranges; "-": LOWERDIR as it is on disk. The idmapped
 *       mount is never attached anywhere: the overlay holds the only
 *       reference, so it goes with the overlay (or with this process when
 *       the overlay mount fails). Replaces `mount -o loop`, a later
 *       `losetup --direct-io=on` and `mount -t overlay`. With `-- CMD…`,
 *       execs CMD when all is mounted (the engine that starts the VE), so
 *       the start costs one process start less; CMD is searched on PATH.
 *       With `--console FILE`, FILE (truncated; it may live on the disk just
 *       mounted) becomes CMD's stdout and stderr; our own errors stay on
 *       the stderr we were given. With `--engine-ns FD` (a mount namespace
 *       from `vesh-session engine-ns`), CMD's namespace is made from that
 *       one, with the VE's directory (ROOTFS's parent, which must hold
 *       PRIVATE) cloned in, instead of from the host's (see engine_view).
 *
 *   vesh-setup net-hook HOSTVETH BRIDGE_IFINDEX ADDRESS PREFIX GATEWAY MAC
 *       An OCI createRuntime hook: reads the runtime state JSON on stdin for
 *       the VE init's pid, makes a veth pair over rtnetlink (host end HOSTVETH
 *       on the bridge; VE end eth0 with address MAC straight in the VE's
 *       network namespace). Before the host end comes up, its bridge port is
 *       set to learn no MAC, flood no unknown unicast and stay isolated from
 *       the other VE ports, the bridge gets a static FDB entry MAC -> HOSTVETH
 *       and the host a permanent neighbour entry ADDRESS -> MAC on the
 *       bridge: nothing the VE sends can teach the host where an address or
 *       MAC is. Then, inside the VE's namespace, lo and eth0 come up with
 *       ADDRESS/PREFIX and the default route via GATEWAY. On failure the host
 *       end is deleted (which deletes the pair and its FDB entry). Replaces
 *       sh + nsenter + ip + bridge.
 *
 *   vesh-setup shift DIR FROM TO COUNT
 *       Give every file under DIR (DIR included) owned by a uid or gid in
 *       FROM..FROM+COUNT-1 the same id in TO..TO+COUNT-1 instead: a VE made
 *       when all VEs shared one range, moved to its own. The tree is VE
 *       root's: it is walked by descriptor, never following a symlink
 *       (entries are changed with AT_SYMLINK_NOFOLLOW or through an O_PATH
 *       descriptor opened with O_NOFOLLOW), and the setuid/setgid bits that
 *       chown clears are put back. Ids outside FROM's range are left alone,
 *       so a hard-linked inode met twice is changed once. Prints the number
 *       of entries changed.
 *
 * Errors: one line on stderr naming the step and the reason; exit 1.
 * Nothing here decides policy: the TypeScript side chooses every name,
 * address and path.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_link.h>
#include <linux/loop.h>
#include <linux/neighbour.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/veth.h>
#include <net/if.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void die(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("vesh-setup: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  exit(1);
}

static long parse_num(const char *s, const char *what) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || *s == '\0' || *end != '\0' || v < 0) die("%s is not a number: %s", what, s);
  return v;
}

/* ------------------------------------------------------------------ mount */

/*
 * The name of PATH inside PARENT when PATH is PARENT/NAME (one component),
 * so that it can be reached from PARENT's descriptor; anything else is a
 * caller's mistake.
 */
static const char *child_name(const char *parent, const char *path) {
  size_t n = strlen(parent);
  const char *name = path + n + 1;
  if (strncmp(path, parent, n) != 0 || path[n] != '/' || *name == '\0' || strchr(name, '/') || strcmp(name, ".") == 0 || strcmp(name, "..") == 0) {
    die("%s must be a direct child of %s", path, parent);
  }
  return name;
}

/*
 * Directory NAME in the directory open as PARENT (PATH for messages), made
 * if missing, and given to OWNER unless OWNER is (uid_t)-1; returns its
 * descriptor. The image root belongs to VE root, so a host process with
 * that uid could plant a symlink here: the entry is opened with O_NOFOLLOW
 * and chowned through the descriptor, so a link is refused, never followed
 * (chown(2) by path would hand its target to VE root).
 */
static int owned_dir_at(int parent, const char *path, const char *name, uid_t owner) {
  if (mkdirat(parent, name, 0755) != 0 && errno != EEXIST) die("mkdir %s: %s", path, strerror(errno));
  int fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) die("open %s: %s (it must be a directory, not a symlink: remove it while the VE is stopped)", path, strerror(errno));
  if (owner != (uid_t)-1 && fchown(fd, owner, owner) != 0) die("chown %s: %s", path, strerror(errno));
  return fd;
}

/*
 * Read-ahead of a VE's disk, KiB. Kernel 6.x gives a loop device twice its
 * largest request (2.5 MiB here) at every attach (LOOP_CONFIGURE resets it).
 * In a VE whose page cache cannot hold what it reads (a 1 GiB file in a 1G
 * VE), every window is memory reclaimed from the VE first, and with 2.5 MiB
 * windows sftp-server spent 1.9 s of CPU per GiB downloaded, 0.8-0.9 s
 * with 128 or 256 KiB, the excess nearly all in copying the just-read pages
 * out (_copy_to_iter); 512 KiB did not help. A lone `dd` of the same file
 * took as long with 256 KiB as with 2.5 MiB, and longer with 128 KiB
 * (bench/README.md, "VE disk read-ahead").
 */
#define VE_DISK_READ_AHEAD_KB 256

/*
 * A free loop device bound to IMAGE, with autoclear (freed at the last
 * unmount, as `mount -o loop` does), direct I/O (the VE's own ext4 page
 * cache is the only cache of its blocks) and VE_DISK_READ_AHEAD_KB of
 * read-ahead. Returns the open device.
 */
static int attach_loop(const char *image, char *dev, size_t devlen) {
  int file = open(image, O_RDWR | O_CLOEXEC);
  if (file < 0) die("open %s: %s", image, strerror(errno));
  int ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
  if (ctl < 0) die("open /dev/loop-control: %s (is the loop module loaded? modprobe loop)", strerror(errno));
  for (int attempt = 0; attempt < 20; attempt++) {
    int n = ioctl(ctl, LOOP_CTL_GET_FREE);
    if (n < 0) die("no free loop device: %s", strerror(errno));
    snprintf(dev, devlen, "/dev/loop%d", n);
    int fd = open(dev, O_RDWR | O_CLOEXEC);
    if (fd < 0) die("open %s: %s", dev, strerror(errno));
    struct loop_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.fd = (unsigned)file;
    cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO;
    strncpy((char *)cfg.info.lo_file_name, image, LO_NAME_SIZE - 1);
    int rc = ioctl(fd, LOOP_CONFIGURE, &cfg);
    if (rc != 0 && errno == EINVAL) {
      /* The backing file system cannot do direct I/O: cached I/O still works. */
      cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR;
      rc = ioctl(fd, LOOP_CONFIGURE, &cfg);
    }
    if (rc == 0) {
      close(ctl);
      close(file);
      /* BLKRASET counts 512-byte sectors. */
      if (ioctl(fd, BLKRASET, (unsigned long)VE_DISK_READ_AHEAD_KB * 2) != 0) {
        int err = errno;
        close(fd); /* autoclear frees the device with its last user */
        die("set the read-ahead of %s: %s", dev, strerror(err));
      }
      return fd;
    }
    int err = errno;
    close(fd);
    /* Another process took this device between GET_FREE and CONFIGURE: take the next. */
    if (err != EBUSY) die("attach %s to %s: %s", image, dev, strerror(err));
  }
  die("no free loop device after 20 attempts (too many loop devices busy)");
  return -1;
}

/*
 * A user namespace whose uid and gid maps are "INSIDE OUTSIDE COUNT": what
 * mount_setattr(MOUNT_ATTR_IDMAP) takes to map ids on a mount. A child made
 * with clone(CLONE_NEWUSER) waits on a pipe while we (host root) write its
 * maps and open its namespace; the namespace lives on in our descriptor
 * after the child has gone. One short child, no program started.
 */
static int userns_with_map(unsigned long inside, unsigned long outside, unsigned long count) {
  int sync[2];
  if (pipe2(sync, O_CLOEXEC) != 0) die("pipe for the id-map namespace: %s", strerror(errno));
  /* Raw clone without a new stack: the child runs on a copy of ours, as after fork. */
  long pid = syscall(SYS_clone, (unsigned long)(CLONE_NEWUSER | SIGCHLD), NULL, NULL, NULL, NULL);
  if (pid < 0) die("make a user namespace for the VE's id map: %s", strerror(errno));
  if (pid == 0) {
    char c;
    close(sync[1]);
    while (read(sync[0], &c, 1) < 0 && errno == EINTR) {}
    _exit(0);
  }
  close(sync[0]);
  char line[96], file[64];
  int len = snprintf(line, sizeof line, "%lu %lu %lu\n", inside, outside, count);
  const char *maps[] = {"uid_map", "gid_map"};
  int ns = -1, failed = 0, err = 0;
  for (int i = 0; i < 2 && !failed; i++) {
    snprintf(file, sizeof file, "/proc/%ld/%s", pid, maps[i]);
    int fd = open(file, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, line, (size_t)len) != len) {
      failed = 1;
      err = errno;
    }
    if (fd >= 0) close(fd);
  }
  if (!failed) {
    snprintf(file, sizeof file, "/proc/%ld/ns/user", pid);
    ns = open(file, O_RDONLY | O_CLOEXEC);
    if (ns < 0) err = errno;
  }
  close(sync[1]);
  while (waitpid((pid_t)pid, NULL, 0) < 0 && errno == EINTR) {}
  if (ns < 0) die("id map %lu -> %lu (%lu ids) for the template: %s", inside, outside, count, strerror(err));
  return ns;
}

/*
 * LOWER as a detached, read-only mount on which ids FROM..FROM+COUNT-1 of
 * the files appear as ROOT..ROOT+COUNT-1. Returns its descriptor; the
 * overlay takes it as a layer by /proc/self/fd/N.
 */
static int idmapped_lower(const char *lower, unsigned long from, uid_t root, unsigned long count) {
  int tree = open_tree(AT_FDCWD, lower, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE);
  if (tree < 0) die("open_tree %s: %s", lower, strerror(errno));
  int ns = userns_with_map(from, root, count);
  struct mount_attr attr;
  memset(&attr, 0, sizeof attr);
  attr.attr_set = MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY;
  attr.userns_fd = (uint64_t)ns;
  if (mount_setattr(tree, "", AT_EMPTY_PATH | AT_RECURSIVE, &attr, sizeof attr) != 0) {
    die("idmapped mount of %s (template ids %lu.. as %lu..): %s (the template's file system must support idmapped mounts: ext4, xfs, btrfs, tmpfs)", lower, from, (unsigned long)root, strerror(errno));
  }
  close(ns);
  return tree;
}

/* "FROM:COUNT" of LOWERIDS. */
static void parse_lower_ids(const char *s, unsigned long *from, unsigned long *count) {
  char *end;
  errno = 0;
  *from = strtoul(s, &end, 10);
  if (errno || end == s || *end != ':' || *s == '-') die("LOWERIDS must be FROM:COUNT or -: %s", s);
  const char *c = end + 1;
  *count = strtoul(c, &end, 10);
  if (errno || end == c || *end != '\0' || *c == '-' || *count == 0 || *count > UINT32_MAX || *from > UINT32_MAX - *count) die("LOWERIDS must be FROM:COUNT or -: %s", s);
}

/*
 * The host's view of ROOTFS stays nosuid (no host user may gain VE root's
 * host uid from a setuid file VE root made); the VE's own view must honour
 * setuid (sudo, su, passwd and ping for plain users inside, where it only
 * ever gives ids of the VE's own range). So the engine we exec runs in a
 * mount namespace of its own, a slave of the host's (nothing we change
 * there reaches the host), where ROOTFS is remounted without nosuid; the
 * VE's mount namespace is made from that one. Once the engine has started
 * the VE and exited, the namespace is gone with it.
 */
static void remount_suid_for_engine(const char *rootfs) {
  if (mount(NULL, rootfs, NULL, MS_REMOUNT | MS_BIND | MS_NODEV, NULL) != 0) die("remount %s with setuid for the VE: %s", rootfs, strerror(errno));
}

static void suid_view_for_engine(const char *rootfs) {
  if (unshare(CLONE_NEWNS) != 0) die("unshare a mount namespace for the engine: %s", strerror(errno));
  if (mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) != 0) die("make the engine's mounts slaves of the host's: %s", strerror(errno));
  remount_suid_for_engine(rootfs);
}

/*
 * The engine's namespace made from ENGINE_NS (see engine-ns in
 * vesh-session.c: the host's system mounts without any VE's file systems)
 * rather than from the host's, which holds two mounts per VE: unshare copies
 * every mount it starts from, and runc reads them all several times and
 * copies them again for the VE (measured: +40 ms of CPU per raw `runc run`
 * with 2000 mounts more). The VE's directory (ROOTFS's parent: the bundle,
 * PRIVATE, ROOTFS) is cloned from the host's namespace into ours, a slave of
 * the host's copy as before. Returns 0, back in the host's namespace, when
 * PRIVATE is not in that directory or a path CMD names does not lead to the
 * same file here as on the host (mounted on the host after ENGINE_NS was
 * made): the caller then makes the namespace from the host's.
 */
static int engine_view(int engine_ns, const char *priv, const char *rootfs, char **then) {
  char dir[PATH_MAX];
  snprintf(dir, sizeof dir, "%s", rootfs);
  char *slash = strrchr(dir, '/');
  if (!slash || slash == dir) return 0;
  *slash = '\0';
  size_t dl = strlen(dir);
  if (strncmp(priv, dir, dl) != 0 || priv[dl] != '/') return 0;
  /* Every absolute path CMD names that exists here, PRIVATE and ROOTFS, must be the same file there. */
  const char *paths[64];
  struct stat want[64];
  int n = 0;
  paths[n++] = priv;
  paths[n++] = rootfs;
  for (char **a = then; *a && n < 64; a++) {
    if ((*a)[0] == '/' && stat(*a, &want[n]) == 0) paths[n++] = *a;
  }
  for (int k = 0; k < 2; k++) {
    if (stat(paths[k], &want[k]) != 0) die("stat %s: %s", paths[k], strerror(errno));
  }
  int tree = (int)syscall(SYS_open_tree, AT_FDCWD, dir, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE);
  if (tree < 0) die("clone %s for the engine: %s", dir, strerror(errno));
  int host = open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC);
  if (host < 0) die("open /proc/self/ns/mnt: %s", strerror(errno));
  if (setns(engine_ns, CLONE_NEWNS) != 0) die("enter the engine's mount namespace: %s", strerror(errno));
  if (unshare(CLONE_NEWNS) != 0) die("unshare a mount namespace for the engine: %s", strerror(errno));
  if (syscall(SYS_move_mount, tree, "", AT_FDCWD, dir, MOVE_MOUNT_F_EMPTY_PATH) != 0) die("mount %s in the engine's namespace: %s", dir, strerror(errno));
  if (mount(NULL, dir, NULL, MS_REC | MS_SLAVE, NULL) != 0) die("make %s a slave of the host's: %s", dir, strerror(errno));
  close(tree);
  int same = 1;
  for (int k = 0; k < n && same; k++) {
    struct stat st;
    same = stat(paths[k], &st) == 0 && st.st_dev == want[k].st_dev && st.st_ino == want[k].st_ino;
  }
  if (!same && setns(host, CLONE_NEWNS) != 0) die("return to the host's mount namespace: %s", strerror(errno));
  close(host);
  return same;
}

static int cmd_mount(int argc, char **argv) {
  char **then = NULL;
  const char *console = NULL;
  int engine_ns = -1;
  int i = 12;
  if (i + 1 < argc && strcmp(argv[i], "--console") == 0) {
    console = argv[i + 1];
    i += 2;
  }
  if (i + 1 < argc && strcmp(argv[i], "--engine-ns") == 0) {
    engine_ns = (int)parse_num(argv[i + 1], "--engine-ns");
    i += 2;
  }
  if (i + 1 < argc && strcmp(argv[i], "--") == 0) {
    then = argv + i + 1;
    i = argc;
  }
  if (argc < 12 || i != argc) die("usage: vesh-setup mount IMAGE|- PRIVATE UPPER WORK CTL MARKER ROOTFS LOWERDIR|- ROOTID LOWERIDS|- [--console FILE] [--engine-ns FD] [-- CMD ARG…]");
  const char *image = argv[2], *priv = argv[3], *upper = argv[4], *work = argv[5], *ctl = argv[6], *marker = argv[7], *rootfs = argv[8], *lower = argv[9];
  uid_t root = (uid_t)parse_num(argv[10], "ROOTID");
  unsigned long lower_from = 0, lower_count = 0;
  if (strcmp(argv[11], "-") != 0) parse_lower_ids(argv[11], &lower_from, &lower_count);
  if (strcmp(marker, "-") != 0 && (strchr(marker, '/') || strcmp(marker, ".") == 0 || strcmp(marker, "..") == 0)) die("MARKER must be a plain file name: %s", marker);

  if (mkdir(priv, 0711) != 0 && errno != EEXIST) die("mkdir %s: %s", priv, strerror(errno));
  if (strcmp(image, "-") != 0) {
    char dev[64];
    int loop = attach_loop(image, dev, sizeof dev);
    /* nosuid, nodev: VE root makes the files on it; a setuid file or a device node made there must give a host user nothing.
       nombcache: no cache for sharing identical xattr blocks between files, an 8 KiB hash table per mount
       (kmalloc-8k 13-14 -> 6-7 KiB per mount over 100 mounts, bench/README.md "Lean VEs"); xattrs still work. */
    if (mount(dev, priv, "ext4", MS_NOATIME | MS_NODEV | MS_NOSUID, "nombcache") != 0) {
      int err = errno;
      close(loop); /* autoclear frees the device with its last user */
      die("mount %s (%s) on %s: %s", image, dev, priv, strerror(err));
    }
    close(loop);
  }
  int privfd = open(priv, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (privfd < 0) die("open %s: %s", priv, strerror(errno));
  int upperfd = owned_dir_at(privfd, upper, child_name(priv, upper), root);
  int workfd = owned_dir_at(privfd, work, child_name(priv, work), (uid_t)-1);
  int ctlfd = owned_dir_at(privfd, ctl, child_name(priv, ctl), root);
  close(privfd);
  if (strcmp(marker, "-") != 0) {
    /* Written by VE root: whatever it is (file, symlink, directory), only the entry goes. */
    if (unlinkat(ctlfd, marker, 0) != 0 && errno != ENOENT && !(errno == EISDIR && unlinkat(ctlfd, marker, AT_REMOVEDIR) == 0)) {
      die("cannot remove %s/%s (made inside the VE as /run/vesh/%s): %s; remove it, then start again", ctl, marker, marker, strerror(errno));
    }
  }
  close(ctlfd);
  if (mkdir(rootfs, 0755) != 0 && errno != EEXIST) die("mkdir %s: %s", rootfs, strerror(errno));
  if (strcmp(lower, "-") != 0) {
    /*
     * The layers by descriptor (/proc/self/fd/N): upper and work are the
     * directories just opened without following links, and the options the
     * kernel keeps, which the VE reads in its /proc/self/mountinfo, name no
     * host path. nosuid, nodev: see the image mount above.
     */
    int lowerfd = lower_count ? idmapped_lower(lower, lower_from, root, lower_count) : open(lower, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (lowerfd < 0) die("open %s: %s", lower, strerror(errno));
    char opts[128];
    snprintf(opts, sizeof opts, "lowerdir=/proc/self/fd/%d,upperdir=/proc/self/fd/%d,workdir=/proc/self/fd/%d", lowerfd, upperfd, workfd);
    if (mount("overlay", rootfs, "overlay", MS_NOSUID | MS_NODEV, opts) != 0) die("mount overlay of %s on %s: %s", lower, rootfs, strerror(errno));
    close(lowerfd);
  }
  close(upperfd);
  close(workfd);
  if (then) {
    if (engine_ns >= 0 && engine_view(engine_ns, priv, rootfs, then)) remount_suid_for_engine(rootfs);
    else suid_view_for_engine(rootfs);
    if (engine_ns >= 0) close(engine_ns);
    if (console) {
      /* On the VE's disk: never follow a link or wait on a FIFO planted there; only a regular file will do. */
      int fd = open(console, O_WRONLY | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0600);
      if (fd < 0) die("open %s: %s", console, strerror(errno));
      struct stat st;
      if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) die("%s is not a regular file: remove it, then start again", console);
      if (ftruncate(fd, 0) != 0 || fcntl(fd, F_SETFL, 0) != 0) die("console %s: %s", console, strerror(errno));
      int err = dup(2); /* our own stderr, for an exec failure */
      if (err < 0 || fcntl(err, F_SETFD, FD_CLOEXEC) != 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0) die("console %s: %s", console, strerror(errno));
      close(fd);
      execvp(then[0], then);
      int e = errno;
      dprintf(err, "vesh-setup: cannot run %s: %s\n", then[0], strerror(e));
      exit(e == ENOENT ? 127 : 126);
    }
    execvp(then[0], then);
    int err = errno;
    fprintf(stderr, "vesh-setup: cannot run %s: %s\n", then[0], strerror(err));
    exit(err == ENOENT ? 127 : 126); /* as shells report a command not found / not runnable */
  }
  return 0;
}

/* --------------------------------------------------------------- net-hook */

struct nlreq {
  struct nlmsghdr h;
  char buf[1024];
};

static struct rtattr *nl_add(struct nlreq *r, unsigned short type, const void *data, size_t len) {
  size_t off = NLMSG_ALIGN(r->h.nlmsg_len);
  if (off + RTA_SPACE(len) > sizeof *r) die("netlink request too large");
  struct rtattr *a = (struct rtattr *)((char *)r + off);
  a->rta_type = type;
  a->rta_len = (unsigned short)RTA_LENGTH(len);
  if (len) memcpy(RTA_DATA(a), data, len);
  r->h.nlmsg_len = (unsigned)(off + RTA_SPACE(len));
  return a;
}

static void nl_end(struct nlreq *r, struct rtattr *nest) {
  nest->rta_len = (unsigned short)((char *)r + r->h.nlmsg_len - (char *)nest);
}

static void nl_init(struct nlreq *r, unsigned short type, unsigned short flags, const void *hdr, size_t hdrlen) {
  memset(r, 0, sizeof *r);
  r->h.nlmsg_len = (unsigned)NLMSG_LENGTH(hdrlen);
  r->h.nlmsg_type = type;
  r->h.nlmsg_flags = (unsigned short)(NLM_F_REQUEST | NLM_F_ACK | flags);
  memcpy(NLMSG_DATA(&r->h), hdr, hdrlen);
}

static int nl_socket(void) {
  int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
  if (fd < 0) die("netlink socket: %s", strerror(errno));
  return fd;
}

/* Send one request and wait for its ack: 0, or the kernel's errno. */
static int nl_talk(int fd, struct nlreq *r) {
  static unsigned seq;
  r->h.nlmsg_seq = ++seq;
  struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
  if (sendto(fd, r, r->h.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof kernel) < 0) return errno;
  char buf[8192];
  for (;;) {
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
      if (h->nlmsg_seq != r->h.nlmsg_seq) continue;
      if (h->nlmsg_type == NLMSG_ERROR) {
        struct nlmsgerr *e = NLMSG_DATA(h);
        return -e->error;
      }
    }
  }
}

static const char *host_veth;
static int host_nl = -1;

/* Undo: deleting the host end deletes the pair. */
static void net_fail(const char *fmt, ...) {
  if (host_nl >= 0 && host_veth) {
    struct nlreq r;
    struct ifinfomsg ifi = {.ifi_family = AF_UNSPEC};
    nl_init(&r, RTM_DELLINK, 0, &ifi, sizeof ifi);
    nl_add(&r, IFLA_IFNAME, host_veth, strlen(host_veth) + 1);
    nl_talk(host_nl, &r);
  }
  va_list ap;
  va_start(ap, fmt);
  fputs("vesh-setup: network: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  exit(1);
}

static long state_pid(void) {
  char buf[16384];
  size_t len = fread(buf, 1, sizeof buf - 1, stdin);
  buf[len] = '\0';
  const char *p = strstr(buf, "\"pid\"");
  if (!p) die("network hook: no pid in the runtime state on stdin");
  p += 5;
  while (*p == ' ' || *p == ':' || *p == '\t' || *p == '\n') p++;
  char *end;
  long pid = strtol(p, &end, 10);
  if (end == p || pid <= 0) die("network hook: bad pid in the runtime state");
  return pid;
}

static int link_up(int fd, int index) {
  struct nlreq r;
  struct ifinfomsg ifi = {.ifi_family = AF_UNSPEC, .ifi_index = index, .ifi_flags = IFF_UP, .ifi_change = IFF_UP};
  nl_init(&r, RTM_NEWLINK, 0, &ifi, sizeof ifi);
  return nl_talk(fd, &r);
}

static int parse_mac(const char *s, unsigned char mac[6]) {
  unsigned v[6];
  char end;
  if (sscanf(s, "%2x:%2x:%2x:%2x:%2x:%2x%c", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &end) != 6) return -1;
  for (int i = 0; i < 6; i++) mac[i] = (unsigned char)v[i];
  /* A VE's MAC must be unicast: a multicast source would be flooded, not pinned. */
  return (mac[0] & 1) ? -1 : 0;
}

/* The host end's bridge port: no learning, no unknown-unicast flooding, isolated. */
static int harden_port(int fd, int index) {
  struct nlreq r;
  struct ifinfomsg ifi = {.ifi_family = AF_BRIDGE, .ifi_index = index};
  nl_init(&r, RTM_SETLINK, 0, &ifi, sizeof ifi);
  struct rtattr *pi = nl_add(&r, IFLA_PROTINFO | NLA_F_NESTED, NULL, 0);
  unsigned char off = 0, on = 1;
  nl_add(&r, IFLA_BRPORT_LEARNING, &off, 1);
  nl_add(&r, IFLA_BRPORT_UNICAST_FLOOD, &off, 1);
  nl_add(&r, IFLA_BRPORT_ISOLATED, &on, 1);
  nl_end(&r, pi);
  return nl_talk(fd, &r);
}

/* A static FDB entry: frames for MAC go to port INDEX, whatever the VE sends. */
static int pin_fdb(int fd, int index, const unsigned char mac[6]) {
  struct nlreq r;
  struct ndmsg nd = {.ndm_family = AF_BRIDGE, .ndm_ifindex = index, .ndm_state = NUD_NOARP, .ndm_flags = NTF_MASTER};
  nl_init(&r, RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, &nd, sizeof nd);
  nl_add(&r, NDA_LLADDR, mac, 6);
  return nl_talk(fd, &r);
}

/* A permanent neighbour entry on the bridge: ARP from a VE cannot change it. */
static int pin_neighbour(int fd, int bridge, const struct in_addr *addr, const unsigned char mac[6]) {
  struct nlreq r;
  struct ndmsg nd = {.ndm_family = AF_INET, .ndm_ifindex = bridge, .ndm_state = NUD_PERMANENT};
  nl_init(&r, RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, &nd, sizeof nd);
  nl_add(&r, NDA_DST, addr, sizeof *addr);
  nl_add(&r, NDA_LLADDR, mac, 6);
  return nl_talk(fd, &r);
}

/*
 * IPv6 off on one device of the current network namespace (/proc/sys/net
 * shows the namespace of the process that opens it), before the device comes
 * up: no link-local address, no routes for it, no solicited-node group, no
 * router solicitations or MLD reports. VEs get no IPv6 and the bridge table
 * drops it from them; per device this saves the kernel memory of all of that
 * (bench/README.md, "Lean VEs"). 0 when the kernel has no IPv6 (nothing to turn off).
 */
static int ipv6_off(const char *dev) {
  char file[96];
  snprintf(file, sizeof file, "/proc/sys/net/ipv6/conf/%s/disable_ipv6", dev);
  int fd = open(file, O_WRONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    return err == ENOENT && access("/proc/sys/net/ipv6", F_OK) != 0 ? 0 : err;
  }
  int err = write(fd, "1", 1) == 1 ? 0 : errno;
  close(fd);
  return err;
}

static int cmd_net_hook(int argc, char **argv) {
  if (argc != 8) die("usage: vesh-setup net-hook HOSTVETH BRIDGE_IFINDEX ADDRESS PREFIX GATEWAY MAC");
  const char *veth = argv[2];
  int bridge = (int)parse_num(argv[3], "BRIDGE_IFINDEX");
  struct in_addr addr, gw;
  if (inet_pton(AF_INET, argv[4], &addr) != 1) die("bad ADDRESS %s", argv[4]);
  long prefix = parse_num(argv[5], "PREFIX");
  if (prefix > 32) die("bad PREFIX %s", argv[5]);
  if (inet_pton(AF_INET, argv[6], &gw) != 1) die("bad GATEWAY %s", argv[6]);
  unsigned char mac[6];
  if (parse_mac(argv[7], mac) != 0) die("bad MAC %s (want a unicast aa:bb:cc:dd:ee:ff)", argv[7]);
  if (strlen(veth) >= IFNAMSIZ) die("interface name too long: %s", veth);

  long pid = state_pid();
  char nspath[64];
  snprintf(nspath, sizeof nspath, "/proc/%ld/ns/net", pid);
  int ns = open(nspath, O_RDONLY | O_CLOEXEC);
  if (ns < 0) die("network hook: open %s: %s", nspath, strerror(errno));

  /* The pair, made from the host's namespace (the runtime's, ours); the host
     end stays down until its port and entries are pinned. */
  host_nl = nl_socket();
  {
    struct nlreq r;
    struct ifinfomsg ifi = {.ifi_family = AF_UNSPEC};
    nl_init(&r, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &ifi, sizeof ifi);
    /* One queue pair per end: veth makes one per possible CPU by default,
       each with its own sysfs directories, for a link that idles. */
    unsigned one = 1;
    nl_add(&r, IFLA_IFNAME, veth, strlen(veth) + 1);
    nl_add(&r, IFLA_NUM_TX_QUEUES, &one, sizeof one);
    nl_add(&r, IFLA_NUM_RX_QUEUES, &one, sizeof one);
    nl_add(&r, IFLA_MASTER, &bridge, sizeof bridge);
    struct rtattr *info = nl_add(&r, IFLA_LINKINFO, NULL, 0);
    nl_add(&r, IFLA_INFO_KIND, "veth", 4);
    struct rtattr *data = nl_add(&r, IFLA_INFO_DATA, NULL, 0);
    struct rtattr *peer = nl_add(&r, VETH_INFO_PEER, NULL, 0);
    /* The peer's ifinfomsg comes first inside VETH_INFO_PEER. */
    struct ifinfomsg pifi = {.ifi_family = AF_UNSPEC};
    size_t off = NLMSG_ALIGN(r.h.nlmsg_len);
    if (off + NLMSG_ALIGN(sizeof pifi) > sizeof r) die("netlink request too large");
    memcpy((char *)&r + off, &pifi, sizeof pifi);
    r.h.nlmsg_len = (unsigned)(off + NLMSG_ALIGN(sizeof pifi));
    nl_add(&r, IFLA_IFNAME, "eth0", 5);
    nl_add(&r, IFLA_NUM_TX_QUEUES, &one, sizeof one);
    nl_add(&r, IFLA_NUM_RX_QUEUES, &one, sizeof one);
    nl_add(&r, IFLA_ADDRESS, mac, 6);
    nl_add(&r, IFLA_NET_NS_FD, &ns, sizeof ns);
    nl_end(&r, peer);
    nl_end(&r, data);
    nl_end(&r, info);
    int err = nl_talk(host_nl, &r);
    if (err == EEXIST) die("network: %s already exists (left over from an earlier run? \"ip link del %s\" removes it)", veth, veth);
    if (err) die("network: make veth pair %s/eth0 on bridge %d: %s", veth, bridge, strerror(err));
  }
  host_veth = veth; /* from here on, failures delete the pair */
  int port = (int)if_nametoindex(veth);
  if (!port) net_fail("%s vanished after it was made", veth);
  int err;
  if ((err = harden_port(host_nl, port))) net_fail("bridge port %s: learning off, flood off, isolated: %s", veth, strerror(err));
  if ((err = pin_fdb(host_nl, port, mac))) net_fail("static FDB entry %s on %s: %s", argv[7], veth, strerror(err));
  if ((err = pin_neighbour(host_nl, bridge, &addr, mac))) net_fail("permanent neighbour %s -> %s on bridge %d: %s", argv[4], argv[7], bridge, strerror(err));
  if ((err = ipv6_off(veth))) net_fail("IPv6 off on %s: %s", veth, strerror(err));
  if ((err = link_up(host_nl, port))) net_fail("%s up: %s", veth, strerror(err));

  if (setns(ns, CLONE_NEWNET) != 0) net_fail("enter the VE's network namespace: %s", strerror(errno));
  int ve_nl = nl_socket(); /* bound to the VE's namespace */
  int lo = (int)if_nametoindex("lo"), eth0 = (int)if_nametoindex("eth0");
  if (!lo || !eth0) net_fail("lo or eth0 missing in the VE's namespace");
  if ((err = link_up(ve_nl, lo))) net_fail("lo up: %s", strerror(err));
  {
    struct nlreq r;
    struct ifaddrmsg ifa = {.ifa_family = AF_INET, .ifa_prefixlen = (unsigned char)prefix, .ifa_scope = RT_SCOPE_UNIVERSE, .ifa_index = (unsigned)eth0};
    nl_init(&r, RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &ifa, sizeof ifa);
    nl_add(&r, IFA_LOCAL, &addr, sizeof addr);
    nl_add(&r, IFA_ADDRESS, &addr, sizeof addr);
    if ((err = nl_talk(ve_nl, &r))) net_fail("address %s/%ld on eth0: %s", argv[4], prefix, strerror(err));
  }
  if ((err = ipv6_off("eth0"))) net_fail("IPv6 off on the VE's eth0: %s", strerror(err));
  if ((err = link_up(ve_nl, eth0))) net_fail("eth0 up: %s", strerror(err));
  {
    struct nlreq r;
    struct rtmsg rt = {.rtm_family = AF_INET, .rtm_table = RT_TABLE_MAIN, .rtm_protocol = RTPROT_BOOT, .rtm_scope = RT_SCOPE_UNIVERSE, .rtm_type = RTN_UNICAST};
    nl_init(&r, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &rt, sizeof rt);
    nl_add(&r, RTA_GATEWAY, &gw, sizeof gw);
    if ((err = nl_talk(ve_nl, &r))) net_fail("default route via %s: %s", argv[6], strerror(err));
  }
  return 0;
}

/* ------------------------------------------------------------------ shift */

struct shift_job {
  unsigned long from, to, count, changed;
};

static int shifted(unsigned long id, const struct shift_job *j, unsigned long *out) {
  if (id < j->from || id - j->from >= j->count) return 0;
  *out = id - j->from + j->to;
  return 1;
}

/*
 * Shift the entry NAME of the directory open as DIR (PATH for messages),
 * then, when it is a directory, everything in it. DEPTH bounds recursion: a
 * VE's tree is at most as deep as its disk lets it be, and a stack overflow
 * must not be the answer to a deep one.
 */
static void shift_entry(int dir, const char *name, const char *path, struct shift_job *j, int depth) {
  if (depth > 4096) die("%s: deeper than 4096 directories; nothing beyond was changed", path);
  int fd = openat(dir, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) die("open %s: %s", path, strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) die("stat %s: %s", path, strerror(errno));
  unsigned long uid = st.st_uid, gid = st.st_gid;
  int u = shifted(st.st_uid, j, &uid), g = shifted(st.st_gid, j, &gid);
  if (u || g) {
    /* Through the O_PATH descriptor: the inode just checked, whatever is renamed meanwhile; a symlink itself, never its target. */
    if (fchownat(fd, "", (uid_t)uid, (gid_t)gid, AT_EMPTY_PATH) != 0) die("chown %s: %s", path, strerror(errno));
    if (!S_ISLNK(st.st_mode) && (st.st_mode & (S_ISUID | S_ISGID))) {
      char self[64];
      snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
      if (chmod(self, st.st_mode & 07777) != 0) die("chmod %s: %s", path, strerror(errno));
    }
    j->changed++;
  }
  if (S_ISDIR(st.st_mode)) {
    int sub = openat(fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (sub < 0) die("open directory %s: %s", path, strerror(errno));
    DIR *d = fdopendir(sub);
    if (!d) die("read directory %s: %s", path, strerror(errno));
    struct dirent *e;
    errno = 0;
    while ((e = readdir(d)) != NULL) {
      if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
      size_t n = strlen(path) + strlen(e->d_name) + 2;
      char *child = malloc(n);
      if (!child) die("out of memory");
      snprintf(child, n, "%s/%s", path, e->d_name);
      shift_entry(dirfd(d), e->d_name, child, j, depth + 1);
      free(child);
      errno = 0;
    }
    if (errno) die("read directory %s: %s", path, strerror(errno));
    closedir(d);
  }
  close(fd);
}

static int cmd_shift(int argc, char **argv) {
  if (argc != 6) die("usage: vesh-setup shift DIR FROM TO COUNT");
  struct shift_job j = {
    .from = (unsigned long)parse_num(argv[3], "FROM"),
    .to = (unsigned long)parse_num(argv[4], "TO"),
    .count = (unsigned long)parse_num(argv[5], "COUNT"),
  };
  if (j.count == 0 || j.from + j.count > UINT32_MAX || j.to + j.count > UINT32_MAX) die("id range out of bounds: %s %s %s", argv[3], argv[4], argv[5]);
  if (j.from < j.to + j.count && j.to < j.from + j.count) die("the ranges %lu.. and %lu.. (%lu ids) overlap: a file could be shifted twice", j.from, j.to, j.count);
  /* DIR itself is ours (the VE's directory on the host): resolved as given; everything below, by descriptor. */
  shift_entry(AT_FDCWD, argv[2], argv[2], &j, 0);
  printf("%lu\n", j.changed);
  return 0;
}

int main(int argc, char **argv) {
  if (argc >= 2 && strcmp(argv[1], "mount") == 0) return cmd_mount(argc, argv);
  if (argc >= 2 && strcmp(argv[1], "net-hook") == 0) return cmd_net_hook(argc, argv);
  if (argc >= 2 && strcmp(argv[1], "shift") == 0) return cmd_shift(argc, argv);
  die("usage: vesh-setup mount … | net-hook … | shift … (see src/native/vesh-setup.c)");
  return 2;
}
