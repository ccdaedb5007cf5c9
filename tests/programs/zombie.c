/* A child that exits before the checkpoint and is reaped only after the restore.
 * usage: zombie GOFILE STEPS
 * The child exits at once with status 42 (and a second one is killed by SIGTERM). The parent counts steps until
 * GOFILE exists, then reaps both and prints their statuses. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    long steps = strtol(argv[2], 0, 10);
    setvbuf(stdout, NULL, _IOLBF, 0);
    pid_t a = fork();
    if (a == 0) _exit(42);
    pid_t b = fork();
    if (b == 0) { for (;;) pause(); }
    kill(b, SIGTERM);
    for (long s = 0; s < steps; s++) {
        if (access(argv[1], F_OK) == 0) {
            int sa, sb;
            if (waitpid(a, &sa, 0) != a || waitpid(b, &sb, 0) != b) { printf("WAIT FAILED\n"); return 99; }
            printf("reaped %d exit %d, %d signal %d\n", a, WIFEXITED(sa) ? WEXITSTATUS(sa) : -1, b, WIFSIGNALED(sb) ? WTERMSIG(sb) : -1);
            printf("done\n");
            return 0;
        }
        printf("step %ld\n", s);
        usleep(20000);
    }
    printf("GOFILE never came\n");
    return 99;
}
