/* File locks of the three kinds, held across checkpoints and checked from fresh processes.
 * usage: locks FILE STEPS
 * FILE is created (1000 bytes). The parent opens it twice: on fd A it takes flock(LOCK_EX); on fd B a POSIX write
 * lock (F_SETLK) on bytes 0-99, a POSIX read lock on bytes 500-599 and an OFD write lock (F_OFD_SETLK) on bytes
 * 200-299. At every step it forks a child that opens FILE itself and checks, without blocking, that it cannot take
 * the flock (exclusive or shared), a write or read lock on 0-99 (F_GETLK names the parent), the OFD range 200-299
 * (F_OFD_GETLK says pid -1) nor a write lock on 500-599, but can take a write lock on 400-499 and a read lock on
 * 500-599; it exits with a code naming the first check that failed. The parent checks the exit code, and itself
 * that the locks belong where they were taken: flock on fd B and an OFD lock on 200-299 through fd A fail (other
 * open file descriptions), an OFD lock on 0-99 fails (the parent's POSIX lock), and re-taking each lock on its own
 * fd succeeds. Exits 99 with a MISMATCH line on any difference. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

static long cur = -1;

static void fail(const char *fmt, ...) {
    int e = errno;
    va_list ap;
    va_start(ap, fmt);
    printf("MISMATCH step %ld: ", cur);
    vprintf(fmt, ap);
    if (e) printf(" (errno %d %s)", e, strerror(e));
    printf("\n");
    va_end(ap);
    exit(99);
}

static int lk(int fd, int cmd, short type, off_t start, off_t len) {
    struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len};
    return fcntl(fd, cmd, &fl);
}

static int busy(int r) { return r == -1 && (errno == EAGAIN || errno == EACCES || errno == EWOULDBLOCK); }

/* The child's checks: 0 if all hold, else the number of the first that failed. */
static int child_checks(const char *file, pid_t parent) {
    int fd = open(file, O_RDWR);
    if (fd < 0) return 1;
    if (!busy(flock(fd, LOCK_EX | LOCK_NB))) return 10;
    if (!busy(flock(fd, LOCK_SH | LOCK_NB))) return 11;
    if (!busy(lk(fd, F_SETLK, F_WRLCK, 0, 100))) return 12;
    if (!busy(lk(fd, F_SETLK, F_RDLCK, 50, 10))) return 13;
    struct flock g = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 100};
    if (fcntl(fd, F_GETLK, &g) || g.l_type != F_WRLCK || g.l_pid != parent || g.l_start != 0 || g.l_len != 100) return 14;
    if (!busy(lk(fd, F_OFD_SETLK, F_WRLCK, 200, 100))) return 15;
    if (!busy(lk(fd, F_SETLK, F_RDLCK, 250, 10))) return 16;
    struct flock o = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 200, .l_len = 100};
    if (fcntl(fd, F_OFD_GETLK, &o) || o.l_type != F_WRLCK || o.l_pid != -1 || o.l_start != 200 || o.l_len != 100) return 17;
    if (lk(fd, F_SETLK, F_WRLCK, 400, 100)) return 18;
    if (lk(fd, F_SETLK, F_RDLCK, 500, 100)) return 19;
    if (!busy(lk(fd, F_SETLK, F_WRLCK, 500, 100))) return 20;
    struct flock r = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 500, .l_len = 100};
    if (fcntl(fd, F_GETLK, &r) || r.l_type != F_RDLCK || r.l_pid != parent) return 21;
    if (lk(fd, F_SETLK, F_UNLCK, 400, 200)) return 22;
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: locks FILE STEPS\n"); return 2; }
    const char *file = argv[1];
    long steps = strtol(argv[2], 0, 10);
    setvbuf(stdout, NULL, _IOLBF, 0);
    int a = open(file, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (a < 0) fail("open %s", file);
    char zero[1000] = {0};
    if (write(a, zero, sizeof zero) != sizeof zero) fail("write");
    int b = open(file, O_RDWR);
    if (b < 0) fail("open %s", file);
    if (flock(a, LOCK_EX | LOCK_NB)) fail("flock");
    if (lk(b, F_SETLK, F_WRLCK, 0, 100)) fail("POSIX write lock");
    if (lk(b, F_SETLK, F_RDLCK, 500, 100)) fail("POSIX read lock");
    if (lk(b, F_OFD_SETLK, F_WRLCK, 200, 100)) fail("OFD lock");
    pid_t me = getpid();
    for (long s = 0; s < steps; s++) {
        cur = s;
        errno = 0;
        pid_t c = fork();
        if (c < 0) fail("fork");
        if (c == 0) _exit(child_checks(file, me));
        int st;
        if (waitpid(c, &st, 0) != c) fail("waitpid");
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) fail("the child's check %d failed (status %#x)", WIFEXITED(st) ? WEXITSTATUS(st) : -1, st);
        /* The locks are where they were taken. */
        if (!busy(flock(b, LOCK_EX | LOCK_NB))) fail("flock through the other fd did not fail");
        if (!busy(lk(a, F_OFD_SETLK, F_WRLCK, 200, 100))) fail("OFD lock through the other fd did not fail");
        if (!busy(lk(a, F_OFD_SETLK, F_WRLCK, 0, 100))) fail("OFD lock over the parent's POSIX lock did not fail");
        if (flock(a, LOCK_EX | LOCK_NB)) fail("re-taking the flock");
        if (lk(b, F_OFD_SETLK, F_WRLCK, 200, 100)) fail("re-taking the OFD lock");
        if (lk(a, F_SETLK, F_WRLCK, 0, 100)) fail("re-taking the POSIX lock");
        printf("step %ld\n", s);
        usleep(20000);
    }
    printf("done\n");
    return 0;
}
