/* A lean WebSocket connect client for bench/connrate.py: no Python on the client side.
 *
 * Opens N sockets to HOST:PORT with at most WINDOW handshakes in flight; each
 * one sends the upgrade request with its own bearer token (one per line of
 * TOKENS), waits for the 101, sends one masked subscribe frame for CHANNEL and
 * waits for the reply. It times each socket from connect() to the 101 (the
 * handshake) and to the subscription's reply, prints one JSON line, then holds
 * every socket open until its standard input closes (so the caller can measure
 * the server while they are open), and exits.
 *
 *   connclient HOST PORT N WINDOW TOKENS CHANNEL
 *
 * One thread, one epoll: a few system calls per socket, so it stays far from
 * saturating its core while the server does the work (the caller checks).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { CONNECTING, WAIT_101, WAIT_REPLY, DONE, FAILED };

typedef struct {
    int fd, state, len;
    double started, handshake, subscribed;
    char buf[512];
} conn_t;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double quantile(double *v, int n, double q) {
    if (n == 0) return 0;
    int i = (int)(q * (n - 1) + 0.5);
    return v[i];
}

static char **tokens;
static struct sockaddr_in addr;
static const char *host_header;
static char sub_frame[256];
static int sub_len;
static int epfd;

static int start(conn_t *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) return -1;
    c->started = now();
    c->state = CONNECTING;
    c->len = 0;
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        close(c->fd);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
    return 0;
}

static int reasons[4];  /* connect, write, read/closed, refused or error reply */

static void fail(conn_t *c, int why) {
    if (why == 3 && reasons[3] < 3) fprintf(stderr, "connclient: refused: %.100s\n", c->buf);
    reasons[why]++;
    c->state = FAILED;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
}

/* Returns 1 when the socket left the handshake window (done or failed). */
static int step(conn_t *c, int i, uint32_t events) {
    if (c->state == CONNECTING) {
        if (!(events & EPOLLOUT)) return 0;
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err) { fail(c, 0); return 1; }
        char req[1024];
        int n = snprintf(req, sizeof req,
                         "GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                         "Authorization: Bearer %s\r\n\r\n", host_header, tokens[i]);
        if (write(c->fd, req, n) != n) { fail(c, 1); return 1; }
        c->state = WAIT_101;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
        return 0;
    }
    if (!(events & (EPOLLIN | EPOLLERR | EPOLLHUP))) return 0;
    int n = read(c->fd, c->buf + c->len, sizeof c->buf - 1 - c->len);
    if (n <= 0) {
        if (n < 0 && errno == EAGAIN) return 0;
        fail(c, 2);
        return 1;
    }
    c->len += n;
    c->buf[c->len] = 0;
    if (c->state == WAIT_101) {
        char *end = strstr(c->buf, "\r\n\r\n");
        if (!end) return 0;
        if (strncmp(c->buf + 9, "101", 3) != 0) { fail(c, 3); return 1; }
        c->handshake = now() - c->started;
        int rest = c->len - (int)(end + 4 - c->buf);
        memmove(c->buf, end + 4, rest);
        c->len = rest;
        if (write(c->fd, sub_frame, sub_len) != sub_len) { fail(c, 1); return 1; }
        c->state = WAIT_REPLY;
    }
    while (c->state == WAIT_REPLY && c->len >= 2) {
        /* Unmasked frames from the server: a ping may come first; the reply is a short text frame. */
        int plen = c->buf[1] & 0x7f, off = 2;
        if (plen == 126) { if (c->len < 4) return 0; plen = ((unsigned char)c->buf[2] << 8) | (unsigned char)c->buf[3]; off = 4; }
        if (plen > (int)sizeof c->buf - 8) { fail(c, 3); return 1; }
        if (c->len < off + plen) return 0;
        if ((c->buf[0] & 0x0f) != 1) {  /* not text: skip it */
            memmove(c->buf, c->buf + off + plen, c->len - off - plen);
            c->len -= off + plen;
            continue;
        }
        c->buf[off + plen] = 0;
        if (!strstr(c->buf + off, "\"ok\":true")) { fail(c, 3); return 1; }
        c->subscribed = now() - c->started;
        c->state = DONE;
        c->len = 0;
        struct epoll_event ev = {.events = 0, .data.ptr = c};  /* held, not read */
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
        return 1;
    }
    return 0;
}

