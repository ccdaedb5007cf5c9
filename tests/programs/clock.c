/* The job's clocks go on across checkpoints: no step backwards, and no downtime showing.
 * usage: clock STEPS
 * At every step the program reads CLOCK_MONOTONIC, CLOCK_BOOTTIME and CLOCK_PROCESS_CPUTIME_ID, and sleeps 20 ms
 * between steps. Between two steps, monotonic and boottime must go forward by at least 10 ms (the sleep) and at
 * most 2 s (a restore's downtime must not show), boottime - monotonic must stay what it was at the start (within
 * 100 ms), and the process CPU time must never go backwards. Exits 99 with a MISMATCH line on any difference. */
#define _GNU_SOURCE
#include <errno.h>
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

static int64_t read_clock(clockid_t c, const char *name) {
    struct timespec t;
    if (clock_gettime(c, &t)) fail("clock_gettime(%s)", name);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static double ms(int64_t n) { return n / 1e6; }

int main(int argc, char **argv) {
    long steps = argc > 1 ? strtol(argv[1], 0, 10) : 200;
    setvbuf(stdout, NULL, _IOLBF, 0);
    int64_t mono0 = read_clock(CLOCK_MONOTONIC, "monotonic"), boot0 = read_clock(CLOCK_BOOTTIME, "boottime");
    int64_t cpu0 = read_clock(CLOCK_PROCESS_CPUTIME_ID, "process cputime");
    int64_t pm = mono0, pb = boot0, pc = cpu0;
    volatile uint64_t spin = 0;
    for (long s = 0; s < steps; s++) {
        cur = s;
        errno = 0;
        int64_t m = read_clock(CLOCK_MONOTONIC, "monotonic"), b = read_clock(CLOCK_BOOTTIME, "boottime");
        int64_t c = read_clock(CLOCK_PROCESS_CPUTIME_ID, "process cputime");
        if (s > 0) {
            if (m - pm < 10000000 || m - pm > 2000000000LL) fail("monotonic moved by %.3f ms in a step", ms(m - pm));
            if (b - pb < 10000000 || b - pb > 2000000000LL) fail("boottime moved by %.3f ms in a step", ms(b - pb));
        }
        int64_t skew = (b - m) - (boot0 - mono0);
        if (skew > 100000000 || skew < -100000000) fail("boottime - monotonic changed by %.3f ms", ms(skew));
        if (c < pc) fail("process CPU time went back by %.3f ms", ms(pc - c));
        pm = m, pb = b, pc = c;
        for (int i = 0; i < 20000; i++) spin += i; /* some CPU time each step */
        printf("step %ld\n", s);
        usleep(20000);
    }
    printf("done\n");
    return 0;
}
