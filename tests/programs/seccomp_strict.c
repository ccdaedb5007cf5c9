/* A thread in seccomp strict mode (it may only read, write, exit and sigreturn): any signal handler the shim ran
 * on it, and any syscall of the shim's there, would kill the whole process.
 * usage: seccomp_strict STEPS
 * The strict thread echoes each byte it reads from one pipe to another; the main thread counts steps and, at each,
 * has one byte echoed. At the end the strict thread leaves with a plain exit. Exits 99 on any difference. */
#define _GNU_SOURCE
#include <linux/seccomp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int in[2], out[2];

static void *strict(void *arg) {
    (void)arg;
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT) != 0) { perror("prctl"); exit(2); }
    /* From here on only read, write, exit and rt_sigreturn: raw syscalls only. */
    for (;;) {
        char c;
        if (syscall(SYS_read, in[0], &c, 1) != 1) break;
        if (c == 0) break;
        c++;
        syscall(SYS_write, out[1], &c, 1);
    }
    syscall(SYS_exit, 0);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    long steps = atol(argv[1]);
    setvbuf(stdout, 0, _IOLBF, 0);
    if (pipe(in) || pipe(out)) { perror("pipe"); return 2; }
    pthread_t t;
    if (pthread_create(&t, 0, strict, 0)) return 2;
    for (long s = 0; s < steps; s++) {
        char c = (char)('a' + s % 20), r = 0;  /* never 0, the end */
        if (write(in[1], &c, 1) != 1 || read(out[0], &r, 1) != 1 || r != c + 1) {
            printf("MISMATCH step %ld: sent %c, got %c\n", s, c, r);
            return 99;
        }
        printf("step %ld\n", s);
        nanosleep(&(struct timespec){0, 20000000}, 0);
    }
    if (write(in[1], "", 1) != 1) return 99;
    pthread_join(t, 0);
    printf("done\n");
    return 0;
}
