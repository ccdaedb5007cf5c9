/* An epoll set with entries of every flavour, checked exactly at every step, across checkpoints.
 * usage: epoll STEPS
 * The set watches: a pipe's read end, level-triggered (data 0x1111, its high bits changed by EPOLL_CTL_MOD every
 * 25 steps); an eventfd, EPOLLET (data 0x2222); a timerfd (data 0x3333); a second pipe with EPOLLONESHOT (data
 * 0x4444). At the end of step s some of them are written to (a pattern of s), so data, counters, an expired timer
 * and a disarmed one-shot entry with data waiting are in the kernel while the program sleeps; at the start of
 * step s+1, epoll_wait must report exactly the expected entries with exactly EPOLLIN, and what is read must be what
 * was written. Each step also checks edge-triggering (a second epoll_wait does not report the eventfd again), that
 * a disarmed one-shot entry stays silent with data waiting until re-armed, and that EPOLL_CTL_MOD/ADD/DEL on the
 * watched fds behave (the kernel keys entries by fd number: MOD of a watched fd works, ADD says EEXIST, DEL of an
 * unwatched fd says ENOENT, DEL+ADD of the timerfd works). Exits 99 with a MISMATCH line on any difference. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

enum { P1 = 1, EFD = 2, TFD = 4, Q = 8 };

static long cur = -1;
static int ep, p1[2], efd, tfd, q[2], spare[2];
static uint64_t p1_data = 0x1111;
static unsigned char p1_buf[4096];
static int p1_count; /* bytes waiting in p1 */
static uint64_t efd_sum; /* written to the eventfd since it was last read */
static int efd_written, tfd_armed, q_written, q_armed = 1;

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

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int bit_of(uint64_t d) {
    switch (d & 0xffff) {
    case 0x1111: if (d != p1_data) fail("pipe entry data %#lx, expected %#lx", (unsigned long)d, (unsigned long)p1_data); return P1;
    case 0x2222: if (d != 0x2222) fail("eventfd data %#lx", (unsigned long)d); return EFD;
    case 0x3333: if (d != 0x3333) fail("timerfd data %#lx", (unsigned long)d); return TFD;
    case 0x4444: if (d != 0x4444) fail("oneshot data %#lx", (unsigned long)d); return Q;
    }
    fail("unknown epoll data %#lx", (unsigned long)d);
    return 0;
}

static int wait_events(struct epoll_event *ev, int timeout) {
    for (;;) {
        int n = epoll_wait(ep, ev, 8, timeout);
        if (n >= 0) return n;
        if (errno != EINTR) fail("epoll_wait");
    }
}

static void drain_p1(void) {
    unsigned char b[4096];
    ssize_t n = read(p1[0], b, sizeof b);
    if (n != p1_count) fail("pipe held %zd bytes, expected %d", n, p1_count);
    if (memcmp(b, p1_buf, n)) fail("pipe bytes differ");
    p1_count = 0;
}

/* Whatever the entry reports, it must be what was put in: read what must be read. */
static void handle(int bit, long s) {
    uint64_t v;
    switch (bit) {
    case P1:
        if (p1_count == 0) fail("empty pipe reported");
        break;
    case EFD:
        if (read(efd, &v, 8) != 8) fail("eventfd read");
        if (v != efd_sum) fail("eventfd counter %lu, expected %lu", (unsigned long)v, (unsigned long)efd_sum);
        efd_sum = 0;
        break;
    case TFD:
        if (read(tfd, &v, 8) != 8) fail("timerfd read");
        if (v != 1) fail("timerfd expirations %lu, expected 1", (unsigned long)v);
        tfd_armed = 0;
        break;
    case Q:
        if (!q_armed) fail("disarmed one-shot entry reported");
        q_armed = 0; /* the data stays in the pipe: the disarmed entry must stay silent */
        break;
    }
}

/* epoll_wait must report exactly `expect` (each with EPOLLIN only), waiting at most 3 s for missing ones; then a
 * second look may report only what is level-triggered and still readable. */
static void check(unsigned expect, long s) {
    struct epoll_event ev[8];
    unsigned got = 0;
    double deadline = now() + 3;
    for (;;) {
        int n = wait_events(ev, (got & expect) == expect ? 0 : 20);
        for (int i = 0; i < n; i++) {
            int b = bit_of(ev[i].data.u64);
            if (!(expect & b)) fail("entry %#x reported, expected only %#x", b, expect);
            if (ev[i].events != EPOLLIN) fail("entry %#x reported events %#x", b, ev[i].events);
            if ((got & b) && b != P1) fail("entry %#x reported twice", b);
            if (!(got & b)) handle(b, s);
            got |= b;
        }
        if ((got & expect) == expect) break;
        if (now() > deadline) fail("entries %#x not reported (got %#x)", expect & ~got, got);
    }
    if ((expect & P1) && s % 4 == 0) drain_p1();
    int n = wait_events(ev, 0);
    for (int i = 0; i < n; i++) {
        int b = bit_of(ev[i].data.u64);
        if (b != P1 || p1_count == 0) fail("entry %#x reported again", b);
    }
    if (p1_count && n != 1) fail("level-triggered pipe with %d bytes not reported again", p1_count);
}

static void ctl(int op, int fd, uint32_t events, uint64_t data) {
    struct epoll_event e = {.events = events, .data.u64 = data};
    if (epoll_ctl(ep, op, fd, &e)) fail("epoll_ctl(%d, fd %d)", op, fd);
}

