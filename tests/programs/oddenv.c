/* execve with an environment the app made up: entries without '=' (LD_PRELOAD among them) are the app's
 * business. Runs `sh -c 'echo "exec ok: $0"'` with such an environment and reports how it ended. */
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pid_t p = fork();
    if (p == 0) {
        char *argv[] = {"sh", "-c", "echo \"exec ok: $0\"", "odd", NULL};
        char *envp[] = {"LD_PRELOAD", "NOEQUALS", "PATH=/usr/bin:/bin", NULL};
        execve("/bin/sh", argv, envp);
        _exit(127);
    }
    int st = 0;
    waitpid(p, &st, 0);
    printf("child status %d\n", st);
    return 0;
}
