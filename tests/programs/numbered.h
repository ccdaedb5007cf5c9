/* Numbered messages between test processes: one int64 each, exactly, or the process exits (97 on a failed
 * write, 98 on a failed or short read). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static void put(int fd, int64_t v) {
    if (write(fd, &v, sizeof v) != sizeof v) { perror("write"); exit(97); }
}

static int64_t get(int fd) {
    int64_t v;
    size_t got = 0;
    while (got < sizeof v) {
        ssize_t n = read(fd, (char *)&v + got, sizeof v - got);
        if (n <= 0) { perror("read"); exit(98); }
        got += n;
    }
    return v;
}
