/* Reads a file in chunks, seeking back and forth, and reports each read.
 * usage: reader FILE STEPS
 * Step s seeks to a position computed from s and the current offset, reads 4096 bytes and prints
 * "step S off O sum X" (O: the offset read at; X: the sum of the bytes), so the harness can recompute every
 * line: the offset must carry over a restore exactly. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDONLY);
    long steps = strtol(argv[2], 0, 10);
    off_t size = lseek(fd, 0, SEEK_END);
    lseek(fd, 0, SEEK_SET);
    setvbuf(stdout, NULL, _IOLBF, 0);
    unsigned char buf[4096];
    for (long s = 0; s < steps; s++) {
        off_t cur = lseek(fd, 0, SEEK_CUR);
        off_t next = (cur + (s % 7) * 1000 + 1) % (size - 4096);
        if (s % 3 == 0) lseek(fd, next, SEEK_SET);
        else lseek(fd, -(off_t)(s % 5), SEEK_CUR);
        off_t at = lseek(fd, 0, SEEK_CUR);
        if (at < 0 || at > size - 4096) { lseek(fd, 0, SEEK_SET); at = 0; }
        ssize_t n = read(fd, buf, sizeof buf);
        unsigned long sum = 0;
        for (ssize_t i = 0; i < n; i++) sum += buf[i] * (unsigned long)(i + 1);
        printf("step %ld off %ld sum %lu\n", s, (long)at, sum);
        usleep(20000);
    }
    printf("done\n");
    return 0;
}
