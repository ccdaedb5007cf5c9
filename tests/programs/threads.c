/* Eight threads taking turns under a mutex and a condition variable, each with a thread-local counter.
 * usage: threads ROUNDS
 * Thread k may only move when turn == k; it increments the shared total and its __thread counter, then passes
 * the turn on. The main thread prints "total T" every 80 moves and checks that the thread-local counters add
 * up. Exits 0 after ROUNDS rounds, 99 on any inconsistency. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define N 8
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static long turn, total, rounds;
static long counts[N];
static __thread long mine;
static __thread int myid = -1;

static void *worker(void *arg) {
    myid = (int)(long)arg;
    for (;;) {
        pthread_mutex_lock(&mu);
        while (turn % N != myid && total < rounds * N) pthread_cond_wait(&cv, &mu);
        if (total >= rounds * N) { pthread_mutex_unlock(&mu); break; }
        mine++;
        counts[myid] = mine;
        if (myid != (int)(long)arg) { printf("TLS BROKEN\n"); exit(99); }
        total++;
        turn++;
        pthread_cond_broadcast(&cv);
        pthread_mutex_unlock(&mu);
        usleep(1000);
    }
    return (void *)mine;
}

int main(int argc, char **argv) {
    rounds = strtol(argv[1], 0, 10);
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t t[N];
    for (long i = 0; i < N; i++) pthread_create(&t[i], 0, worker, (void *)i);
    long last = -1;
    for (;;) {
        pthread_mutex_lock(&mu);
        long tot = total, sum = 0;
        for (int i = 0; i < N; i++) sum += counts[i];
        pthread_mutex_unlock(&mu);
        if (sum != tot) { printf("SUM %ld != TOTAL %ld\n", sum, tot); return 99; }
        if (tot / 80 != last) { last = tot / 80; printf("total %ld\n", last * 80); }
        if (tot >= rounds * N) break;
        usleep(2000);
    }
    for (int i = 0; i < N; i++) {
        void *r;
        pthread_join(t[i], &r);
        if ((long)r != rounds) { printf("thread %d did %ld rounds\n", i, (long)r); return 99; }
    }
    printf("done\n");
    return 0;
}
