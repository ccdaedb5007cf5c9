/* Memory that changes shape while a post-copy migration fills it.
 * usage: postcopy MIB STEPS
 * Block A (MIB MiB) and block B (1 MiB) hold a pattern of their page numbers. Each step: a forked child checks
 * both blocks whole (a fork made while pages are still missing must see them all); then block B moves (mremap,
 * one page bigger, the new page given its pattern: its contents follow it) and 4 pages of A are zapped (MADV_DONTNEED: they must read zeros
 * from then on). Prints "step N" per step, "ready" before the first, "done" at the end, and a line starting
 * "CORRUPT" on the first page that is wrong. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PG 4096
static size_t na, nb;
static uint64_t *a, *b;
static unsigned char *zapped;

static uint64_t word(size_t page, size_t j, int blk) { return (page * 2654435761u + j) ^ ((uint64_t)blk << 60); }

static void fill(uint64_t *m, size_t pages, int blk) {
    for (size_t p = 0; p < pages; p++)
        for (size_t j = 0; j < PG / 8; j++) m[p * PG / 8 + j] = word(p, j, blk);
}

/* 0 if right, else prints where it is wrong. */
static int check(const char *who) {
    for (size_t p = 0; p < na; p++)
        for (size_t j = 0; j < PG / 8; j++) {
            uint64_t want = zapped[p] ? 0 : word(p, j, 1);
            if (a[p * PG / 8 + j] != want) { printf("CORRUPT %s: block A page %zu word %zu\n", who, p, j); return 1; }
        }
    for (size_t p = 0; p < nb; p++)
        for (size_t j = 0; j < PG / 8; j++)
            if (b[p * PG / 8 + j] != word(p, j, 2)) { printf("CORRUPT %s: block B page %zu\n", who, p); return 1; }
    return 0;
}

int main(int argc, char **argv) {
    na = strtoul(argv[1], 0, 10) << 8;
    long steps = strtol(argv[2], 0, 10);
    nb = 256;
    setvbuf(stdout, NULL, _IOLBF, 0);
    a = mmap(0, na * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    b = mmap(0, nb * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    zapped = calloc(na, 1);
    fill(a, na, 1);
    fill(b, nb, 2);
    printf("ready\n");
    for (long s = 0; s < steps; s++) {
        pid_t c = fork();
        if (c == 0) _exit(check("child"));
        int st;
        if (waitpid(c, &st, 0) != c || !WIFEXITED(st) || WEXITSTATUS(st) != 0) { printf("CORRUPT the child saw wrong memory\n"); return 1; }
        void *nbp = mremap(b, nb * PG, (nb + 1) * PG, MREMAP_MAYMOVE);
        if (nbp == MAP_FAILED) { perror("mremap"); return 1; }
        b = nbp;
        for (size_t j = 0; j < PG / 8; j++) b[nb * PG / 8 + j] = word(nb, j, 2);
        nb++;
        size_t z = (s * 7919) % (na - 4);
        madvise((char *)a + z * PG, 4 * PG, MADV_DONTNEED);
        for (int k = 0; k < 4; k++) zapped[z + k] = 1;
        printf("step %ld\n", s);
        usleep(20000);
    }
    if (check("parent")) return 1;
    printf("done\n");
    return 0;
}
