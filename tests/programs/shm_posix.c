/* POSIX shared memory (shm_open) mapped by a parent and its child, across checkpoints.
 * usage: shm_posix STEPS
 * The parent makes "/vos-test-<pid>" with shm_open, sizes it with ftruncate (64 data pages plus a header) and maps
 * it MAP_SHARED; it forks and the child opens the same name itself and maps it. They take turns (a turn word in
 * the region, polled with short sleeps): in its turn s the parent checks the child did exactly s turns and that
 * the page the child wrote in turn s-1 holds the child's pattern, counts, writes its own pattern for s into
 * another page and hands the turn over; the child checks the parent's count and page, writes its page and hands it
 * back. Both keep their fds open: fstat must give the size at every turn, and every 10 turns each side opens the
 * name again and reads the counters through the new fd: the name must still be the object both have mapped. The
 * parent prints the steps; at the end the child exits 0, the parent checks that with waitpid, shm_unlinks the
 * name and checks it is gone. Exits 99 with a MISMATCH line on any difference, or if the other side does not take
 * its turn within 20 s. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGES 64

struct shared {
    int turn; /* 0: the parent's, 1: the child's */
    long pcount, ccount;
    unsigned char page[PAGES][4096];
};

static long cur = -1;
static const char *who = "parent";
static pid_t child;
static char name[64];

static void fail(const char *fmt, ...) {
    int e = errno;
    va_list ap;
    va_start(ap, fmt);
    printf("MISMATCH %s step %ld: ", who, cur);
    vprintf(fmt, ap);
    if (e) printf(" (errno %d %s)", e, strerror(e));
    printf("\n");
    va_end(ap);
    if (child) {
        kill(child, SIGKILL);
        shm_unlink(name);
    }
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
                shm_unlink(name);
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

/* The fd still has the size; every 10 turns, the name still leads to the same object. */
static void check_object(int fd, struct shared *sh, long s) {
    struct stat st;
    if (fstat(fd, &st) || st.st_size != sizeof *sh) fail("fstat: size %ld, expected %zu", (long)st.st_size, sizeof *sh);
    if (s % 10) return;
    int fd2 = shm_open(name, O_RDONLY, 0);
    if (fd2 < 0) fail("shm_open %s again", name);
    long c[2];
    if (pread(fd2, c, sizeof c, offsetof(struct shared, pcount)) != sizeof c) fail("pread through the name");
    close(fd2);
    if (c[0] != sh->pcount || c[1] != sh->ccount) fail("the name reads counts %ld %ld, the mapping %ld %ld", c[0], c[1], sh->pcount, sh->ccount);
}

int main(int argc, char **argv) {
    long steps = argc > 1 ? strtol(argv[1], 0, 10) : 200;
    setvbuf(stdout, NULL, _IOLBF, 0);
    snprintf(name, sizeof name, "/vos-test-%d", (int)getpid());
    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) fail("shm_open %s", name);
    struct shared *sh;
    if (ftruncate(fd, sizeof *sh)) fail("ftruncate");
    sh = mmap(0, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (sh == MAP_FAILED) fail("mmap");
    pid_t c = fork();
    if (c < 0) fail("fork");
    if (c == 0) {
        who = "child";
        close(fd);
        munmap(sh, sizeof *sh);
        fd = shm_open(name, O_RDWR, 0);
        if (fd < 0) fail("shm_open %s in the child", name);
        sh = mmap(0, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (sh == MAP_FAILED) fail("mmap in the child");
        for (long s = 0; s < steps; s++) {
            cur = s;
            errno = 0;
            wait_turn(sh, 1);
            if (sh->pcount != s + 1 || sh->ccount != s) fail("counts %ld %ld, expected %ld %ld", sh->pcount, sh->ccount, s + 1, s);
            verify(sh->page[s % PAGES], s, 0, "the parent's page");
            check_object(fd, sh, s);
            fill(sh->page[(s + 32) % PAGES], s, 1);
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
        check_object(fd, sh, s + 5);
        fill(sh->page[s % PAGES], s, 0);
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
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        shm_unlink(name);
        child = 0;
        fail("the child ended with status %#x", st);
    }
    child = 0;
    if (shm_unlink(name)) fail("shm_unlink %s", name);
    if (shm_open(name, O_RDONLY, 0) != -1 || errno != ENOENT) fail("%s still there after shm_unlink", name);
    printf("done\n");
    return 0;
}
