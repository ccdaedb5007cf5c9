/* Benchmark subject: N MiB of random data plus N MiB mapped but never touched.
 * usage: bench_mem MIB [DIRTY_MB_PER_S]
 * Prints "ready" once filled. Then it spins, tracking the largest gap between two looks at CLOCK_REALTIME
 * (its own pause as the world sees it: a restored job's monotonic clock hides the time it was away), and
 * changes DIRTY_MB_PER_S of its data per second (adding one to successive words, and to the checksum it keeps).
 * SIGUSR1: print "gap US" and reset. SIGUSR2: re-read all data, check its checksum, print
 * "verified MS" (the time to touch it all) or "CORRUPT". */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t want_gap, want_verify;
static void on1(int s) { want_gap = 1; }
static void on2(int s) { want_verify = 1; }
static uint64_t now_us(void) { struct timespec t; clock_gettime(CLOCK_REALTIME, &t); return t.tv_sec * 1000000ull + t.tv_nsec / 1000; }

int main(int argc, char **argv) {
    size_t mib = strtoul(argv[1], 0, 10), n = mib << 17;
    double dirty_per_us = argc > 2 ? strtod(argv[2], 0) * 1e6 / 8 / 1e6 : 0; /* words per microsecond */
    size_t next = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    uint64_t *data = mmap(0, n * 8 + 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    void *untouched = mmap(0, n * 8 + 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    (void)untouched;
    uint64_t x = 0x9e3779b97f4a7c15ull, sum = 0;
    for (size_t i = 0; i < n; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; data[i] = x; sum += x; }
    signal(SIGUSR1, on1);
    signal(SIGUSR2, on2);
    printf("ready\n");
    uint64_t last = now_us(), gap = 0;
    for (;;) {
        uint64_t t = now_us();
        if (t - last > gap) gap = t - last;
        for (size_t k = (size_t)((t - last) * dirty_per_us); k > 0; k--, next = (next + 1) % n)
            ((volatile uint64_t *)data)[next] += 1, sum += 1;
        last = t;
        if (want_gap) { want_gap = 0; printf("gap %llu\n", (unsigned long long)gap); gap = 0; last = now_us(); }
        if (want_verify) {
            want_verify = 0;
            uint64_t t0 = now_us(), s = 0;
            for (size_t i = 0; i < n; i++) s += data[i];
            printf(s == sum ? "verified %llu\n" : "CORRUPT %llu\n", (unsigned long long)((now_us() - t0) / 1000));
            last = now_us();
        }
        usleep(50);
    }
}
