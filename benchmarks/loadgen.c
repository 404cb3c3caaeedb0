/*
 * A WebSocket load generator for the benchmark suite: one thread, epoll, non-blocking sockets.
 *
 * Built by benchmarks/run.py with the system compiler (cc -O2). Modes:
 *
 *   echo      CONNS connections, DEPTH messages in flight on each; each reply triggers the next
 *             message. Reports messages/s and p50/p99 round-trip latency over DURATION seconds.
 *   churn     PARALLEL connections at a time: connect, handshake, send a close frame, wait for the
 *             server to close, repeat. Reports handshakes/s over DURATION seconds.
 *   idle      open CONNS connections, print "ready", then hold them until stdin closes.
 *   broadcast CONNS listening connections plus one control connection that sends "go:COUNT:SIZE";
 *             the server then broadcasts COUNT messages to everyone. Reports the time until every
 *             listener has received all of them, and deliveries/s. With --one-at-a-time the control
 *             connection sends "go:1:SIZE" COUNT times, each once every listener has received the
 *             previous message; p50/p99 are the times until everyone had one message.
 *
 * In broadcast mode the listeners are watched edge-triggered and read once per wake-up when the read
 * comes back short (the socket is drained; the next message is a new edge): one recv per delivery
 * instead of two (the second answered EAGAIN) and no re-poll of every ready socket by epoll, which
 * took the generator from 7.1 to 5.9 us of CPU per delivery against two cluster nodes (perf stat,
 * 200 rounds to 2,000 listeners); what is left is mostly the kernel sending TCP's ACK at each read.
 *
 * With --raw there is no WebSocket handshake: the client sends frames to a plain TCP echo server,
 * which returns them as they are (still masked); this is the baseline that shows the generator is
 * not the bottleneck.
 *
 * Output: one line of key=value pairs on stdout.
 *
 * Usage: loadgen MODE PORT [--conns N] [--depth N] [--size BYTES] [--duration S] [--parallel N]
 *                          [--count N] [--raw] [--binary] [--one-at-a-time]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF 262144
#define MAX_SAMPLES 2000000

enum state { CONNECTING, HANDSHAKING, OPEN, CLOSING };

struct conn {
    int fd;
    enum state state;
    unsigned char *in;
    size_t in_len;
    int inflight;
    double *sent_at; /* ring of send times, DEPTH long */
    int head, tail;
    long received;
    int control;
};

static const char *mode;
static int port, conns = 100, depth = 1, size = 64, parallel = 50, count = 100, raw = 0, binary = 0, one_at_a_time = 0;
static double duration = 5.0;
static int ep;
static unsigned char *message_frame;
static size_t message_frame_len;
static double *samples;
static long nsamples;
static long completed;
static int measuring;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static unsigned char *client_frame(int opcode, const unsigned char *payload, size_t len, size_t *out_len) {
    /* A masked client frame with the all-zero masking key: the payload is sent as is. */
    unsigned char *frame = malloc(len + 14);
    size_t n = 0;
    frame[n++] = 0x80 | opcode;
    if (len < 126) {
        frame[n++] = 0x80 | len;
    } else if (len < 65536) {
        frame[n++] = 0x80 | 126;
        frame[n++] = len >> 8;
        frame[n++] = len & 0xff;
    } else {
        frame[n++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--) frame[n++] = (len >> (8 * i)) & 0xff;
    }
    memset(frame + n, 0, 4);
    n += 4;
    memcpy(frame + n, payload, len);
    *out_len = n + len;
    return frame;
}

static void send_all(int fd, const unsigned char *data, size_t len) {
    while (len) {
        ssize_t w = send(fd, data, len, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) { /* the server does not read: wait, but not forever */
                struct pollfd p = {.fd = fd, .events = POLLOUT};
                if (poll(&p, 1, 10000) <= 0) {
                    fprintf(stderr, "the server stopped reading\n");
                    exit(3);
                }
                continue;
            }
            return;
        }
        data += w;
        len -= w;
    }
}

static const char handshake[] =
    "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

static void open_conn(struct conn *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) die("socket");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) die("connect");
    c->state = CONNECTING;
    c->in_len = 0;
    c->inflight = 0;
    c->head = c->tail = 0;
    c->received = 0;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
}

static void close_conn(struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
}

static void send_message(struct conn *c) {
    send_all(c->fd, message_frame, message_frame_len);
    c->sent_at[c->tail] = now();
    c->tail = (c->tail + 1) % depth;
    c->inflight++;
}

static int opened; /* connections whose handshake completed */

static void on_open(struct conn *c) {
    c->state = OPEN;
    opened++;
    if (!strcmp(mode, "echo")) {
        for (int i = 0; i < depth; i++) send_message(c);
    } else if (!strcmp(mode, "churn")) {
        static const unsigned char code[2] = {0x03, 0xe8};
        size_t n;
        unsigned char *frame = client_frame(0x8, code, 2, &n);
        send_all(c->fd, frame, n);
        free(frame);
        c->state = CLOSING;
        completed += measuring;
    }
}

