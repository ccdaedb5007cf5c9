/* Mappings that run past the end of their file: touching a page wholly past the end faults with SIGBUS.
 * A memfd (its fd closed) and a file deleted after mmap mapped privately, and another memfd (its fd closed) mapped
 * shared, each 2.5 pages long, mapped 8 pages long, a page of each written (copied on write, or into the memfd).
 * usage: past_eof DIR STEPS
 * At every step the pages within each file must hold its bytes (the written page the written ones, the tail of the
 * last page zeros), and reading or writing any page past the end must fault with SIGBUS (caught with siglongjmp).
 * Exits 99 with a MISMATCH line on any difference. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PG 4096L
#define FILE_LEN (2 * PG + PG / 2)
#define MAP_PAGES 8

static sigjmp_buf back;
static volatile int sig;
static void on_fault(int s) { sig = s; siglongjmp(back, 1); }

/* The signal touching p raises (0: none). */
static int touch(volatile char *p, int write) {
    sig = 0;
    if (sigsetjmp(back, 1)) return sig;
    if (write) *p = 1; else (void)*p;
    return 0;
}

static unsigned char file_byte(int w, long i) { return (unsigned char)(w * 37 + i % 241 + 1); }
static unsigned char own_byte(int w, long i) { return (unsigned char)(w * 5 + i % 13 + 100); }

static char *make(int w, const char *dir) {
    char path[4096];
    int fd;
    if (w != 1) {
        fd = memfd_create(w == 0 ? "past-eof" : "past-eof-shared", 0);
    } else {
        snprintf(path, sizeof path, "%s/past-eof-file", dir);
        fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    }
    if (fd < 0) { perror("open"); exit(2); }
    for (long i = 0; i < FILE_LEN; i++) {
        unsigned char b = file_byte(w, i);
        if (write(fd, &b, 1) != 1) { perror("write"); exit(2); }
    }
    char *m = mmap(0, MAP_PAGES * PG, PROT_READ | PROT_WRITE, w == 2 ? MAP_SHARED : MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) { perror("mmap"); exit(2); }
    close(fd);
    if (w == 1) unlink(path);
    for (long i = 0; i < PG; i++) m[PG + i] = own_byte(w, i);
    return m;
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    long steps = atol(argv[2]);
    setvbuf(stdout, 0, _IOLBF, 0);
    signal(SIGBUS, on_fault);
    signal(SIGSEGV, on_fault);
    char *m[3] = {make(0, argv[1]), make(1, argv[1]), make(2, argv[1])};
    for (long s = 0; s < steps; s++) {
        for (int w = 0; w < 3; w++) {
            for (long i = 0; i < 3 * PG; i++) {
                unsigned char want = i >= PG && i < 2 * PG ? own_byte(w, i - PG) : i < FILE_LEN ? file_byte(w, i) : 0;
                if ((unsigned char)m[w][i] != want) {
                    printf("MISMATCH step %ld: mapping %d byte %ld is %u, not %u\n", s, w, i, (unsigned char)m[w][i], want);
                    return 99;
                }
            }
            for (long p = 3; p < MAP_PAGES; p++) {
                int got = touch(m[w] + p * PG + (s % PG), (s + p) & 1);
                if (got != SIGBUS) {
                    printf("MISMATCH step %ld: mapping %d page %ld past the end gave signal %d, not SIGBUS\n", s, w, p, got);
                    return 99;
                }
            }
        }
        printf("step %ld\n", s);
        nanosleep(&(struct timespec){0, 20000000}, 0);
    }
    printf("done\n");
    return 0;
}
