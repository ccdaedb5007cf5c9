/* pidfds on a living child and on a zombie, across checkpoints.
 * usage: pidfd GOFILE STEPS
 * Child A waits (polling every 10 ms) until GOFILE exists, then exits 7. Child Z exits 5 at once and stays a
 * zombie. The parent holds pidfd_open(A) and pidfd_open(Z). At every step: A's pidfd must not be readable and
 * pidfd_send_signal(A, 0) must succeed (unless GOFILE exists already: then A may be gone); Z's pidfd must be
 * readable, and waitid(P_PIDFD, WNOWAIT) on it must give Z's pid and exit status 5 without reaping it. Once
 * GOFILE exists, A's pidfd becomes readable within 5 s, waitid(P_PIDFD) on it gives A's pid and exit status 7,
 * on Z's gives 5, and pidfd_send_signal to A then says ESRCH; the parent prints "done". Exits 99 with a MISMATCH
 * line on any difference, or if GOFILE has not come after STEPS steps. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

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

static int pidfd_open(pid_t pid) { return syscall(SYS_pidfd_open, pid, 0); }
static int pidfd_send_signal(int fd, int sig) { return syscall(SYS_pidfd_send_signal, fd, sig, NULL, 0); }

static int readable(int fd, int timeout) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int n;
    do n = poll(&p, 1, timeout);
    while (n < 0 && errno == EINTR);
    if (n < 0) fail("poll pidfd");
    return n == 1 && (p.revents & POLLIN);
}

static void status(int fd, pid_t pid, int code, int flags, const char *who) {
    siginfo_t si;
    memset(&si, 0, sizeof si);
    if (waitid(P_PIDFD, fd, &si, WEXITED | flags)) fail("waitid(P_PIDFD) on %s", who);
    if (si.si_pid != pid || si.si_code != CLD_EXITED || si.si_status != code)
        fail("%s: waitid gave pid %d code %d status %d, expected pid %d exit %d", who, si.si_pid, si.si_code, si.si_status, pid, code);
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: pidfd GOFILE STEPS\n"); return 2; }
    const char *go = argv[1];
    long steps = strtol(argv[2], 0, 10);
    setvbuf(stdout, NULL, _IOLBF, 0);
    pid_t a = fork();
    if (a < 0) fail("fork");
    if (a == 0) {
        while (access(go, F_OK) != 0) usleep(10000);
        _exit(7);
    }
    pid_t z = fork();
    if (z < 0) fail("fork");
    if (z == 0) _exit(5);
    int pa = pidfd_open(a), pz = pidfd_open(z);
    if (pa < 0 || pz < 0) fail("pidfd_open");
    if (!readable(pz, 5000)) fail("the zombie's pidfd is not readable");
    for (long s = 0; s < steps; s++) {
        cur = s;
        errno = 0;
        int went = access(go, F_OK) == 0;
        if (readable(pa, 0)) {
            if (access(go, F_OK) != 0) fail("the living child's pidfd is readable");
            went = 1;
        } else if (pidfd_send_signal(pa, 0) && !(went && errno == ESRCH)) fail("pidfd_send_signal to the living child");
        if (!readable(pz, 0)) fail("the zombie's pidfd is not readable");
        status(pz, z, 5, WNOHANG | WNOWAIT, "the zombie");
        if (went) {
            if (!readable(pa, 5000)) fail("the child did not exit within 5 s of GOFILE");
            status(pa, a, 7, 0, "the child");
            status(pz, z, 5, 0, "the zombie");
            if (pidfd_send_signal(pa, 0) != -1 || errno != ESRCH) fail("pidfd_send_signal to the reaped child did not say ESRCH");
            if (waitpid(-1, 0, WNOHANG) != -1 || errno != ECHILD) fail("children left");
            printf("done\n");
            return 0;
        }
        printf("step %ld\n", s);
        usleep(20000);
    }
    printf("MISMATCH GOFILE never came\n");
    return 99;
}