/* Parse complete frames from c->in; returns the number of complete data messages. */
static long parse_frames(struct conn *c, int *closed) {
    long messages = 0;
    size_t pos = 0;
    while (c->in_len - pos >= 2) {
        unsigned char *p = c->in + pos;
        int fin = p[0] & 0x80, opcode = p[0] & 0x0f, masked = p[1] & 0x80;
        uint64_t len = p[1] & 0x7f;
        size_t header = 2;
        if (len == 126) {
            if (c->in_len - pos < 4) break;
            len = (p[2] << 8) | p[3];
            header = 4;
        } else if (len == 127) {
            if (c->in_len - pos < 10) break;
            len = 0;
            for (int i = 0; i < 8; i++) len = (len << 8) | p[2 + i];
            header = 10;
        }
        if (masked) header += 4;
        if (c->in_len - pos < header + len) break;
        if (opcode == 0x9 && !masked && !raw) {
            /* A keepalive ping from the server: answer it, or a run longer than the server's
               ping interval plus its ping timeout would see its connections dropped. */
            size_t n;
            unsigned char *pong = client_frame(0xA, p + header, len, &n);
            send_all(c->fd, pong, n);
            free(pong);
        }
        pos += header + len;
        if (opcode == 0x8) *closed = 1;
        else if (fin && opcode != 0x9 && opcode != 0xA) messages++;
    }
    memmove(c->in, c->in + pos, c->in_len - pos);
    c->in_len -= pos;
    return messages;
}

static long total_received;

static int edge_triggered; /* broadcast mode: see the comment at the top */

static void on_readable(struct conn *c) {
    for (int drained = 0; !drained;) {
        if (c->in_len == BUF) {
            fprintf(stderr, "frame larger than the buffer\n");
            exit(2);
        }
        size_t space = BUF - c->in_len;
        ssize_t r = recv(c->fd, c->in + c->in_len, space, 0);
        if (r < 0) {
            if (errno == EAGAIN) return;
            r = 0;
        }
        drained = edge_triggered && (size_t)r < space;
        if (r == 0) { /* the server closed */
            if (!strcmp(mode, "churn")) {
                close_conn(c);
                open_conn(c);
                return;
            }
            fprintf(stderr, "server closed a connection (state %d)\n", c->state);
            exit(3);
        }
        c->in_len += r;
        if (c->state == HANDSHAKING) {
            unsigned char *end = memmem(c->in, c->in_len, "\r\n\r\n", 4);
            if (!end) {
                if (drained) return;
                continue;
            }
            if (memcmp(c->in, "HTTP/1.1 101", 12)) {
                fprintf(stderr, "handshake refused: %.40s\n", c->in);
                exit(3);
            }
            size_t head = end + 4 - c->in;
            memmove(c->in, c->in + head, c->in_len - head);
            c->in_len -= head;
            on_open(c);
        }
        int closed = 0;
        long messages = parse_frames(c, &closed);
        if (closed && !strcmp(mode, "churn")) {
            close_conn(c);
            open_conn(c);
            return;
        }
        c->received += messages;
        total_received += messages;
        if (!strcmp(mode, "echo")) {
            double t = now();
            for (long i = 0; i < messages; i++) {
                double rtt = t - c->sent_at[c->head];
                c->head = (c->head + 1) % depth;
                c->inflight--;
                if (measuring) {
                    completed++;
                    if (nsamples < MAX_SAMPLES) samples[nsamples++] = rtt;
                }
                send_message(c);
            }
        }
    }
}

static void on_writable(struct conn *c) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        errno = err;
        die("connect (async)");
    }
    struct epoll_event ev = {.events = EPOLLIN | (edge_triggered ? EPOLLET : 0), .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    if (raw) {
        on_open(c);
    } else {
        c->state = HANDSHAKING;
        send_all(c->fd, (const unsigned char *)handshake, sizeof handshake - 1);
    }
}

static void poll_once(int timeout_ms) {
    struct epoll_event events[512];
    int n = epoll_wait(ep, events, 512, timeout_ms);
    for (int i = 0; i < n; i++) {
        struct conn *c = events[i].data.ptr;
        if (c->fd < 0) continue;
        if (c->state == CONNECTING && (events[i].events & EPOLLOUT)) on_writable(c);
        else if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(c);
    }
}

