/* POSIX timers (timer_create) and a pending alarm keep their ids, schedules and signals across checkpoints.
 * usage: timers STEPS
 * A first timer is created and deleted, so the real ones do not have the first id. Two CLOCK_MONOTONIC timers
 * send SIGUSR1 (SIGEV_SIGNAL) with sigev_value 11 and 22, periodic, every 40 ms and 70 ms, armed at an absolute
 * time START; their ids are printed once to stderr ("timers ID1 ID2"). A SA_SIGINFO handler counts, per value,
 * 1 + si_overrun, and checks si_code is SI_TIMER and si_timerid the id of the timer with that value. At every step
 * each count must be floor((now - START) / period) within +-2 (the job's clocks go on from the checkpoint instant
 * across a restore), timer_gettime on each saved id must report its own period and a next expiry in phase with
 * START (within 10 ms), and timer_getoverrun must work. An alarm(1000) is pending the whole time: at every step
 * alarm(1000) must return more than 990 (it survived; it is set again). Exits 99 with a MISMATCH line on any
 * difference. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

static int64_t now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int64_t ns(struct timespec t) { return t.tv_sec * 1000000000LL + t.tv_nsec; }

static struct timespec ts(int64_t n) {
    struct timespec t = {.tv_sec = n / 1000000000LL, .tv_nsec = n % 1000000000LL};
    return t;
}

static int64_t floordiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

static double ms(int64_t n) { return n / 1e6; }

struct ptimer {
    int value;
    int64_t period, start;
    timer_t id;
    volatile long count;
};

static struct ptimer pt[2] = {{.value = 11, .period = 40000000}, {.value = 22, .period = 70000000}};
static volatile int bad_value, bad_code, bad_id;

static void on_usr1(int sig, siginfo_t *si, void *uc) {
    int i = si->si_value.sival_int == 11 ? 0 : si->si_value.sival_int == 22 ? 1 : -1;
    if (i < 0) {
        bad_value = si->si_value.sival_int ? si->si_value.sival_int : -1;
        return;
    }
    if (si->si_code != SI_TIMER) bad_code = si->si_code ? si->si_code : -1;
    if (si->si_timerid != (int)(intptr_t)pt[i].id) bad_id = si->si_timerid + 1000;
    pt[i].count += 1 + si->si_overrun;
}

static void sleep_ns(int64_t n) {
    struct timespec t = ts(n), rem;
    while (nanosleep(&t, &rem) && errno == EINTR) t = rem;
}

static void check(struct ptimer *p) {
    int64_t t0 = now();
    long count = p->count;
    int64_t t1 = now();
    int64_t lo = floordiv(t0 - p->start, p->period), hi = floordiv(t1 - p->start, p->period);
    if (count < lo - 2 || count > hi + 2)
        fail("timer %d: %ld signals after %.3f ms, expected %ld..%ld (+-2)", p->value, count, ms(t0 - p->start), (long)lo, (long)hi);
    struct itimerspec it;
    int64_t t = now();
    if (timer_gettime(p->id, &it)) fail("timer_gettime(%d) of timer %d", (int)(intptr_t)p->id, p->value);
    if (ns(it.it_interval) != p->period) fail("timer %d (id %d): interval %.3f ms", p->value, (int)(intptr_t)p->id, ms(ns(it.it_interval)));
    int64_t left = ns(it.it_value);
    if (left < 0 || left > p->period + 1000000) fail("timer %d: next expiry in %.3f ms", p->value, ms(left));
    int64_t want = p->period - (t - p->start) % p->period, d = left - want;
    if (d > p->period / 2) d -= p->period;
    if (d < -p->period / 2) d += p->period;
    /* 15 ms: the checkpoint reads the timer and the clock a moment apart, longer on a loaded 2-core machine. */
    if (d > 15000000 || d < -15000000) fail("timer %d: next expiry in %.3f ms, out of phase by %.3f ms", p->value, ms(left), ms(d));
    if (timer_getoverrun(p->id) < 0) fail("timer_getoverrun of timer %d", p->value);
}

int main(int argc, char **argv) {
    long steps = argc > 1 ? strtol(argv[1], 0, 10) : 200;
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sigaction sa = {0};
    sa.sa_sigaction = on_usr1;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGUSR1, &sa, 0);
    struct sigevent sev = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGUSR1};
    timer_t dummy;
    if (timer_create(CLOCK_MONOTONIC, &sev, &dummy) || timer_delete(dummy)) fail("dummy timer");
    for (int i = 0; i < 2; i++) {
        sev.sigev_value.sival_int = pt[i].value;
        if (timer_create(CLOCK_MONOTONIC, &sev, &pt[i].id)) fail("timer_create");
    }
    fprintf(stderr, "timers %d %d\n", (int)(intptr_t)pt[0].id, (int)(intptr_t)pt[1].id);
    for (int i = 0; i < 2; i++) {
        pt[i].start = now();
        struct itimerspec it = {.it_value = ts(pt[i].start + pt[i].period), .it_interval = ts(pt[i].period)};
        if (timer_settime(pt[i].id, TIMER_ABSTIME, &it, 0)) fail("timer_settime");
    }
    alarm(1000);
    for (long s = 0; s < steps; s++) {
        cur = s;
        errno = 0;
        if (bad_value) fail("a SIGUSR1 with value %d", bad_value);
        if (bad_code) fail("a timer signal with si_code %d", bad_code);
        if (bad_id) fail("a timer signal with si_timerid %d", bad_id - 1000);
        check(&pt[0]);
        check(&pt[1]);
        unsigned left = alarm(1000);
        if (left <= 990) fail("the alarm had %u s left", left);
        printf("step %ld\n", s);
        sleep_ns(20000000);
    }
    cur = steps;
    alarm(0);
    for (int i = 0; i < 2; i++)
        if (timer_delete(pt[i].id)) fail("timer_delete");
    printf("done\n");
    return 0;
}
