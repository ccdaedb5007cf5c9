/* Sleeping and waiting calls across checkpoints: none may fail with EINTR because of vOS.
 * usage: sleeper STEPS LONG_SLEEP_MS
 * Each step: nanosleep, poll, select and sigtimedwait with short timeouts, each of which must time
 * out normally. At step 10 it sleeps LONG_SLEEP_MS at once ("long sleep" / "woke" lines), so a checkpoint can
 * catch it there. */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <time.h>
#include <unistd.h>

static void fail(const char *what) { printf("FAILED %s: %s\n", what, strerror(errno)); exit(99); }

int main(int argc, char **argv) {
    long steps = strtol(argv[1], 0, 10), long_ms = strtol(argv[2], 0, 10);
    setvbuf(stdout, NULL, _IOLBF, 0);
    sigset_t usr;
    sigemptyset(&usr);
    sigaddset(&usr, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr, 0);
    for (long s = 0; s < steps; s++) {
        if (s == 10) {
            struct timespec t0, t1, req = {long_ms / 1000, (long_ms % 1000) * 1000000};
            clock_gettime(CLOCK_MONOTONIC, &t0);
            printf("long sleep\n");
            if (nanosleep(&req, 0) != 0) fail("long nanosleep");
            clock_gettime(CLOCK_MONOTONIC, &t1);
            long ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
            printf("woke after %ld ms of job time\n", ms);
        }
        struct timespec ts = {0, 10 * 1000000};
        if (nanosleep(&ts, 0) != 0) fail("nanosleep");
        if (poll(0, 0, 10) != 0) fail("poll");
        struct timeval tv = {0, 10000};
        if (select(0, 0, 0, 0, &tv) != 0) fail("select");
        struct timespec sw = {0, 10 * 1000000};
        if (sigtimedwait(&usr, 0, &sw) != -1 || errno != EAGAIN) fail("sigtimedwait");
        printf("step %ld\n", s);
    }
    printf("done\n");
    return 0;
}
