/* inotify watches keep their watch descriptors and their inodes across checkpoints.
 * usage: inotify DIR STEPS
 * DIR is made if missing. A first watch (on DIR/dummy) is added and removed before the real ones, so the real
 * watch descriptors do not start at 1: DIR is watched for IN_CREATE|IN_DELETE and DIR/watched.txt for
 * IN_MODIFY|IN_ATTRIB. At every step the program creates DIR/f<s>, deletes DIR/f<s-2>, appends a byte to
 * watched.txt (through an fd kept open) and, every fifth step, chmods it; then it reads the inotify fd
 * (non-blocking, close-on-exec): exactly those events, in order, with the watch descriptors returned when the
 * watches were added, the right masks and names, and nothing more. Adding the same watches again must return the
 * same descriptors (the kernel finds a watch by inode, so they must still be on DIR and watched.txt themselves).
 * Exits 99 with a MISMATCH line on any difference. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

static long cur = -1;

static void fail(const char *fmt, ...) {
    int e = errno;
    va_list ap;
    va_start(ap, fmt);
    printf("MISMATCH step %ld: ", cur);
    vprintf(fmt, ap);
    if (e) printf(" (errno %d %s)", e, strerror(e));
    printf("\n");
    va_end(ap);
    exit(99);
}

struct want {
    int wd;
    uint32_t mask;
    char name[32];
};

static int ifd;
static char buf[65536] __attribute__((aligned(8)));
static size_t have, at;

/* The next event, waiting up to 3 s for one. */
static struct inotify_event *next_event(void) {
    if (at >= have) {
        struct pollfd p = {.fd = ifd, .events = POLLIN};
        int n;
        do n = poll(&p, 1, 3000);
        while (n < 0 && errno == EINTR);
        if (n <= 0) return 0;
        ssize_t r = read(ifd, buf, sizeof buf);
        if (r <= 0) fail("inotify read");
        have = r;
        at = 0;
    }
    struct inotify_event *e = (struct inotify_event *)(buf + at);
    at += sizeof *e + e->len;
    if (at > have) fail("truncated inotify event");
    return e;
}

static void expect(struct want *w, int n) {
    for (int i = 0; i < n; i++) {
        struct inotify_event *e = next_event();
        if (!e) fail("event %d of %d (wd %d mask %#x %s) never came", i, n, w[i].wd, w[i].mask, w[i].name);
        const char *name = e->len ? e->name : "";
        if (e->wd != w[i].wd || e->mask != w[i].mask || strcmp(name, w[i].name) || e->cookie != 0)
            fail("event %d: wd %d mask %#x name '%s' cookie %u; expected wd %d mask %#x name '%s'", i, e->wd, e->mask, name, e->cookie, w[i].wd, w[i].mask, w[i].name);
    }
    if (at < have) fail("more events than expected");
    ssize_t r = read(ifd, buf, sizeof buf);
    if (r != -1 || errno != EAGAIN) fail("more events than expected (read %zd)", r);
    have = at = 0;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: inotify DIR STEPS\n"); return 2; }
    const char *dir = argv[1];
    long steps = strtol(argv[2], 0, 10);
    setvbuf(stdout, NULL, _IOLBF, 0);
    char path[4096], file[4096], dummy[4096];
    mkdir(dir, 0755);
    snprintf(file, sizeof file, "%s/watched.txt", dir);
    snprintf(dummy, sizeof dummy, "%s/dummy", dir);
    int wfd = open(file, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644), dfd = open(dummy, O_WRONLY | O_CREAT, 0644);
    if (wfd < 0 || dfd < 0) fail("creating files in %s", dir);
    close(dfd);
    ifd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (ifd < 0) fail("inotify_init1");
    int wd0 = inotify_add_watch(ifd, dummy, IN_ALL_EVENTS);
    if (wd0 < 0 || inotify_rm_watch(ifd, wd0)) fail("dummy watch");
    struct want ign = {wd0, IN_IGNORED, ""};
    expect(&ign, 1);
    unlink(dummy);
    const uint32_t dmask = IN_CREATE | IN_DELETE, fmask = IN_MODIFY | IN_ATTRIB;
    int wd_dir = inotify_add_watch(ifd, dir, dmask), wd_file = inotify_add_watch(ifd, file, fmask);
    if (wd_dir < 0 || wd_file < 0) fail("inotify_add_watch");
    if (wd_dir <= wd0 || wd_file <= wd0 || wd_dir == wd_file) fail("watch descriptors %d %d %d", wd0, wd_dir, wd_file);
    for (long s = 0; s < steps; s++) {
        cur = s;
        errno = 0;
        struct want w[4];
        int n = 0;
        snprintf(path, sizeof path, "%s/f%ld", dir, s);
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0) fail("create %s", path);
        close(fd);
        w[n].wd = wd_dir, w[n].mask = IN_CREATE, snprintf(w[n].name, sizeof w[n].name, "f%ld", s), n++;
        if (s >= 2) {
            snprintf(path, sizeof path, "%s/f%ld", dir, s - 2);
            if (unlink(path)) fail("unlink %s", path);
            w[n].wd = wd_dir, w[n].mask = IN_DELETE, snprintf(w[n].name, sizeof w[n].name, "f%ld", s - 2), n++;
        }
        char c = 'a' + s % 26;
        if (write(wfd, &c, 1) != 1) fail("write watched.txt");
        w[n].wd = wd_file, w[n].mask = IN_MODIFY, w[n].name[0] = 0, n++;
        if (s % 5 == 0) {
            if (fchmod(wfd, s % 10 ? 0644 : 0600)) fail("fchmod");
            w[n].wd = wd_file, w[n].mask = IN_ATTRIB, w[n].name[0] = 0, n++;
        }
        expect(w, n);
        int a = inotify_add_watch(ifd, dir, dmask), b = inotify_add_watch(ifd, file, fmask);
        if (a != wd_dir || b != wd_file) fail("watches re-added as %d %d, expected %d %d", a, b, wd_dir, wd_file);
        struct stat st;
        if (fstat(wfd, &st) || st.st_size != s + 1) fail("watched.txt size %ld", (long)st.st_size);
        printf("step %ld\n", s);
        usleep(20000);
    }
    cur = steps;
    for (long s = steps - 2; s < steps; s++) {
        snprintf(path, sizeof path, "%s/f%ld", dir, s);
        unlink(path);
    }
    printf("done\n");
    return 0;
}
