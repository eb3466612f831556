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
 * With two more arguments it is a receiver (bench/fanout.py's `-c` scenarios):
 *
 *   connclient HOST PORT N WINDOW TOKENS CHANNEL MESSAGES QUIET [SOURCE]
 *
 * (SOURCE: the local address to connect from, e.g. 127.0.0.2: one address has
 * about 28,000 ephemeral ports towards one server port, so 39,000 sockets
 * need two clients with two addresses.)
 * After the connect line it reads every socket and counts the publications
 * the caller sends to CHANNEL, each `{"s": seq, "t": wall-clock send time, ...}`
 * as gateway.loadtest publishes them (s from 0 to MESSAGES-1). Per socket it
 * checks the sequence (a gap is lost, a repeat a duplicate); per publication
 * it keeps how many sockets got it and the wall-clock (CLOCK_REALTIME, the
 * publisher's clock on this machine) time of its first and last arrival; per
 * delivery the latency. It stops when every socket has every publication, when
 * nothing arrived for QUIET seconds after the first delivery (120 s before
 * it), or when its standard input closes, then prints a second JSON line with
 * its own CPU seconds over the receiving phase, and exits. Pings are answered.
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
#include <signal.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { CONNECTING, WAIT_101, WAIT_REPLY, DONE, FAILED };

typedef struct {
    int fd, state, len;
    double started, handshake, subscribed;
    char buf[512];
} conn_t;

static double wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

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
static struct sockaddr_in addr, source;
static const char *host_header;
static char sub_frame[256];
static int sub_len;
static int epfd;
static int receiving;  /* the receiver mode: subscribed sockets are read from the start */
static int drain(conn_t *conns, int i);
static void setup_receiver(int n, int m);

static int start(conn_t *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) return -1;
    c->started = now();
    c->state = CONNECTING;
    c->len = 0;
    int one = 1;  /* the port is chosen at connect(), per destination: TIME_WAITs of earlier runs don't hold it */
    if (source.sin_family) setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    if (source.sin_family && bind(c->fd, (struct sockaddr *)&source, sizeof source) < 0) {
        close(c->fd);
        return -1;
    }
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
        /* Held, not read; a receiver reads it (and answers pings) from now on. */
        struct epoll_event ev = {.events = receiving ? EPOLLIN : 0, .data.ptr = c};
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

/* ---- The receiver: counts deliveries per socket and per publication. ---- */

typedef struct {
    int count;
    double t, first, last;
} pub_t;

static pub_t *pubs;
static int messages;
static int *next_seq;            /* per socket: the next sequence number expected */
static long deliveries, lost, duplicates, other_frames, closed_sockets, complete_sockets;
static float *latencies;         /* ms, one per delivery, up to lat_cap */
static long lat_n, lat_cap;
static double last_arrival;

static void pong(conn_t *c, const char *payload, int len) {
    char frame[6 + 125];
    unsigned char mask[4] = {0x9a, 0xbc, 0xde, 0xf0};
    frame[0] = (char)0x8a;
    frame[1] = (char)(0x80 | len);
    memcpy(frame + 2, mask, 4);
    for (int i = 0; i < len; i++) frame[6 + i] = payload[i] ^ mask[i % 4];
    if (write(c->fd, frame, 6 + len) < 0) {}  /* a lost pong shows as a closed socket */
}

/* One text frame's payload (NUL-terminated): a push of a publication, or something else. */
static void delivered(int i, char *text, double at) {
    char *data = strstr(text, "\"data\":");
    char *sp = data ? strstr(data, "\"s\":") : NULL;
    char *tp = data ? strstr(data, "\"t\":") : NULL;
    if (!sp || !tp) { other_frames++; return; }
    long seq = strtol(sp + 4, NULL, 10);
    double t = strtod(tp + 4, NULL);
    if (seq < 0 || seq >= messages) { other_frames++; return; }
    if (seq < next_seq[i]) { duplicates++; return; }
    lost += seq - next_seq[i];
    next_seq[i] = (int)seq + 1;
    if (next_seq[i] == messages) complete_sockets++;
    deliveries++;
    pub_t *p = &pubs[seq];
    if (p->count++ == 0) { p->t = t; p->first = at; }
    if (at > p->last) p->last = at;
    if (lat_n < lat_cap) latencies[lat_n++] = (float)((at - t) * 1e3);
    last_arrival = at;
}

/* Reads what socket i has; returns 0, or -1 once it is closed. */
static int drain(conn_t *conns, int i) {
    static char big[65536 + 512];
    conn_t *c = &conns[i];
    memcpy(big, c->buf, c->len);
    int have = c->len;
    int n = read(c->fd, big + have, sizeof big - 1 - have);
    if (n <= 0) {
        if (n < 0 && errno == EAGAIN) return 0;
        return -1;
    }
    have += n;
    double at = wall();
    int off = 0;
    while (have - off >= 2) {
        unsigned char b0 = big[off], b1 = big[off + 1];
        long plen = b1 & 0x7f;
        int head = 2;
        if (plen == 126) {
            if (have - off < 4) break;
            plen = ((unsigned char)big[off + 2] << 8) | (unsigned char)big[off + 3];
            head = 4;
        } else if (plen == 127) {
            return -1;  /* no publication here is that large */
        }
        if (head + plen > (long)sizeof big - 513) return -1;
        if (have - off < head + plen) break;
        char *payload = big + off + head;
        int op = b0 & 0x0f;
        if (op == 1) {
            char keep = payload[plen];
            payload[plen] = 0;
            delivered(i, payload, at);
            payload[plen] = keep;
        } else if (op == 9) {
            pong(c, payload, (int)plen);
        } else if (op == 8) {
            return -1;
        } else {
            other_frames++;
        }
        off += head + (int)plen;
    }
    if (have - off > (int)sizeof c->buf) {
        /* A frame larger than a socket's carry-over buffer: keep reading it in place next time
         * would need a bigger buffer; no push of this benchmark is that large. */
        return -1;
    }
    memmove(c->buf, big + off, have - off);
    c->len = have - off;
    return 0;
}

static int cmpf(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static void setup_receiver(int n, int m) {
    receiving = 1;
    messages = m;
    pubs = calloc(m, sizeof *pubs);
    next_seq = calloc(n, sizeof *next_seq);
    lat_cap = (long)n * m < 20000000L ? (long)n * m : 20000000L;
    latencies = malloc((lat_cap ? lat_cap : 1) * sizeof *latencies);
}

static int receive(conn_t *conns, int n, int m, double quiet) {
    int live = 0;
    for (int i = 0; i < n; i++) {
        if (conns[i].state != DONE && conns[i].state != FAILED) {
            /* Still handshaking when the connect phase gave up: counted as failed there. */
            epoll_ctl(epfd, EPOLL_CTL_DEL, conns[i].fd, NULL);
            close(conns[i].fd);
            conns[i].state = FAILED;
        }
        if (conns[i].state != DONE) continue;
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)i};
        epoll_ctl(epfd, EPOLL_CTL_MOD, conns[i].fd, &ev);
        live++;
    }
    struct epoll_event in = {.events = EPOLLIN, .data.u64 = (uint64_t)-1};
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &in);
    struct epoll_event *events = calloc(4096, sizeof *events);
    double cpu0 = cpu_seconds(), started = now(), last_progress = started;
    int stdin_open = 1;
    while (stdin_open && complete_sockets < live) {
        int k = epoll_wait(epfd, events, 4096, 100);
        double t = now();
        for (int j = 0; j < k; j++) {
            uint64_t i = events[j].data.u64;
            if (i == (uint64_t)-1) {
                char ch;
                if (read(0, &ch, 1) <= 0) stdin_open = 0;
                continue;
            }
            long before = deliveries;
            if (drain(conns, (int)i) < 0) {
                closed_sockets++;
                live--;
                if (next_seq[i] == m) complete_sockets--;
                conns[i].state = FAILED;
                epoll_ctl(epfd, EPOLL_CTL_DEL, conns[i].fd, NULL);
                close(conns[i].fd);
            }
            if (deliveries != before) last_progress = t;
        }
        double limit = deliveries ? quiet : 120.0;
        if (t - last_progress > limit) break;
    }
    double cpu = cpu_seconds() - cpu0;
    for (int i = 0; i < n; i++)
        if (conns[i].state == DONE) lost += m - next_seq[i];
    qsort(latencies, lat_n, sizeof *latencies, cmpf);
    printf("{\"deliveries\": %ld, \"lost\": %ld, \"duplicates\": %ld, \"other_frames\": %ld, "
           "\"closed\": %ld, \"sockets\": %d, \"client_cpu_seconds\": %.4f, \"last_arrival\": %.6f, "
           "\"latency_p50_ms\": %.2f, \"latency_p99_ms\": %.2f, \"latency_max_ms\": %.2f, \"pubs\": [",
           deliveries, lost, duplicates, other_frames, closed_sockets, live, cpu, last_arrival,
           lat_n ? latencies[lat_n / 2] : 0.0, lat_n ? latencies[(long)(.99 * (lat_n - 1))] : 0.0,
           lat_n ? latencies[lat_n - 1] : 0.0);
    for (int s = 0; s < m; s++)
        printf("%s{\"s\": %d, \"n\": %d, \"t\": %.6f, \"first\": %.6f, \"last\": %.6f}", s ? ", " : "", s,
               pubs[s].count, pubs[s].t, pubs[s].first, pubs[s].last);
    printf("]}\n");
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 7 || argc == 8 || argc > 10) {
        fprintf(stderr, "usage: %s HOST PORT N WINDOW TOKENS CHANNEL [MESSAGES QUIET [SOURCE]]\n", argv[0]);
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
    if (argc == 10) {
        source.sin_family = AF_INET;
        if (inet_pton(AF_INET, argv[9], &source.sin_addr) != 1) { fprintf(stderr, "bad SOURCE\n"); return 2; }
    }
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
    signal(SIGPIPE, SIG_IGN);  /* a write to a socket the server closed fails with EPIPE instead */
    if (argc >= 9) setup_receiver(n, atoi(argv[7]));
    epfd = epoll_create1(0);
    struct epoll_event *events = calloc(window + 1024, sizeof *events);
    int next = 0, inflight = 0, finished = 0;
    double t0 = now();
    while (finished < n) {
        while (inflight < window && next < n) {
            if (start(&conns[next]) < 0) { conns[next].state = FAILED; reasons[0]++; finished++; }
            else inflight++;
            next++;
        }
        int k = epoll_wait(epfd, events, window + 1024, 10000);
        if (k == 0) break;  /* 10 s without progress: give up on the rest */
        for (int j = 0; j < k; j++) {
            conn_t *c = events[j].data.ptr;
            if (c->state == DONE) {  /* a receiver's subscribed socket */
                if (drain(conns, (int)(c - conns)) < 0) {
                    reasons[2]++;
                    c->state = FAILED;
                    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
                    close(c->fd);
                }
                continue;
            }
            if (step(c, (int)(c - conns), events[j].events)) {
                inflight--;
                finished++;
            }
        }
    }
    double seconds = now() - t0;
    double cpu = cpu_seconds();
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
    if (argc >= 9) return receive(conns, n, atoi(argv[7]), atof(argv[8]));
    char c;
    while (read(0, &c, 1) > 0) {}
    return 0;
}
