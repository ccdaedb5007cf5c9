/* One thread, a large heap whose checksum is re-verified every step, and an append-only log file.
 * usage: heaplog HEAP_MIB LOG STEPS
 * Each step rewrites a slice of the heap from the step number, checks the whole heap's checksum against the
 * running value, appends "step N sum S" to LOG (O_APPEND) and prints "step N" on stdout. Exits 0 after STEPS
 * steps, 99 on any mismatch. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint64_t mix(uint64_t x) { x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; return x; }

int main(int argc, char **argv) {
    size_t mib = strtoul(argv[1], 0, 10), n = mib << 17; /* u64 words */
    long steps = strtol(argv[3], 0, 10);
    uint64_t *heap = malloc(n * 8);
    if (!heap) return 2;
    uint64_t sum = 0;
    for (size_t i = 0; i < n; i++) { heap[i] = mix(i); sum += heap[i]; }
    int log = open(argv[2], O_WRONLY | O_CREAT | O_APPEND, 0644);
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (long s = 0; s < steps; s++) {
        size_t at = (size_t)mix(s) % (n - 4096);
        for (size_t i = at; i < at + 4096; i++) { sum -= heap[i]; heap[i] = mix(heap[i] + s); sum += heap[i]; }
        uint64_t check = 0;
        for (size_t i = 0; i < n; i++) check += heap[i];
        if (check != sum) { printf("MISMATCH step %ld: %llx != %llx\n", s, (unsigned long long)check, (unsigned long long)sum); return 99; }
        char line[96];
        int len = snprintf(line, sizeof line, "step %ld sum %016llx\n", s, (unsigned long long)sum);
        if (write(log, line, len) != len) return 98;
        printf("step %ld\n", s);
        usleep(20000);
    }
    printf("done\n");
    return 0;
}
