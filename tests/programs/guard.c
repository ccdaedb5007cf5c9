/* Guard pages (madvise MADV_GUARD_INSTALL, Linux 6.13+) inside a heap buffer, around a counter: touching one
 * faults, as reading a PROT_NONE page would, though the mapping itself stays readable and writable.
 * usage: guard STEPS
 * The buffer's pages: filled, guard, counter, guard, filled... At every step the counter must equal the step, every
 * filled page hold its bytes, and every guard page fault when read or written (caught with SIGSEGV and
 * siglongjmp). Exits 99 with a MISMATCH line on any difference, 3 when this kernel has no guard pages. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#endif
#define PG 4096L
#define PAGES 12

static sigjmp_buf back;
static void on_segv(int sig) { (void)sig; siglongjmp(back, 1); }

/* Whether touching p faults (writing when `write`). */
static int faults(volatile char *p, int write) {
    if (sigsetjmp(back, 1)) return 1;
    if (write) *p = 1; else (void)*p;
    return 0;
}

static int is_guard(long page) { return page == 3 || page == 5 || page == 9; }
static unsigned char byte(long page, long i) { return (unsigned char)(page * 11 + i % 253 + 1); }

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    long steps = atol(argv[1]);
    setvbuf(stdout, 0, _IOLBF, 0);
    signal(SIGSEGV, on_segv);
    /* From the brk heap: under the mmap threshold. */
    char *raw = malloc((PAGES + 1) * PG);
    char *buf = (char *)(((uintptr_t)raw + PG - 1) & ~(PG - 1));
    for (long p = 0; p < PAGES; p++)
        for (long i = 0; i < PG; i++) buf[p * PG + i] = byte(p, i);
    for (long p = 0; p < PAGES; p++)
        if (is_guard(p) && madvise(buf + p * PG, PG, MADV_GUARD_INSTALL)) { perror("MADV_GUARD_INSTALL"); return 3; }
    volatile long *counter = (volatile long *)(buf + 4 * PG + 128);
    *counter = 0;
    for (long s = 0; s < steps; s++) {
        if (*counter != s) { printf("MISMATCH step %ld: counter %ld\n", s, *counter); return 99; }
        for (long p = 0; p < PAGES; p++) {
            if (is_guard(p)) {
                if (!faults(buf + p * PG + 7, s & 1) || !faults(buf + p * PG + PG - 1, 0)) {
                    printf("MISMATCH step %ld: guard page %ld did not fault\n", s, p);
                    return 99;
                }
                continue;
            }
            for (long i = (p == 4 ? PG / 2 : 0); i < PG; i++)
                if ((unsigned char)buf[p * PG + i] != byte(p, i)) {
                    printf("MISMATCH step %ld: page %ld byte %ld\n", s, p, i);
                    return 99;
                }
        }
        ++*counter;
        printf("step %ld\n", s);
        nanosleep(&(struct timespec){0, 20000000}, 0);
    }
    printf("done\n");
    return 0;
}