static void build_sub(const char *channel) {
    char payload[200];
    int n = snprintf(payload, sizeof payload, "{\"op\":\"sub\",\"id\":1,\"ch\":\"%s\"}", channel);
    unsigned char mask[4] = {0x12, 0x34, 0x56, 0x78};
    sub_frame[0] = (char)0x81;
    sub_frame[1] = (char)(0x80 | n);
    memcpy(sub_frame + 2, mask, 4);
    for (int i = 0; i < n; i++) sub_frame[6 + i] = payload[i] ^ mask[i % 4];
    sub_len = 6 + n;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s HOST PORT N WINDOW TOKENS CHANNEL\n", argv[0]);
        return 2;
    }
    int n = atoi(argv[3]), window = atoi(argv[4]);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    addr.sin_family = AF_INET;
    addr.sin_port = htons(atoi(argv[2]));
    inet_pton(AF_INET, argv[1], &addr.sin_addr);
    static char hh[128];
    snprintf(hh, sizeof hh, "%s:%s", argv[1], argv[2]);
    host_header = hh;
    build_sub(argv[6]);
    tokens = calloc(n, sizeof *tokens);
    FILE *f = fopen(argv[5], "r");
    if (!f) { perror("tokens"); return 2; }
    size_t cap = 0;
    for (int i = 0; i < n; i++) {
        char *line = NULL;
        if (getline(&line, &cap, f) < 0) { fprintf(stderr, "too few tokens\n"); return 2; }
        line[strcspn(line, "\r\n")] = 0;
        tokens[i] = line;
        cap = 0;
    }
    fclose(f);
    conn_t *conns = calloc(n, sizeof *conns);
    epfd = epoll_create1(0);
    struct epoll_event *events = calloc(window + 16, sizeof *events);
    int next = 0, inflight = 0, finished = 0;
    double t0 = now();
    while (finished < n) {
        while (inflight < window && next < n) {
            if (start(&conns[next]) < 0) { conns[next].state = FAILED; reasons[0]++; finished++; }
            else inflight++;
            next++;
        }
        int k = epoll_wait(epfd, events, window + 16, 10000);
        if (k == 0) break;  /* 10 s without progress: give up on the rest */
        for (int j = 0; j < k; j++) {
            conn_t *c = events[j].data.ptr;
            if (step(c, (int)(c - conns), events[j].events)) {
                inflight--;
                finished++;
            }
        }
    }
    double seconds = now() - t0;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    double *hs = calloc(n, sizeof *hs), *sub = calloc(n, sizeof *sub);
    int ok = 0;
    for (int i = 0; i < n; i++)
        if (conns[i].state == DONE) { hs[ok] = conns[i].handshake; sub[ok] = conns[i].subscribed; ok++; }
    qsort(hs, ok, sizeof *hs, cmp);
    qsort(sub, ok, sizeof *sub, cmp);
    printf("{\"sockets\": %d, \"subscribed\": %d, \"failed\": %d, \"seconds\": %.4f, \"client_cpu_seconds\": %.4f, "
           "\"handshake_p50_ms\": %.2f, \"handshake_p99_ms\": %.2f, \"handshake_max_ms\": %.2f, "
           "\"subscribed_p50_ms\": %.2f, \"subscribed_p99_ms\": %.2f, "
           "\"failures\": {\"connect\": %d, \"write\": %d, \"closed\": %d, \"refused\": %d}}\n",
           n, ok, n - ok, seconds, cpu, quantile(hs, ok, .5) * 1e3, quantile(hs, ok, .99) * 1e3,
           ok ? hs[ok - 1] * 1e3 : 0.0, quantile(sub, ok, .5) * 1e3, quantile(sub, ok, .99) * 1e3,
           reasons[0], reasons[1], reasons[2], reasons[3]);
    fflush(stdout);
    char c;
    while (read(0, &c, 1) > 0) {}
    return 0;
}
