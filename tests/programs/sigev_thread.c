/* A POSIX timer notified by SIGEV_THREAD (glibc would run it on a hidden helper thread that blocks every
 * signal), firing every 20 ms. Prints "ready", then "tick N fired M" every 100 ms. */
#include <signal.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static volatile long fired;
static void on_timer(union sigval v) { (void)v; fired++; }

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sigevent sev = {.sigev_notify = SIGEV_THREAD, .sigev_notify_function = on_timer};
    timer_t t;
    if (timer_create(CLOCK_MONOTONIC, &sev, &t)) { perror("timer_create"); return 2; }
    struct itimerspec its = {.it_interval = {0, 20000000}, .it_value = {0, 20000000}};
    timer_settime(t, 0, &its, NULL);
    printf("ready\n");
    for (long n = 0;; n++) {
        usleep(100000);
        printf("tick %ld fired %ld\n", n, fired);
    }
}
