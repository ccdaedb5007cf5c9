/* System V shared memory, a semaphore set and a message queue used by a parent and its child, across checkpoints.
 * usage: sysv STEPS
 * The parent makes a shared memory segment (shmget IPC_PRIVATE, attached by shmat before the fork; the child
 * attaches it a second time), a set of 2 semaphores and a message queue, and prints "ids SHMID SEMID MSQID" to
 * stderr. The semaphores are the turn: the parent's turn is semop(-1) on semaphore 0, handing over is semop(+1) on
 * semaphore 1, and the other way round (semtimedop, so a lost wake-up ends in a MISMATCH instead of a hang); in a
 * turn both semaphores must read 0 with semctl GETVAL. In turn s the parent checks the child did exactly s turns
 * and the page it wrote, sends 2 numbered messages (mtype 1 + n % 3), writes its page and counts; the child checks
 * the parent's count and page (through both of its attachments, which must be the same memory), receives
 * messages in order but stays 5 behind, so messages are always queued, and writes its page. At every turn the
 * saved ids must still work with IPC_STAT and describe our objects: the segment's size and (from turn 1) 3
 * attachments, 2 semaphores, and exactly the number of messages sent and not yet received. At the end the child
 * receives the rest and exits 0; the parent checks that with waitpid and removes the three objects. Exits 99 with a
 * MISMATCH line on any difference, or if a turn does not come within 20 s. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGES 32
#define LAG 5

struct shared {
    long pcount, ccount, received;
    unsigned char page[PAGES][4096];
};

struct msg {
    long mtype;
    char text[32];
};

static long cur = -1;
static const char *who = "parent";
static pid_t child;
static int shmid = -1, semid = -1, msqid = -1;

static void cleanup(void) {
    shmctl(shmid, IPC_RMID, 0);
    semctl(semid, 0, IPC_RMID);
    msgctl(msqid, IPC_RMID, 0);
}

static void fail(const char *fmt, ...) {
    int e = errno;
    va_list ap;
    va_start(ap, fmt);
    printf("MISMATCH %s step %ld: ", who, cur);
    vprintf(fmt, ap);
    if (e) printf(" (errno %d %s)", e, strerror(e));
    printf("\n");
    va_end(ap);
    if (child > 0) kill(child, SIGKILL);
    if (child >= 0) cleanup();
    exit(99);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void semop1(int num, int op) {
    struct sembuf b = {.sem_num = num, .sem_op = op};
    double deadline = now() + 20;
    for (;;) {
        struct timespec t = {0, 200000000};
        if (semtimedop(semid, &b, 1, &t) == 0) return;
        if (errno != EAGAIN && errno != EINTR) fail("semop(%d, %d)", num, op);
        if (child > 0) {
            int st;
            if (waitpid(child, &st, WNOHANG) == child) {
                child = 0;
                fail("the child ended (status %#x) while it was its turn", st);
            }
        }
        if (now() > deadline) fail("semop(%d, %d) did not complete within 20 s", num, op);
    }
}

static void check_sems(void) {
    int a = semctl(semid, 0, GETVAL), b = semctl(semid, 1, GETVAL);
    if (a != 0 || b != 0) fail("semaphores %d %d in a turn, expected 0 0", a, b);
}

static unsigned char pattern(long s, int side, int i) { return (unsigned char)(s * 131 + i * 7 + side * 101 + (i >> 8)); }

static void fill(unsigned char *p, long s, int side) {
    for (int i = 0; i < 4096; i++) p[i] = pattern(s, side, i);
}

static void verify(const unsigned char *p, long s, int side, const char *what) {
    for (int i = 0; i < 4096; i++)
        if (p[i] != pattern(s, side, i)) fail("%s: byte %d is %d, expected %d", what, i, p[i], pattern(s, side, i));
}

/* The saved ids still name our objects. */
static void check_ids(struct shared *sh, long s, long sent) {
    struct shmid_ds sd;
    struct semid_ds md;
    struct msqid_ds qd;
    union semun { int val; struct semid_ds *buf; unsigned short *array; } arg = {.buf = &md};
    if (shmctl(shmid, IPC_STAT, &sd)) fail("shmctl(%d, IPC_STAT)", shmid);
    if (sd.shm_segsz != sizeof *sh || (sd.shm_perm.mode & 0777) != 0600 || sd.shm_perm.cuid != getuid())
        fail("segment %d: size %zu mode %o", shmid, (size_t)sd.shm_segsz, sd.shm_perm.mode);
    if (s >= 1 && sd.shm_nattch != 3) fail("segment %d has %lu attachments, expected 3", shmid, (unsigned long)sd.shm_nattch);
    if (semctl(semid, 0, IPC_STAT, arg)) fail("semctl(%d, IPC_STAT)", semid);
    if (md.sem_nsems != 2 || (md.sem_perm.mode & 0777) != 0600) fail("semaphore set %d: %lu semaphores, mode %o", semid, (unsigned long)md.sem_nsems, md.sem_perm.mode);
    if (msgctl(msqid, IPC_STAT, &qd)) fail("msgctl(%d, IPC_STAT)", msqid);
    if ((long)qd.msg_qnum != sent - sh->received || (qd.msg_perm.mode & 0777) != 0600)
        fail("queue %d holds %lu messages, expected %ld", msqid, (unsigned long)qd.msg_qnum, sent - sh->received);
}

