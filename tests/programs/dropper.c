// A daemon as nginx, postgres or sshd start: `dropper SECRET PRIVATE_DIR` runs as root, opens SECRET (a file
// only root may write) for appending and enters PRIVATE_DIR (one only root may enter), then forks a worker that
// switches to uid and gid 65534 and keeps both; the parent closes the file and waits. The worker prints
// "step N" on stdout and appends it to SECRET every 50 ms, 1000 steps; the parent prints "parent done" when it
// has ended.
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    int fd = open(argv[1], O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd < 0 || chdir(argv[2]) != 0) {
        perror("setup");
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    pid_t c = fork();
    if (c == 0) {
        if (setgroups(0, NULL) != 0 || setgid(65534) != 0 || setuid(65534) != 0) {
            perror("dropping privileges");
            _exit(1);
        }
        for (int i = 0; i < 1000; i++) {
            printf("step %d\n", i);
            dprintf(fd, "step %d\n", i);
            struct timespec t = {0, 50 * 1000 * 1000};
            nanosleep(&t, NULL);
        }
        printf("done\n");
        _exit(0);
    }
    close(fd);
    int st;
    waitpid(c, &st, 0);
    printf("parent done %d\n", st);
    return 0;
}
