/* Blocked signals, pending with their values across checkpoints, read through signalfds.
 * usage: signalfd STEPS
 * SIGUSR1, SIGUSR2 and SIGRTMIN+2 are blocked. One signalfd (non-blocking) takes all three, a second one
 * (non-blocking) only SIGUSR2. At the end of step s, the program queues to itself, by a pattern of s: SIGUSR1 with
 * value s*10+1 (sigqueue, to the process; or pthread_sigqueue, to the thread), SIGUSR2 with s*10+2, and one to
 * three SIGRTMIN+2 with s*10+3, s*10+4, ... so they are pending while it sleeps. At step s+1 it reads them: on odd
 * steps SIGUSR2 first through the second signalfd (which must give nothing else), then everything through the
 * first one. Every record must have the right number, ssi_code SI_QUEUE, our pid and uid and the value sent;
 * realtime ones in the order sent; nothing more (EAGAIN), and sigpending must be empty after. Exits 99 with a
 * MISMATCH line on any difference. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
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

#define RT (SIGRTMIN + 2)

/* What was sent and is not read yet. */
static int usr1_val = -1, usr2_val = -1, rt_vals[8], rt_n, rt_next;

static void send(long s) {
    union sigval v;
    if (s % 2 == 0) {
        v.sival_int = s * 10 + 1;
        if (s % 4 == 0) {
            if (sigqueue(getpid(), SIGUSR1, v)) fail("sigqueue SIGUSR1");
        } else if (pthread_sigqueue(pthread_self(), SIGUSR1, v)) fail("pthread_sigqueue SIGUSR1");
        usr1_val = v.sival_int;
    }
    if (s % 3 != 1) {
        v.sival_int = s * 10 + 2;
        if (sigqueue(getpid(), SIGUSR2, v)) fail("sigqueue SIGUSR2");
        usr2_val = v.sival_int;
    }
    int n = s % 4;
    for (int i = 0; i < n; i++) {
        v.sival_int = s * 10 + 3 + i;
        if (sigqueue(getpid(), RT, v)) fail("sigqueue RT");
        rt_vals[rt_n++] = v.sival_int;
    }
}

static void record(struct signalfd_siginfo *si) {
    if (si->ssi_code != SI_QUEUE) fail("signal %u: ssi_code %d, expected SI_QUEUE", si->ssi_signo, si->ssi_code);
    if (si->ssi_pid != (uint32_t)getpid() || si->ssi_uid != getuid()) fail("signal %u from pid %u uid %u", si->ssi_signo, si->ssi_pid, si->ssi_uid);
    int v = si->ssi_int;
    if (si->ssi_signo == SIGUSR1) {
        if (v != usr1_val) fail("SIGUSR1 value %d, expected %d", v, usr1_val);
        usr1_val = -1;
    } else if (si->ssi_signo == SIGUSR2) {
        if (v != usr2_val) fail("SIGUSR2 value %d, expected %d", v, usr2_val);
        usr2_val = -1;
    } else if ((int)si->ssi_signo == RT) {
        if (rt_next >= rt_n || v != rt_vals[rt_next]) fail("SIGRTMIN+2 value %d, expected %d (%d of %d)", v, rt_next < rt_n ? rt_vals[rt_next] : -1, rt_next, rt_n);
        rt_next++;
    } else fail("signal %u read", si->ssi_signo);
}

static int read_all(int fd, int max) {
    struct signalfd_siginfo si[16];
    int got = 0;
    for (;;) {
        ssize_t n = read(fd, si, sizeof si);
        if (n < 0) {
            if (errno == EAGAIN) return got;
            fail("signalfd read");
        }
        if (n % sizeof si[0]) fail("signalfd read of %zd bytes", n);
        for (size_t i = 0; i < n / sizeof si[0]; i++) record(&si[i]);
        got += n / sizeof si[0];
        if (got > max) fail("%d signals read, at most %d expected", got, max);
    }
}

int main(int argc, char **argv) {
    long steps = argc > 1 ? strtol(argv[1], 0, 10) : 200;
    setvbuf(stdout, NULL, _IOLBF, 0);
    sigset_t all, two;
    sigemptyset(&all);
    sigaddset(&all, SIGUSR1);
    sigaddset(&all, SIGUSR2);
    sigaddset(&all, RT);
    sigemptyset(&two);
    sigaddset(&two, SIGUSR2);
    if (sigprocmask(SIG_BLOCK, &all, 0)) fail("sigprocmask");
    int fd = signalfd(-1, &all, SFD_NONBLOCK), fd2 = signalfd(-1, &two, SFD_NONBLOCK | SFD_CLOEXEC);
    if (fd < 0 || fd2 < 0) fail("signalfd");
    for (long s = 0; s < steps; s++) {
        cur = s;
        errno = 0;
        sigset_t m;
        sigprocmask(SIG_BLOCK, 0, &m);
        if (!sigismember(&m, SIGUSR1) || !sigismember(&m, SIGUSR2) || !sigismember(&m, RT)) fail("signal mask lost");
        int want = (usr1_val >= 0) + (usr2_val >= 0) + rt_n;
        if (s % 2) {
            int had2 = usr2_val >= 0;
            int n = read_all(fd2, 1);
            if (n != had2 || usr2_val >= 0) fail("the SIGUSR2 signalfd read %d records", n);
            want -= n;
        }
        int n = read_all(fd, want);
        if (n != want || usr1_val >= 0 || usr2_val >= 0 || rt_next != rt_n) fail("read %d of %d signals", n, want);
        rt_n = rt_next = 0;
        sigset_t pend;
        sigpending(&pend);
        if (sigismember(&pend, SIGUSR1) || sigismember(&pend, SIGUSR2) || sigismember(&pend, RT)) fail("signals still pending");
        send(s);
        printf("step %ld\n", s);
        usleep(20000);
    }
    printf("done\n");
    return 0;
}
