/* eventfd counters left non-zero across checkpoints, plain and EFD_SEMAPHORE.
 * usage: eventfd STEPS
 * A plain eventfd (non-blocking, close-on-exec) gets k = s % 7 + 1 added at every step and is read every third
 * step: the value read must be the sum added since the last read, and a further read must say EAGAIN. An
 * EFD_SEMAPHORE eventfd (non-blocking) gets s % 3 added at every step; one unit is taken at most steps (each read
 * must return exactly 1), and every fifth step it is drained: the number of reads that return 1 before EAGAIN
 * must be the count kept by the program. A third eventfd, blocking, created with an initial value of 12345 and
 * never written, is read (poll first: it must be readable) only at the last step. The fd flags
 * (O_NONBLOCK, FD_CLOEXEC) are checked at every step. Exits 99 with a MISMATCH line on any difference. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
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

static void add(int fd, uint64_t v) {
    if (write(fd, &v, 8) != 8) fail("eventfd write %d", fd);
}

static int readable(int fd) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int n = poll(&p, 1, 0);
    if (n < 0) fail("poll");
    return n == 1 && (p.revents & POLLIN);
}

static void flags(int fd, int nonblock, int cloexec) {
    int fl = fcntl(fd, F_GETFL), fd_fl = fcntl(fd, F_GETFD);
    if (fl < 0 || fd_fl < 0) fail("fcntl on eventfd %d", fd);
    if (!!(fl & O_NONBLOCK) != nonblock) fail("eventfd %d O_NONBLOCK is %d", fd, !!(fl & O_NONBLOCK));
    if ((fl & O_ACCMODE) != O_RDWR) fail("eventfd %d access mode %#x", fd, fl & O_ACCMODE);
    if (!!(fd_fl & FD_CLOEXEC) != cloexec) fail("eventfd %d FD_CLOEXEC is %d", fd, !!(fd_fl & FD_CLOEXEC));
}

int main(int argc, char **argv) {
    long steps = argc > 1 ? strtol(argv[1], 0, 10) : 200;
    setvbuf(stdout, NULL, _IOLBF, 0);
    int plain = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    int sem = eventfd(3, EFD_NONBLOCK | EFD_SEMAPHORE);
    int fixed = eventfd(12345, 0);
    if (plain < 0 || sem < 0 || fixed < 0) fail("eventfd");
    uint64_t sum = 0, count = 3, v;
    add(plain, 1000);
    sum = 1000;
    for (long s = 0; s < steps; s++) {
        cur = s;
        errno = 0;
        flags(plain, 1, 1);
        flags(sem, 1, 0);
        flags(fixed, 0, 0);
        if (!readable(fixed)) fail("the fixed eventfd is not readable");
        if (readable(plain) != (sum != 0)) fail("plain eventfd readable %d with sum %lu", readable(plain), (unsigned long)sum);
        if (readable(sem) != (count != 0)) fail("semaphore eventfd readable %d with count %lu", readable(sem), (unsigned long)count);
        uint64_t k = s % 7 + 1;
        add(plain, k);
        sum += k;
        if (s % 3 == 2) {
            if (read(plain, &v, 8) != 8) fail("plain read");
            if (v != sum) fail("plain eventfd read %lu, expected %lu", (unsigned long)v, (unsigned long)sum);
            sum = 0;
            if (read(plain, &v, 8) != -1 || errno != EAGAIN) fail("plain eventfd not empty after a read");
        }
        if (s % 3) {
            add(sem, s % 3);
            count += s % 3;
        }
        if (s % 5 == 4) {
            uint64_t n = 0;
            for (;;) {
                if (read(sem, &v, 8) != 8) {
                    if (errno != EAGAIN) fail("semaphore read");
                    break;
                }
                if (v != 1) fail("semaphore read %lu, expected 1", (unsigned long)v);
                n++;
            }
            if (n != count) fail("semaphore held %lu, expected %lu", (unsigned long)n, (unsigned long)count);
            count = 0;
        } else if (count > 1 && s % 2 == 0) {
            if (read(sem, &v, 8) != 8 || v != 1) fail("semaphore read gave %lu", (unsigned long)v);
            count--;
        }
        printf("step %ld\n", s);
        usleep(20000);
    }
    cur = steps;
    if (read(fixed, &v, 8) != 8 || v != 12345) fail("fixed eventfd read %lu, expected 12345", (unsigned long)v);
    if (sum && (read(plain, &v, 8) != 8 || v != sum)) fail("final plain read %lu, expected %lu", (unsigned long)v, (unsigned long)sum);
    printf("done\n");
    return 0;
}
