/* A process whose every epoll_wait is one event-loop iteration: for each line read on
 * standard input it calls epoll_wait(timeout 0) on an empty epoll set N times (argv[1],
 * default 1000000) and prints the mean nanoseconds per call. bench/loop_cost.py and the
 * kernel matrix's loopcost check time the event-loop pair's hooks with it. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <time.h>

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    struct epoll_event ev;
    int fd = epoll_create1(0);
    char line[16];
    if (fd < 0 || n <= 0) {
        perror("epoll_loop");
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (long i = 0; i < n; i++)
            epoll_wait(fd, &ev, 1, 0);
        clock_gettime(CLOCK_MONOTONIC, &b);
        printf("%.2f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    }
    return 0;
}
