/* The main thread starts workers and leaves with pthread_exit: the process lives on in its other threads, its
 * leader a zombie (/proc shows it so) until the last thread ends.
 * usage: main_exits STEPS
 * Three workers take turns under a mutex printing "step N"; each checks at every step that the main thread is still
 * gone (State: Z) and that its thread-local counter adds up. The last worker to finish prints "done" and exits 0.
 * Exits 99 with a MISMATCH or BROKEN line on any difference. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define WORKERS 3
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static long next, steps, left = WORKERS, mine_total;
static __thread long mine;

static int leader_is_zombie(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char l[256];
    int z = 0;
    while (f && fgets(l, sizeof l, f))
        if (!strncmp(l, "State:", 6)) z = strchr(l, 'Z') != 0;
    if (f) fclose(f);
    return z;
}

static void *worker(void *arg) {
    (void)arg;
    for (int i = 0; !leader_is_zombie(); i++) {
        if (i == 5000) { printf("BROKEN: the main thread did not exit\n"); exit(99); }
        nanosleep(&(struct timespec){0, 1000000}, 0);
    }
    for (;;) {
        pthread_mutex_lock(&mu);
        if (next >= steps) break;
        if (!leader_is_zombie()) { printf("BROKEN: the main thread is back at step %ld\n", next); exit(99); }
        mine++;
        mine_total++;
        printf("step %ld\n", next++);
        pthread_mutex_unlock(&mu);
        nanosleep(&(struct timespec){0, 20000000}, 0);
    }
    /* Still holding the mutex. */
    if (--left == 0) {
        if (mine_total != steps) { printf("MISMATCH: %ld moves for %ld steps\n", mine_total, steps); exit(99); }
        printf("done\n");
        exit(0);
    }
    pthread_mutex_unlock(&mu);
    return (void *)mine;
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    steps = atol(argv[1]);
    setvbuf(stdout, 0, _IOLBF, 0);
    pthread_t t;
    for (int i = 0; i < WORKERS; i++)
        if (pthread_create(&t, 0, worker, 0)) return 2;
    pthread_exit(0);
}
