/* Memory shared by a parent and its child through a MAP_SHARED|MAP_ANONYMOUS mapping, across checkpoints.
 * usage: shm_anon STEPS
 * The parent maps 64 data pages plus a header shared and anonymous, and forks. They take turns (a turn word in the
 * region, polled with short sleeps): in its turn s the parent checks the child did exactly s turns and that the
 * page the child wrote in turn s-1 holds the child's pattern, counts, writes its own pattern for s into another
 * page and hands the turn over; the child checks the parent's count and page, writes its page and hands it back.
 * Each side also keeps a MAP_PRIVATE anonymous region made before the fork, which it fills with its own values at
 * every turn: the other side's writes must never show there. The parent prints the steps; at the end the child
 * exits 0 and the parent checks that with waitpid. Exits 99 with a MISMATCH line on any difference, or if the
 * other side does not take its turn within 20 s. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGES 64
#define PRIV 16384

struct shared {
    int turn; /* 0: the parent's, 1: the child's */
    long pcount, ccount;
    unsigned char page[PAGES][4096];
};

static long cur = -1;
static const char *who = "parent";
static pid_t child;

static void fail(const char *fmt, ...) {
    int e = errno;
    va_list ap;
    va_start(ap, fmt);
    printf("MISMATCH %s step %ld: ", who, cur);
    vprintf(fmt, ap);
    if (e) printf(" (errno %d %s)", e, strerror(e));
    printf("\n");
    va_end(ap);
    if (child) kill(child, SIGKILL);
    exit(99);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void wait_turn(struct shared *sh, int me) {
    double deadline = now() + 20;
    for (int i = 0; __atomic_load_n(&sh->turn, __ATOMIC_ACQUIRE) != me; i++) {
        usleep(200);
        if (child && i % 50 == 0) {
            int st;
            if (waitpid(child, &st, WNOHANG) == child) {
                child = 0;
                fail("the child ended (status %#x) while it was its turn", st);
            }
        }
        if (now() > deadline) fail("the other side did not take its turn within 20 s (turn %d)", sh->turn);
    }
}

static unsigned char pattern(long s, int side, int i) { return (unsigned char)(s * 131 + i * 7 + side * 101 + (i >> 8)); }

static void fill(unsigned char *p, long s, int side) {
    for (int i = 0; i < 4096; i++) p[i] = pattern(s, side, i);
}

static void verify(const unsigned char *p, long s, int side, const char *what) {
    for (int i = 0; i < 4096; i++)
        if (p[i] != pattern(s, side, i)) fail("%s: byte %d is %d, expected %d", what, i, p[i], pattern(s, side, i));
}

static void fill_priv(unsigned char *priv, long s, int side) {
    for (int i = 0; i < PRIV; i += 64) priv[i] = pattern(s, side + 2, i);
}

static void verify_priv(const unsigned char *priv, long s, int side) {
    for (int i = 0; i < PRIV; i += 64)
        if (priv[i] != pattern(s, side + 2, i)) fail("private region: byte %d is %d, expected %d", i, priv[i], pattern(s, side + 2, i));
}

int main(int argc, char **argv) {
    long steps = argc > 1 ? strtol(argv[1], 0, 10) : 200;
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct shared *sh = mmap(0, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    unsigned char *priv = mmap(0, PRIV, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED || priv == MAP_FAILED) fail("mmap");
    fill_priv(priv, -1, 0);
    pid_t c = fork();
    if (c < 0) fail("fork");
    if (c == 0) {
        who = "child";
        verify_priv(priv, -1, 0);
        for (long s = 0; s < steps; s++) {
            cur = s;
            errno = 0;
            wait_turn(sh, 1);
            if (sh->pcount != s + 1 || sh->ccount != s) fail("counts %ld %ld, expected %ld %ld", sh->pcount, sh->ccount, s + 1, s);
            verify(sh->page[s % PAGES], s, 0, "the parent's page");
            if (s > 0) verify_priv(priv, s - 1, 1);
            fill(sh->page[(s + 32) % PAGES], s, 1);
            fill_priv(priv, s, 1);
            sh->ccount++;
            __atomic_store_n(&sh->turn, 0, __ATOMIC_RELEASE);
        }
        _exit(0);
    }
    child = c;
    for (long s = 0; s < steps; s++) {
        cur = s;
        errno = 0;
        wait_turn(sh, 0);
        if (sh->pcount != s || sh->ccount != s) fail("counts %ld %ld, expected %ld %ld", sh->pcount, sh->ccount, s, s);
        if (s > 0) verify(sh->page[(s + 31) % PAGES], s - 1, 1, "the child's page");
        verify_priv(priv, s - 1, 0);
        fill(sh->page[s % PAGES], s, 0);
        fill_priv(priv, s, 0);
        sh->pcount++;
        __atomic_store_n(&sh->turn, 1, __ATOMIC_RELEASE);
        printf("step %ld\n", s);
        usleep(20000);
    }
    cur = steps;
    wait_turn(sh, 0);
    if (sh->pcount != steps || sh->ccount != steps) fail("final counts %ld %ld", sh->pcount, sh->ccount);
    verify(sh->page[(steps + 31) % PAGES], steps - 1, 1, "the child's last page");
    int st;
    if (waitpid(c, &st, 0) != c) fail("waitpid");
    child = 0;
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) fail("the child ended with status %#x", st);
    printf("done\n");
    return 0;
}