static int compare(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: loadgen MODE PORT [options]\n");
        return 2;
    }
    mode = argv[1];
    port = atoi(argv[2]);
    for (int i = 3; i < argc; i++) {
        if (!strcmp(argv[i], "--raw")) raw = 1;
        else if (!strcmp(argv[i], "--binary")) binary = 1;
        else if (!strcmp(argv[i], "--one-at-a-time")) one_at_a_time = 1;
        else if (i + 1 < argc) {
            const char *v = argv[++i];
            if (!strcmp(argv[i - 1], "--conns")) conns = atoi(v);
            else if (!strcmp(argv[i - 1], "--depth")) depth = atoi(v);
            else if (!strcmp(argv[i - 1], "--size")) size = atoi(v);
            else if (!strcmp(argv[i - 1], "--duration")) duration = atof(v);
            else if (!strcmp(argv[i - 1], "--parallel")) parallel = atoi(v);
            else if (!strcmp(argv[i - 1], "--count")) count = atoi(v);
            else {
                fprintf(stderr, "unknown option %s\n", argv[i - 1]);
                return 2;
            }
        }
    }
    edge_triggered = !strcmp(mode, "broadcast");
    ep = epoll_create1(0);
    unsigned char *payload = malloc(size);
    for (int i = 0; i < size; i++) payload[i] = 'a' + i % 26;
    message_frame = client_frame(binary ? 0x2 : 0x1, payload, size, &message_frame_len);
    samples = malloc(sizeof(double) * MAX_SAMPLES);

    int total = !strcmp(mode, "churn") ? parallel : conns + (!strcmp(mode, "broadcast") ? 1 : 0);
    struct conn *cs = calloc(total, sizeof *cs);
    for (int i = 0; i < total; i++) {
        cs[i].in = malloc(BUF);
        cs[i].sent_at = malloc(sizeof(double) * (depth > 0 ? depth : 1));
        open_conn(&cs[i]);
    }

    if (!strcmp(mode, "echo") || !strcmp(mode, "churn")) {
        double start = now(), warm = start + (duration > 2 ? 1.0 : duration / 4);
        while (now() < warm) poll_once(10);
        measuring = 1;
        completed = 0;
        double begin = now();
        while (now() - begin < duration) poll_once(10);
        double elapsed = now() - begin;
        if (!strcmp(mode, "echo")) {
            qsort(samples, nsamples, sizeof(double), compare);
            double p50 = nsamples ? samples[nsamples / 2] : 0, p99 = nsamples ? samples[nsamples * 99 / 100] : 0;
            printf("rate=%.1f p50_ms=%.3f p99_ms=%.3f messages=%ld seconds=%.3f\n", completed / elapsed,
                   p50 * 1e3, p99 * 1e3, completed, elapsed);
        } else {
            printf("rate=%.1f handshakes=%ld seconds=%.3f\n", completed / elapsed, completed, elapsed);
        }
        return 0;
    }
    if (!strcmp(mode, "idle")) {
        double deadline = now() + 120;
        while (opened < conns && now() < deadline) poll_once(10);
        printf("ready opened=%d\n", opened);
        fflush(stdout);
        char buf[16];
        while (read(0, buf, sizeof buf) > 0) {
        }
        return 0;
    }
    if (!strcmp(mode, "broadcast")) {
        double deadline = now() + 120;
        while (opened < total && now() < deadline) poll_once(10);
        if (opened < total) {
            fprintf(stderr, "only %d of %d connections opened\n", opened, total);
            return 3;
        }
        struct conn *control = &cs[conns];
        char command[64];
        int n = snprintf(command, sizeof command, "go:%d:%d", one_at_a_time ? 1 : count, size);
        size_t len;
        unsigned char *frame = client_frame(0x1, (unsigned char *)command, n, &len);
        long expected = (long)count * (conns + 1);
        double begin = now();
        if (one_at_a_time) {
            /* One message at a time: the next only once every listener has the previous one. */
            double *rounds = calloc(count, sizeof(double));
            for (int i = 0; i < count && now() - begin < 60; i++) {
                double start = now();
                send_all(control->fd, frame, len);
                long target = (long)(i + 1) * (conns + 1);
                while (total_received < target && now() - begin < 60) poll_once(10);
                rounds[i] = (now() - start) * 1000.0;
            }
            double elapsed = now() - begin;
            qsort(rounds, count, sizeof(double), compare);
            printf("rate=%.1f p50_ms=%.3f p99_ms=%.3f deliveries=%ld expected=%ld seconds=%.4f\n",
                   total_received / elapsed, rounds[count / 2], rounds[(count * 99) / 100], total_received,
                   expected, elapsed);
            return total_received < expected ? 4 : 0;
        }
        send_all(control->fd, frame, len);
        while (total_received < expected && now() - begin < 60) poll_once(10);
        double elapsed = now() - begin;
        printf("rate=%.1f deliveries=%ld expected=%ld seconds=%.4f\n", total_received / elapsed, total_received,
               expected, elapsed);
        return total_received < expected ? 4 : 0;
    }
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
}