static void receive(struct shared *sh, long upto) {
    while (sh->received < upto) {
        struct msg m;
        ssize_t n = msgrcv(msqid, &m, sizeof m.text, 0, IPC_NOWAIT);
        if (n < 0) fail("msgrcv of message %ld", sh->received);
        char want[32];
        int len = snprintf(want, sizeof want, "message %ld", sh->received);
        if (n != len + 1 || strcmp(m.text, want) || m.mtype != 1 + sh->received % 3)
            fail("received '%.*s' type %ld, expected '%s' type %ld", (int)n, m.text, m.mtype, want, 1 + sh->received % 3);
        sh->received++;
    }
}

int main(int argc, char **argv) {
    long steps = argc > 1 ? strtol(argv[1], 0, 10) : 200;
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct shared *sh;
    shmid = shmget(IPC_PRIVATE, sizeof *sh, IPC_CREAT | 0600);
    semid = semget(IPC_PRIVATE, 2, IPC_CREAT | 0600);
    msqid = msgget(IPC_PRIVATE, IPC_CREAT | 0600);
    if (shmid < 0 || semid < 0 || msqid < 0) fail("creating the objects");
    sh = shmat(shmid, 0, 0);
    if (sh == (void *)-1) fail("shmat");
    if (semctl(semid, 0, SETVAL, 1) || semctl(semid, 1, SETVAL, 0)) fail("semctl SETVAL");
    fprintf(stderr, "ids %d %d %d\n", shmid, semid, msqid);
    pid_t c = fork();
    if (c < 0) fail("fork");
    if (c == 0) {
        who = "child";
        child = -1; /* the parent cleans up */
        struct shared *sh2 = shmat(shmid, 0, SHM_RDONLY);
        if (sh2 == (void *)-1 || sh2 == sh) fail("second shmat");
        for (long s = 0; s < steps; s++) {
            cur = s;
            errno = 0;
            semop1(1, -1);
            check_sems();
            if (sh->pcount != s + 1 || sh->ccount != s) fail("counts %ld %ld, expected %ld %ld", sh->pcount, sh->ccount, s + 1, s);
            if (sh2->pcount != sh->pcount || sh2->ccount != sh->ccount) fail("the two attachments differ");
            verify(sh->page[s % PAGES], s, 0, "the parent's page");
            verify(sh2->page[s % PAGES], s, 0, "the parent's page through the second attachment");
            long sent = 2 * (s + 1);
            receive(sh, s == steps - 1 ? sent : sent - LAG);
            fill(sh->page[(s + PAGES / 2) % PAGES], s, 1);
            if (memcmp(sh2->page[(s + PAGES / 2) % PAGES], sh->page[(s + PAGES / 2) % PAGES], 4096)) fail("a write does not show through the second attachment");
            sh->ccount++;
            semop1(0, +1);
        }
        _exit(0);
    }
    child = c;
    long sent = 0;
    for (long s = 0; s < steps; s++) {
        cur = s;
        errno = 0;
        semop1(0, -1);
        check_sems();
        if (sh->pcount != s || sh->ccount != s) fail("counts %ld %ld, expected %ld %ld", sh->pcount, sh->ccount, s, s);
        if (s > 0) verify(sh->page[(s - 1 + PAGES / 2) % PAGES], s - 1, 1, "the child's page");
        check_ids(sh, s, sent);
        for (int i = 0; i < 2; i++, sent++) {
            struct msg m = {.mtype = 1 + sent % 3};
            int len = snprintf(m.text, sizeof m.text, "message %ld", sent);
            if (msgsnd(msqid, &m, len + 1, IPC_NOWAIT)) fail("msgsnd of message %ld", sent);
        }
        fill(sh->page[s % PAGES], s, 0);
        sh->pcount++;
        semop1(1, +1);
        printf("step %ld\n", s);
        usleep(20000);
    }
    cur = steps;
    semop1(0, -1);
    if (sh->pcount != steps || sh->ccount != steps || sh->received != sent) fail("final counts %ld %ld, %ld received", sh->pcount, sh->ccount, sh->received);
    check_ids(sh, 0, sent); /* the child may have detached already */
    int st;
    if (waitpid(c, &st, 0) != c) fail("waitpid");
    child = 0;
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) fail("the child ended with status %#x", st);
    struct shmid_ds sd;
    if (shmctl(shmid, IPC_STAT, &sd) || sd.shm_nattch != 1) fail("the segment has %lu attachments after the child's exit", (unsigned long)sd.shm_nattch);
    if (shmdt(sh)) fail("shmdt");
    cleanup();
    struct msqid_ds qd;
    if (msgctl(msqid, IPC_STAT, &qd) != -1) fail("the queue is still there after IPC_RMID");
    printf("done\n");
    return 0;
}
