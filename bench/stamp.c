/* stamp: a no-op program that records when it started (bench/daemon.py's latency probe).
 *
 * Appends one line "<key> <epoch seconds, ns>\n" to $STAMP_FILE with a single O_APPEND
 * write (atomic for lines this short), then exits 0. The key is argv[1] if not empty, else
 * $RQ_PARAM1 (a queue script gets one empty argument and the message in RQ_*), else "-". Without $STAMP_FILE it does nothing, like
 * /bin/true; it costs about what /bin/true costs to start.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    const char *path = getenv("STAMP_FILE");
    if (!path)
        return 0;
    const char *key = argc > 1 && argv[1][0] ? argv[1] : getenv("RQ_PARAM1");
    if (!key || !*key)
        key = "-";
    char line[512];
    int n = snprintf(line, sizeof line, "%s %lld.%09ld\n", key, (long long)ts.tv_sec, ts.tv_nsec);
    if (n <= 0 || n >= (int)sizeof line)
        return 1;
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return 1;
    if (write(fd, line, (size_t)n) != n)
        return 1;
    return close(fd) == 0 ? 0 : 1;
}
