/* A region mapped with MAP_GROWSDOWN where the kernel chooses, grown a page at a time by touching below it (as a
 * stack grows): the kernel extends it as long as no other accessible mapping lies within its stack guard gap.
 * usage: growsdown STEPS
 * At every step one more page below the region is written; every page written so far must still hold its bytes
 * and the region must reach down to it. Exits 99 with a MISMATCH or BROKEN line (and the mappings) otherwise. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PG 4096L
#define SIZE (16 * PG)

static char *top;

static void show_maps(void) {
    FILE *f = fopen("/proc/self/maps", "r");
    char l[512];
    while (f && fgets(l, sizeof l, f)) fputs(l, stdout);
    if (f) fclose(f);
    fflush(stdout);
}

static void on_segv(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc;
    printf("BROKEN: a fault at %p growing the region at %p\n", si->si_addr, top);
    show_maps();
    _exit(99);
}

/* Start of the mapping that holds addr (0: none). */
static unsigned long vma_start(unsigned long addr) {
    FILE *f = fopen("/proc/self/maps", "r");
    char l[512];
    unsigned long s, e, r = 0;
    while (fgets(l, sizeof l, f))
        if (sscanf(l, "%lx-%lx", &s, &e) == 2 && addr >= s && addr < e) r = s;
    fclose(f);
    return r;
}

static unsigned char byte(long page, long i) { return (unsigned char)(page * 7 + i % 251 + 1); }

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    long steps = atol(argv[1]);
    setvbuf(stdout, 0, _IOLBF, 0);
    static char altstack[65536];
    stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack};
    sigaltstack(&ss, 0);
    struct sigaction sa = {.sa_sigaction = on_segv, .sa_flags = SA_SIGINFO | SA_ONSTACK};
    sigaction(SIGSEGV, &sa, 0);
    char *base = mmap(0, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN, -1, 0);
    if (base == MAP_FAILED) { perror("mmap"); return 2; }
    top = base + SIZE;
    for (long s = 0; s < steps; s++) {
        char *p = base - (s + 1) * PG;
        for (long i = 0; i < PG; i += 64) p[i] = byte(s, i);
        for (long k = 0; k <= s; k++)
            for (long i = 0; i < PG; i += 64)
                if ((unsigned char)base[-(k + 1) * PG + i] != byte(k, i)) {
                    printf("MISMATCH step %ld: page %ld byte %ld\n", s, k, i);
                    return 99;
                }
        if (vma_start((unsigned long)base) > (unsigned long)p) {
            printf("MISMATCH step %ld: the region does not reach %p\n", s, p);
            show_maps();
            return 99;
        }
        printf("step %ld\n", s);
        nanosleep(&(struct timespec){0, 20000000}, 0);
    }
    printf("done\n");
    return 0;
}
