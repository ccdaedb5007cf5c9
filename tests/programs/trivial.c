/* The smallest job: prints "ready" and sleeps. */
#include <stdio.h>
#include <unistd.h>
int main(void) { setvbuf(stdout, NULL, _IOLBF, 0); printf("ready\n"); for (;;) sleep(1); }
