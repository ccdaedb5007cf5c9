/* Thousands of open files: FDS fds on /dev/null, pipes and sockets, each checked every step.
 * usage: manyfds FDS STEPS
 * Raises its soft open-file limit to the hard one, opens FDS fds (a third /dev/null, a third the ends of pipes
 * holding one byte each, a third ends of socketpairs), then each step checks every fd is still what it was
 * (fstat type, a pipe's byte still there) and prints "step N". Exits 0 after STEPS steps, 99 on a mismatch. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    long steps = strtol(argv[2], 0, 10);
    struct rlimit r;
    getrlimit(RLIMIT_NOFILE, &r);
    r.rlim_cur = r.rlim_max;
    setrlimit(RLIMIT_NOFILE, &r);
    int *fd = calloc(n, sizeof(int)), *kind = calloc(n, sizeof(int));
    for (int i = 0; i < n;) {
        int p[2];
        switch (i % 3) {
        case 0:
            fd[i] = open("/dev/null", O_RDWR); kind[i++] = S_IFCHR;
            break;
        case 1:
            if (pipe(p)) { perror("pipe"); return 2; }
            if (write(p[1], "x", 1) != 1) return 2;
            fd[i] = p[0]; kind[i++] = S_IFIFO;
            if (i < n) { fd[i] = p[1]; kind[i++] = S_IFIFO; } else close(p[1]);
            break;
        default:
            if (socketpair(AF_UNIX, SOCK_STREAM, 0, p)) { perror("socketpair"); return 2; }
            fd[i] = p[0]; kind[i++] = S_IFSOCK;
            if (i < n) { fd[i] = p[1]; kind[i++] = S_IFSOCK; } else close(p[1]);
        }
        if (fd[i - 1] < 0) { perror("open"); return 2; }
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (long s = 0; s < steps; s++) {
        for (int i = 0; i < n; i++) {
            struct stat st;
            int avail = 0;
            if (fstat(fd[i], &st) || (int)(st.st_mode & S_IFMT) != kind[i]) { printf("MISMATCH fd %d\n", fd[i]); return 99; }
            if (kind[i] == S_IFIFO && (i % 3) == 1 && (ioctl(fd[i], FIONREAD, &avail) || avail != 1)) {
                printf("MISMATCH pipe %d holds %d bytes\n", fd[i], avail); return 99;
            }
        }
        printf("step %ld\n", s);
        usleep(20000);
    }
    printf("done\n");
    return 0;
}
