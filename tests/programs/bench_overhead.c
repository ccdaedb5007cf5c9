/* Per-call cost of common libc calls: open+close, clock_gettime, malloc+free, write to /dev/null.
 * usage: bench_overhead ROUNDS. Prints "NAME NS_PER_CALL" lines (best of ROUNDS). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e9 + t.tv_nsec; }

int main(int argc, char **argv) {
    int rounds = atoi(argv[1]);
    double best[4] = {1e18, 1e18, 1e18, 1e18};
    const char *names[4] = {"open+close", "clock_gettime", "malloc+free", "write"};
    long iters[4] = {200000, 5000000, 5000000, 1000000};
    int devnull = open("/dev/null", O_WRONLY);
    volatile long sink = 0;
    for (int r = 0; r < rounds; r++) {
        for (int k = 0; k < 4; k++) {
            double t0 = now();
            for (long i = 0; i < iters[k]; i++) {
                switch (k) {
                case 0: close(open("/dev/null", O_RDONLY)); break;
                case 1: { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); sink += t.tv_nsec; } break;
                case 2: { void *p = malloc(64); sink += (long)p; free(p); } break;
                case 3: sink += write(devnull, "x", 1); break;
                }
            }
            double ns = (now() - t0) / iters[k];
            if (ns < best[k]) best[k] = ns;
        }
    }
    for (int k = 0; k < 4; k++) printf("%s %.1f\n", names[k], best[k]);
    return 0;
}
