/* A sealed memfd, mapped twice and written both through a mapping and through the fd, across checkpoints.
 * usage: memfd STEPS
 * A memfd named "vos-test" (MFD_ALLOW_SEALING) of 320 KiB is filled with a pattern from a seed, sealed with
 * F_SEAL_SHRINK|F_SEAL_GROW, and mapped MAP_SHARED twice: read-write, and read-only at another address. The
 * program keeps a private copy of what the content must be. Each step writes some bytes through the writable
 * mapping and a run of bytes with pwrite, then checks the whole content three ways: through both mappings (they
 * must still be views of the same pages) and through lseek+read; the seals must be unchanged (and still enforced:
 * ftruncate and a write past the end fail with EPERM), the size too, the fd's offset must be where the last step
 * left it, and /proc/self/fd must name it "/memfd:vos-test (deleted)". Exits 99 with a MISMATCH line on any
 * difference. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define SIZE (320 * 1024)

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

static uint64_t rng = 0x9e3779b97f4a7c15ULL;
static uint64_t next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static uint64_t sum(const unsigned char *p, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ULL;
    return h;
}

int main(int argc, char **argv) {
    long steps = argc > 1 ? strtol(argv[1], 0, 10) : 200;
    setvbuf(stdout, NULL, _IOLBF, 0);
    int fd = memfd_create("vos-test", MFD_ALLOW_SEALING | MFD_CLOEXEC);
    if (fd < 0) fail("memfd_create");
    unsigned char *want = malloc(SIZE), *got = malloc(SIZE);
    for (size_t i = 0; i < SIZE; i += 8) {
        uint64_t v = next();
        memcpy(want + i, &v, 8);
    }
    for (size_t off = 0; off < SIZE;) {
        ssize_t n = write(fd, want + off, SIZE - off > 65536 ? 65536 : SIZE - off);
        if (n <= 0) fail("write");
        off += n;
    }
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)) fail("F_ADD_SEALS");
    unsigned char *rw = mmap(0, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    unsigned char *ro = mmap(0, SIZE, PROT_READ, MAP_SHARED, fd, 0);
    if (rw == MAP_FAILED || ro == MAP_FAILED || rw == ro) fail("mmap");
    off_t offset = lseek(fd, 0, SEEK_CUR);
    char link[256], expect_link[] = "/memfd:vos-test (deleted)", path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    for (long s = 0; s < steps; s++) {
        cur = s;
        errno = 0;
        int seals = fcntl(fd, F_GET_SEALS);
        if (seals != (F_SEAL_SHRINK | F_SEAL_GROW)) fail("seals %#x", seals);
        struct stat st;
        if (fstat(fd, &st) || st.st_size != SIZE || st.st_nlink != 0) fail("fstat: size %ld nlink %ld", (long)st.st_size, (long)st.st_nlink);
        if (ftruncate(fd, SIZE + 4096) != -1 || errno != EPERM) fail("growing ftruncate not refused");
        if (ftruncate(fd, SIZE - 4096) != -1 || errno != EPERM) fail("shrinking ftruncate not refused");
        if (pwrite(fd, "x", 1, SIZE) != -1 || errno != EPERM) fail("write past the end not refused");
        if (lseek(fd, 0, SEEK_CUR) != offset) fail("offset %ld, expected %ld", (long)lseek(fd, 0, SEEK_CUR), (long)offset);
        if (!(fcntl(fd, F_GETFD) & FD_CLOEXEC)) fail("FD_CLOEXEC lost");
        ssize_t l = readlink(path, link, sizeof link - 1);
        if (l < 0) fail("readlink %s", path);
        link[l] = 0;
        if (strcmp(link, expect_link)) fail("the memfd is named '%s'", link);
        /* Writes through the mapping, and through the fd. */
        for (int i = 0; i < 64; i++) {
            size_t at = next() % SIZE;
            unsigned char v = next();
            rw[at] = v;
            want[at] = v;
        }
        unsigned char run[1000];
        size_t len = 1 + next() % sizeof run, at = next() % (SIZE - len);
        for (size_t i = 0; i < len; i++) run[i] = next();
        if (pwrite(fd, run, len, at) != (ssize_t)len) fail("pwrite");
        memcpy(want + at, run, len);
        /* The whole content, three ways. */
        uint64_t h = sum(want, SIZE);
        if (memcmp(rw, want, SIZE) || sum(rw, SIZE) != h) fail("content through the writable mapping differs");
        if (memcmp(ro, want, SIZE) || sum(ro, SIZE) != h) fail("content through the read-only mapping differs");
        if (lseek(fd, 0, SEEK_SET) != 0) fail("lseek");
        for (size_t off = 0; off < SIZE;) {
            ssize_t n = read(fd, got + off, SIZE - off);
            if (n <= 0) fail("read at %zu", off);
            off += n;
        }
        if (memcmp(got, want, SIZE) || sum(got, SIZE) != h) fail("content through read() differs");
        offset = (s * 4099) % SIZE;
        if (lseek(fd, offset, SEEK_SET) != offset) fail("lseek");
        printf("step %ld\n", s);
        usleep(20000);
    }
    printf("done\n");
    return 0;
}