static void writes(long s) {
    if (s % 3 != 1) {
        int k = s % 5 + 1;
        for (int i = 0; i < k; i++) p1_buf[p1_count + i] = (unsigned char)(s * 7 + i);
        if (write(p1[1], p1_buf + p1_count, k) != k) fail("pipe write");
        p1_count += k;
    }
    efd_written = s % 2 == 0;
    if (efd_written) {
        uint64_t v = s + 1;
        if (write(efd, &v, 8) != 8) fail("eventfd write");
        efd_sum += v;
    }
    if (s % 4 == 1) {
        struct itimerspec it = {.it_value = {0, 1000000}};
        if (timerfd_settime(tfd, 0, &it, 0)) fail("timerfd_settime");
        tfd_armed = 1;
    }
    q_written = s % 5 == 0;
    if (q_written) {
        unsigned char c = (unsigned char)s;
        if (write(q[1], &c, 1) != 1) fail("oneshot pipe write");
    }
}

int main(int argc, char **argv) {
    long steps = argc > 1 ? strtol(argv[1], 0, 10) : 200;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (pipe2(p1, O_NONBLOCK) || pipe2(q, O_NONBLOCK) || pipe(spare)) fail("pipe");
    efd = eventfd(0, EFD_NONBLOCK);
    tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (efd < 0 || tfd < 0 || ep < 0) fail("create");
    ctl(EPOLL_CTL_ADD, p1[0], EPOLLIN, p1_data);
    ctl(EPOLL_CTL_ADD, efd, EPOLLIN | EPOLLET, 0x2222);
    ctl(EPOLL_CTL_ADD, tfd, EPOLLIN, 0x3333);
    ctl(EPOLL_CTL_ADD, q[0], EPOLLIN | EPOLLONESHOT, 0x4444);
    for (long s = 0; s < steps; s++) {
        cur = s;
        errno = 0;
        unsigned expect = (p1_count ? P1 : 0) | (efd_written ? EFD : 0) | (tfd_armed ? TFD : 0) | (q_written && q_armed ? Q : 0);
        check(expect, s);
        /* Edge-triggered: a write is reported once, not again while the counter stays readable. */
        if (s % 3 == 0) {
            uint64_t v = 1000 + s;
            struct epoll_event ev[8];
            if (write(efd, &v, 8) != 8) fail("eventfd write");
            efd_sum = v;
            int seen = 0;
            double deadline = now() + 3;
            while (!seen) {
                int n = wait_events(ev, 20);
                for (int i = 0; i < n; i++) {
                    int b = bit_of(ev[i].data.u64);
                    if (b == EFD) seen++;
                    else if (b != P1) fail("entry %#x reported after an eventfd write", b);
                }
                if (!seen && now() > deadline) fail("eventfd write not reported");
            }
            int n = wait_events(ev, 0);
            for (int i = 0; i < n; i++)
                if (bit_of(ev[i].data.u64) != P1) fail("edge-triggered eventfd reported twice");
            handle(EFD, s);
        }
        /* The one-shot entry: disarmed since it fired; drain and re-arm it. */
        if (s % 5 == 4) {
            unsigned char c;
            if (q_armed) fail("one-shot entry still armed");
            if (read(q[0], &c, 1) != 1 || c != (unsigned char)(s - 4)) fail("oneshot pipe byte");
            if (read(q[0], &c, 1) != -1 || errno != EAGAIN) fail("oneshot pipe not empty");
            ctl(EPOLL_CTL_MOD, q[0], EPOLLIN | EPOLLONESHOT, 0x4444);
            q_armed = 1;
        }
        /* The entries are keyed by fd number: MOD works, ADD says EEXIST, DEL of an unwatched fd says ENOENT. */
        if (s % 25 == 0) p1_data = 0x1111 | (uint64_t)(s / 25) << 32;
        ctl(EPOLL_CTL_MOD, p1[0], EPOLLIN, p1_data);
        ctl(EPOLL_CTL_MOD, efd, EPOLLIN | EPOLLET, 0x2222);
        struct epoll_event e = {.events = EPOLLIN, .data.u64 = 0x9999};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, p1[0], &e) != -1 || errno != EEXIST) fail("ADD of a watched fd did not say EEXIST");
        if (epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &e) != -1 || errno != EEXIST) fail("ADD of the timerfd did not say EEXIST");
        if (epoll_ctl(ep, EPOLL_CTL_DEL, spare[0], 0) != -1 || errno != ENOENT) fail("DEL of an unwatched fd did not say ENOENT");
        if (epoll_ctl(ep, EPOLL_CTL_MOD, spare[1], &e) != -1 || errno != ENOENT) fail("MOD of an unwatched fd did not say ENOENT");
        if (s % 10 == 5) {
            if (epoll_ctl(ep, EPOLL_CTL_DEL, tfd, 0)) fail("DEL of the timerfd");
            if (epoll_ctl(ep, EPOLL_CTL_DEL, tfd, 0) != -1 || errno != ENOENT) fail("second DEL of the timerfd");
            ctl(EPOLL_CTL_ADD, tfd, EPOLLIN, 0x3333);
        }
        writes(s);
        printf("step %ld\n", s);
        usleep(20000);
    }
    printf("done\n");
    return 0;
}
