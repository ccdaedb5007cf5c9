/* Benchmark subject: a job of PROCS processes, each holding MIB MiB of random data, linked by pipes.
 * usage: bench_tree PROCS MIB. Prints "ready" once all hold their data, then all sleep. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

static void fill(size_t mib, uint64_t seed) {
    size_t n = mib << 17;
    uint64_t *d = mmap(0, n * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t x = seed | 1;
    for (size_t i = 0; i < n; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; d[i] = x; }
}

int main(int argc, char **argv) {
    int procs = atoi(argv[1]);
    size_t mib = strtoul(argv[2], 0, 10);
    setvbuf(stdout, NULL, _IOLBF, 0);
    int ready[2];
    if (pipe(ready)) return 2;
    for (int i = 1; i < procs; i++) {
        if (fork() == 0) {
            fill(mib, i * 7919);
            if (write(ready[1], "x", 1) != 1) return 3;
            for (;;) sleep(1);
        }
    }
    fill(mib, 1);
    char c;
    for (int i = 1; i < procs; i++)
        if (read(ready[0], &c, 1) != 1) return 4;
    printf("ready\n");
    for (;;) sleep(1);
}
