/* timerfds keep their schedule, their pending expirations and their settings across checkpoints.
 * usage: timerfd STEPS
 * Two periodic timers, armed at an absolute time START on their own clock: CLOCK_MONOTONIC every 30 ms and
 * CLOCK_BOOTTIME every 45 ms (both non-blocking). At every step each is read (expirations may be pending) and the
 * total read so far must be floor((now - START) / period) within +-2 (the job's clocks go on from the checkpoint
 * instant across a restore, so a timer fires on schedule); timerfd_gettime must report the period as interval and
 * the time to the next expiry in phase with START (within 10 ms). Also: a one-shot CLOCK_MONOTONIC timer armed
 * 1000 s ahead (its remaining time must follow the clock within 0.5 s), a one-shot timer that expired before step
 * 0 and is only read at the end (readable at every step, gettime all zero, the final read gives exactly 1), and a
 * timerfd never armed (never readable, gettime all zero). Exits 99 with a MISMATCH line on any difference. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/timerfd.h>
#include <time.h>
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

/* Times in nanoseconds. */
static int64_t now(clockid_t c) {
    struct timespec t;
    clock_gettime(c, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int64_t ns(struct timespec t) { return t.tv_sec * 1000000000LL + t.tv_nsec; }

static struct timespec ts(int64_t n) {
    struct timespec t = {.tv_sec = n / 1000000000LL, .tv_nsec = n % 1000000000LL};
    return t;
}

static int64_t floordiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

static double ms(int64_t n) { return n / 1e6; }

static int readable(int fd) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int n = poll(&p, 1, 0);
    if (n < 0) fail("poll");
    return n == 1 && (p.revents & POLLIN);
}

struct periodic {
    const char *name;
    clockid_t clock;
    int64_t period, start;
    int fd;
    uint64_t total;
};

static void arm(struct periodic *p) {
    p->fd = timerfd_create(p->clock, TFD_NONBLOCK | (p->clock == CLOCK_BOOTTIME ? TFD_CLOEXEC : 0));
    if (p->fd < 0) fail("timerfd_create %s", p->name);
    p->start = now(p->clock);
    struct itimerspec it = {.it_value = ts(p->start + p->period), .it_interval = ts(p->period)};
    if (timerfd_settime(p->fd, TFD_TIMER_ABSTIME, &it, 0)) fail("timerfd_settime %s", p->name);
}

static void check_periodic(struct periodic *p) {
    uint64_t v = 0;
    int64_t t0 = now(p->clock);
    if (read(p->fd, &v, 8) == 8) {
        if (v == 0) fail("%s read 0 expirations", p->name);
        p->total += v;
    } else if (errno != EAGAIN) fail("%s read", p->name);
    int64_t t1 = now(p->clock);
    int64_t lo = floordiv(t0 - p->start, p->period), hi = floordiv(t1 - p->start, p->period);
    if ((int64_t)p->total < lo - 2 || (int64_t)p->total > hi + 2)
        fail("%s: %lu expirations after %.3f ms, expected %ld..%ld (+-2)", p->name, (unsigned long)p->total, ms(t0 - p->start), (long)lo, (long)hi);
    struct itimerspec it;
    int64_t t = now(p->clock);
    if (timerfd_gettime(p->fd, &it)) fail("timerfd_gettime %s", p->name);
    if (ns(it.it_interval) != p->period) fail("%s interval %.6f ms", p->name, ms(ns(it.it_interval)));
    int64_t left = ns(it.it_value);
    if (left < 0 || left > p->period + 1000000) fail("%s: next expiry in %.6f ms", p->name, ms(left));
    int64_t want = p->period - (t - p->start) % p->period, d = left - want;
    if (d > p->period / 2) d -= p->period;
    if (d < -p->period / 2) d += p->period;
    if (d > 10000000 || d < -10000000) fail("%s: next expiry in %.3f ms, out of phase by %.3f ms", p->name, ms(left), ms(d));
    int fl = fcntl(p->fd, F_GETFL), fdfl = fcntl(p->fd, F_GETFD);
    if (!(fl & O_NONBLOCK)) fail("%s lost O_NONBLOCK", p->name);
    if (!!(fdfl & FD_CLOEXEC) != (p->clock == CLOCK_BOOTTIME)) fail("%s FD_CLOEXEC %d", p->name, fdfl);
}

int main(int argc, char **argv) {
    long steps = argc > 1 ? strtol(argv[1], 0, 10) : 200;
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct periodic per[2] = {{.name = "monotonic 30ms", .clock = CLOCK_MONOTONIC, .period = 30000000}, {.name = "boottime 45ms", .clock = CLOCK_BOOTTIME, .period = 45000000}};
    arm(&per[0]);
    arm(&per[1]);
    int far = timerfd_create(CLOCK_MONOTONIC, 0), expired = timerfd_create(CLOCK_MONOTONIC, 0), idle = timerfd_create(CLOCK_BOOTTIME, 0);
    if (far < 0 || expired < 0 || idle < 0) fail("timerfd_create");
    struct itimerspec it = {.it_value = {1000, 0}};
    int64_t far_at = now(CLOCK_MONOTONIC) + 1000000000000LL;
    if (timerfd_settime(far, 0, &it, 0)) fail("arm far");
    it.it_value = ts(1000000);
    if (timerfd_settime(expired, 0, &it, 0)) fail("arm expired");
    usleep(5000);
    for (int i = 0; i < 100 && !readable(expired); i++) usleep(10000);
    for (long s = 0; s < steps; s++) {
        cur = s;
        errno = 0;
        check_periodic(&per[0]);
        check_periodic(&per[1]);
        int64_t t = now(CLOCK_MONOTONIC);
        if (timerfd_gettime(far, &it)) fail("gettime far");
        if (ns(it.it_interval) != 0 || llabs(ns(it.it_value) - (far_at - t)) > 500000000)
            fail("far timer: %.3f ms left, expected %.3f", ms(ns(it.it_value)), ms(far_at - t));
        if (readable(far)) fail("far timer readable");
        if (!readable(expired)) fail("expired one-shot timer not readable");
        if (timerfd_gettime(expired, &it)) fail("gettime expired");
        if (ns(it.it_value) != 0 || ns(it.it_interval) != 0) fail("expired one-shot timer still armed: %.6f ms", ms(ns(it.it_value)));
        if (readable(idle)) fail("unarmed timer readable");
        if (timerfd_gettime(idle, &it)) fail("gettime idle");
        if (ns(it.it_value) != 0 || ns(it.it_interval) != 0) fail("unarmed timer armed: %.6f ms", ms(ns(it.it_value)));
        printf("step %ld\n", s);
        usleep(20000);
    }
    cur = steps;
    uint64_t v = 0;
    if (read(expired, &v, 8) != 8 || v != 1) fail("expired one-shot timer read %lu, expected 1", (unsigned long)v);
    if (readable(expired)) fail("one-shot timer readable after its read");
    printf("done\n");
    return 0;
}
