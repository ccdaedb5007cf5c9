/* Many memory mappings: MAPS separate private mappings (every other page of one reservation made accessible,
 * so none merge), a few pages of them written, their checksum re-verified every step.
 * usage: manymaps MAPS STEPS
 * Prints "step N" each step; exits 0 after STEPS steps, 99 on a mismatch. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv) {
    long n = strtol(argv[1], 0, 10), steps = strtol(argv[2], 0, 10);
    char *base = mmap(0, (size_t)n * 8192, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) { perror("mmap"); return 2; }
    uint64_t sum = 0;
    for (long i = 0; i < n; i++) {
        char *p = base + (size_t)i * 8192;
        if (mprotect(p, 4096, PROT_READ | PROT_WRITE)) { perror("mprotect"); return 2; }
        if (i % 64 == 0) { p[0] = (char)(i * 7 + 1); sum += (uint8_t)p[0]; }
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (long s = 0; s < steps; s++) {
        uint64_t check = 0;
        for (long i = 0; i < n; i += 64) check += (uint8_t)base[(size_t)i * 8192];
        if (check != sum) { printf("MISMATCH step %ld\n", s); return 99; }
        printf("step %ld\n", s);
        usleep(50000);
    }
    printf("done\n");
    return 0;
}
