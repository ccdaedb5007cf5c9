/* Private mappings of files a restore cannot find: a file deleted after mmap (as a library replaced by an upgrade
 * is) and a memfd whose fd was closed, both MAP_PRIVATE, some pages written, most only read.
 * usage: mapped_deleted DIR STEPS
 * At every step each mapping must still hold, page by page, the file's bytes where untouched and the written ones
 * where written; then one more page is written. Exits 99 with a MISMATCH line on any difference. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGES 64
#define PG 4096

static unsigned char file_byte(int which, long page, long i) { return (unsigned char)(which * 31 + page * 7 + i % 251); }
static unsigned char own_byte(long step, long page, long i) { return (unsigned char)(step * 13 + page + i % 17 + 1); }

static unsigned char *make(int which, const char *dir) {
    int fd;
    char path[4096];
    if (which == 0) {
        snprintf(path, sizeof path, "%s/mapped-file", dir);
        fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    } else {
        fd = memfd_create("mapped-memfd", 0);
    }
    if (fd < 0) { perror("open"); exit(2); }
    unsigned char *buf = malloc(PAGES * PG);
    for (long p = 0; p < PAGES; p++)
        for (long i = 0; i < PG; i++) buf[p * PG + i] = file_byte(which, p, i);
    if (write(fd, buf, PAGES * PG) != PAGES * PG) { perror("write"); exit(2); }
    free(buf);
    unsigned char *m = mmap(0, PAGES * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) { perror("mmap"); exit(2); }
    close(fd);
    if (which == 0) unlink(path);
    return m;
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    long steps = atol(argv[2]);
    unsigned char *m[2] = {make(0, argv[1]), make(1, argv[1])};
    long written_at[PAGES];
    for (long p = 0; p < PAGES; p++) written_at[p] = -1;
    for (long s = 0; s < steps; s++) {
        for (int w = 0; w < 2; w++)
            for (long p = 0; p < PAGES; p++)
                for (long i = 0; i < PG; i++) {
                    unsigned char want = written_at[p] < 0 ? file_byte(w, p, i) : own_byte(written_at[p], p, i);
                    if (m[w][p * PG + i] != want) {
                        printf("MISMATCH step %ld: mapping %d page %ld byte %ld is %u, not %u\n", s, w, p, i, m[w][p * PG + i], want);
                        return 99;
                    }
                }
        long p = (s * 5) % PAGES;
        if (p % 3 == 0) {  /* a third of the pages get written; the rest stay the file's */
            for (int w = 0; w < 2; w++)
                for (long i = 0; i < PG; i++) m[w][p * PG + i] = own_byte(s, p, i);
            written_at[p] = s;
        }
        printf("step %ld\n", s);
        fflush(stdout);
        nanosleep(&(struct timespec){0, 20000000}, 0);
    }
    printf("done\n");
    return 0;
}
