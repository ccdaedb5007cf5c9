/* Open files without a name: one unlinked after opening, one made with O_TMPFILE, across checkpoints.
 * usage: deleted FILE STEPS
 * FILE is created (O_RDWR|O_APPEND), filled with 64 KiB of a pattern and unlinked, and kept open; a second file is
 * opened with O_TMPFILE in FILE's directory (O_RDWR, never linked) and filled with another 64 KiB. At every step the
 * program appends a chunk to each (write through O_APPEND; pwrite at the end), then checks all the content written
 * so far, through pread and through lseek+read; that fstat gives st_nlink 0 and the size; that the offsets are where
 * the last step left them and the flags (O_APPEND, access mode) unchanged; that /proc/self/fd names both
 * "... (deleted)"; and that FILE has not come back. Exits 99 with a MISMATCH line on any difference. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define INITIAL 65536
#define MAXSIZE (INITIAL + 1000 * 400)

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

struct file {
    const char *name;
    int fd, append;
    unsigned char *want, *got;
    size_t size;
    off_t offset;
};

static unsigned char pattern(int which, size_t i) { return (unsigned char)((i * 2654435761u) >> (13 + which)) ^ (unsigned char)(i >> 9); }

static void add(struct file *f, int which, size_t n) {
    if (f->size + n > MAXSIZE) fail("too many steps");
    for (size_t i = 0; i < n; i++) f->want[f->size + i] = pattern(which, f->size + i);
    ssize_t w = f->append ? write(f->fd, f->want + f->size, n) : pwrite(f->fd, f->want + f->size, n, f->size);
    if (w != (ssize_t)n) fail("%s: write of %zu bytes gave %zd", f->name, n, w);
    f->size += n;
    if (f->append) f->offset = f->size;
}

static void check(struct file *f, long s) {
    struct stat st;
    if (fstat(f->fd, &st)) fail("fstat %s", f->name);
    if (st.st_nlink != 0 || st.st_size != (off_t)f->size || !S_ISREG(st.st_mode))
        fail("%s: nlink %ld size %ld mode %o, expected nlink 0 size %zu", f->name, (long)st.st_nlink, (long)st.st_size, st.st_mode, f->size);
    int fl = fcntl(f->fd, F_GETFL);
    if ((fl & O_ACCMODE) != O_RDWR || !!(fl & O_APPEND) != f->append) fail("%s: flags %#x", f->name, fl);
    memset(f->got, 0, f->size);
    for (size_t off = 0; off < f->size;) {
        ssize_t n = pread(f->fd, f->got + off, f->size - off, off);
        if (n <= 0) fail("%s: pread at %zu", f->name, off);
        off += n;
    }
    if (memcmp(f->got, f->want, f->size)) fail("%s: content through pread differs", f->name);
    memset(f->got, 0, f->size);
    if (lseek(f->fd, 0, SEEK_SET) != 0) fail("lseek");
    size_t off = 0;
    for (;;) {
        ssize_t n = read(f->fd, f->got + off, MAXSIZE - off);
        if (n < 0) fail("%s: read at %zu", f->name, off);
        if (n == 0) break;
        off += n;
    }
    if (off != f->size || memcmp(f->got, f->want, f->size)) fail("%s: content through read differs (%zu bytes)", f->name, off);
    char path[64], link[4096];
    snprintf(path, sizeof path, "/proc/self/fd/%d", f->fd);
    ssize_t l = readlink(path, link, sizeof link - 1);
    if (l < 0) fail("readlink %s", path);
    link[l] = 0;
    if (l < 10 || strcmp(link + l - 10, " (deleted)")) fail("%s is named '%s'", f->name, link);
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: deleted FILE STEPS\n"); return 2; }
    const char *file = argv[1];
    long steps = strtol(argv[2], 0, 10);
    setvbuf(stdout, NULL, _IOLBF, 0);
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", file);
    dirname(dir);
    struct file f[2] = {{.name = "the unlinked file", .append = 1}, {.name = "the O_TMPFILE file"}};
    f[0].fd = open(file, O_RDWR | O_CREAT | O_TRUNC | O_APPEND, 0600);
    if (f[0].fd < 0) fail("open %s", file);
    f[1].fd = open(dir, O_TMPFILE | O_RDWR, 0600);
    if (f[1].fd < 0) fail("O_TMPFILE in %s", dir);
    for (int i = 0; i < 2; i++) {
        f[i].want = malloc(MAXSIZE);
        f[i].got = malloc(MAXSIZE);
        add(&f[i], i, INITIAL);
    }
    if (unlink(file)) fail("unlink %s", file);
    for (long s = 0; s < steps; s++) {
        cur = s;
        errno = 0;
        for (int i = 0; i < 2; i++)
            if (lseek(f[i].fd, 0, SEEK_CUR) != f[i].offset) fail("%s: offset %ld, expected %ld", f[i].name, (long)lseek(f[i].fd, 0, SEEK_CUR), (long)f[i].offset);
        if (access(file, F_OK) != -1 || errno != ENOENT) fail("%s exists again", file);
        add(&f[0], 0, 50 + s % 200);
        add(&f[1], 1, 100 + (s * 7) % 300);
        check(&f[0], s);
        check(&f[1], s);
        f[0].offset = (s * 37) % f[0].size;
        f[1].offset = (s * 53) % f[1].size;
        for (int i = 0; i < 2; i++)
            if (lseek(f[i].fd, f[i].offset, SEEK_SET) != f[i].offset) fail("lseek");
        printf("step %ld\n", s);
        usleep(20000);
    }
    printf("done\n");
    return 0;
}
