/*
 * A minimal WebSocket server in C (epoll, one thread): the benchmark's ceiling for the WebSocket
 * scenarios, as echoserver.c is for raw TCP. It serves what benchmarks/servers.py serves (text
 * echoed as text, binary as binary, "go:COUNT:SIZE" broadcasts COUNT text messages of SIZE bytes
 * to every open connection) with nothing a real server needs: no limits, no timeouts, no
 * validation beyond what the load generator sends, no fragmented messages (a frame without FIN
 * closes the connection). It shows how fast the generator, the kernel and the loopback go when the
 * server costs next to nothing, so that a ratio near it is read as the machine's limit, not the
 * server's.
 *
 * A broadcast frame is built once; a burst of COUNT frames is sent to each connection in one send,
 * as pywsserver gathers a burst, and the replies to one read go out in one send, as the servers'
 * do. A send that is short keeps the rest for when the socket is writable. It validates nothing
 * the servers must (UTF-8 of text, the request's headers), which for the benchmark's 64-byte
 * messages is a small part of their work.
 *
 * Usage: wsceiling PORT   (prints "ready PORT" once listening; PORT 0 picks one)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_FD 131072
#define READ_CHUNK 262144

/* ------------------------------------------------------------------ SHA-1 (FIPS 180-4), base64 */

static uint32_t rol(uint32_t value, int bits) { return (value << bits) | (value >> (32 - bits)); }

static void sha1_block(uint32_t h[5], const unsigned char *block) {
    uint32_t w[80], a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)block[4 * i] << 24 | (uint32_t)block[4 * i + 1] << 16 | (uint32_t)block[4 * i + 2] << 8 |
               block[4 * i + 3];
    for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) f = (b & c) | (~b & d), k = 0x5A827999;
        else if (i < 40) f = b ^ c ^ d, k = 0x6ED9EBA1;
        else if (i < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDC;
        else f = b ^ c ^ d, k = 0xCA62C1D6;
        uint32_t t = rol(a, 5) + f + e + k + w[i];
        e = d, d = c, c = rol(b, 30), b = a, a = t;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
}

static void sha1(const unsigned char *data, size_t len, unsigned char out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    unsigned char block[64];
    size_t i = 0;
    for (; i + 64 <= len; i += 64) sha1_block(h, data + i);
    size_t rest = len - i;
    memset(block, 0, 64);
    memcpy(block, data + i, rest);
    block[rest] = 0x80;
    if (rest >= 56) {
        sha1_block(h, block);
        memset(block, 0, 64);
    }
    uint64_t bits = (uint64_t)len * 8;
    for (int j = 0; j < 8; j++) block[63 - j] = (unsigned char)(bits >> (8 * j));
    sha1_block(h, block);
    for (int j = 0; j < 5; j++)
        for (int k = 0; k < 4; k++) out[4 * j + k] = (unsigned char)(h[j] >> (24 - 8 * k));
}

static size_t base64(const unsigned char *in, size_t len, char *out) {
    static const char digits[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < len ? (uint32_t)in[i + 1] << 8 : 0) | (i + 2 < len ? in[i + 2] : 0);
        out[o++] = digits[v >> 18 & 63];
        out[o++] = digits[v >> 12 & 63];
        out[o++] = i + 1 < len ? digits[v >> 6 & 63] : '=';
        out[o++] = i + 2 < len ? digits[v & 63] : '=';
    }
    return o;
}

/* ------------------------------------------------------------------ connections */

struct conn {
    int fd, open, closing, dead, member; /* member: index in members, or -1 */
    int gathering, writing;              /* replies gathered during a read; EPOLLOUT armed */
    unsigned char *in;
    size_t in_len, in_cap;
    unsigned char *out;
    size_t out_len, out_cap;
};

static struct conn *conns[MAX_FD];
static int members[MAX_FD], nmembers;
static int ep;

static void grow(unsigned char **buf, size_t *cap, size_t need) {
    if (need <= *cap) return;
    size_t cap2 = *cap ? *cap : 4096;
    while (cap2 < need) cap2 *= 2;
    *buf = realloc(*buf, cap2);
    if (*buf == NULL) {
        perror("realloc");
        exit(2);
    }
    *cap = cap2;
}

static void leave(struct conn *c) {
    if (c->member >= 0) { /* the last member takes its place */
        int last = members[--nmembers];
        members[c->member] = last;
        conns[last]->member = c->member;
        c->member = -1;
    }
}

static void close_conn(struct conn *c) {
    leave(c);
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    conns[c->fd] = NULL;
    free(c->in);
    free(c->out);
    free(c);
}

/* Read interest unless the connection is closing; write interest while output waits. */
static void watch(struct conn *c, int writing) {
    struct epoll_event ev = {.events = (c->closing ? 0 : EPOLLIN) | (writing ? EPOLLOUT : 0), .data.fd = c->fd};
    c->writing = writing;
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Send what waits in c->out; arm or disarm write interest as what is left says. */
static void send_out(struct conn *c) {
    ssize_t n = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL);
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            c->dead = 1, c->out_len = 0; /* closed when its read sees the end */
            if (c->writing) watch(c, 0);
            return;
        }
        n = 0;
    }
    memmove(c->out, c->out + n, c->out_len - (size_t)n);
    c->out_len -= (size_t)n;
    if (c->out_len && !c->writing) watch(c, 1);
    else if (!c->out_len && c->writing) watch(c, 0);
}

/* Output for c: sent now when nothing waits and no read is being answered (a broadcast to another
 * connection), else kept, for one send of everything a read produced (as the servers do). */
static void queue(struct conn *c, const unsigned char *data, size_t len) {
    if (c->dead) return;
    if (c->out_len == 0 && !c->gathering) {
        ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
        if (n == (ssize_t)len) return;
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                c->dead = 1; /* closed when its read sees the end */
                return;
            }
            n = 0;
        }
        data += n, len -= (size_t)n;
    }
    grow(&c->out, &c->out_cap, c->out_len + len);
    memcpy(c->out + c->out_len, data, len);
    c->out_len += len;
    if (!c->gathering && !c->writing) watch(c, 1);
}

static size_t frame_header(unsigned char *h, int opcode, size_t len) {
    h[0] = (unsigned char)(0x80 | opcode);
    if (len < 126) {
        h[1] = (unsigned char)len;
        return 2;
    }
    if (len < 65536) {
        h[1] = 126, h[2] = (unsigned char)(len >> 8), h[3] = (unsigned char)len;
        return 4;
    }
    h[1] = 127;
    for (int i = 0; i < 8; i++) h[2 + i] = (unsigned char)((uint64_t)len >> (56 - 8 * i));
    return 10;
}

static void reply(struct conn *c, int opcode, const unsigned char *payload, size_t len) {
    static unsigned char *buf;
    static size_t cap;
    grow(&buf, &cap, len + 10);
    size_t h = frame_header(buf, opcode, len);
    memcpy(buf + h, payload, len);
    queue(c, buf, h + len);
}

/* COUNT text frames of SIZE bytes to every member: built once, one send per member. */
static void broadcast(int count, int size) {
    static unsigned char *buf;
    static size_t cap;
    unsigned char h[10];
    size_t hl = frame_header(h, 1, (size_t)size), one = hl + (size_t)size;
    if (size > (1 << 24) || count > 100000 || one * (size_t)count > ((size_t)1 << 28)) return; /* not the benchmark's */
    grow(&buf, &cap, one * (size_t)count);
    for (int i = 0; i < count; i++) {
        memcpy(buf + i * one, h, hl);
        memset(buf + i * one + hl, 'b', (size_t)size);
    }
    for (int i = 0; i < nmembers; i++) queue(conns[members[i]], buf, one * (size_t)count);
}

static const char GUID[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/* The request head in buf[0:end]: the 101 answer. 0, or -1 to close. */
static int upgrade(struct conn *c, unsigned char *buf, size_t end) {
    char *head = (char *)buf, *key = NULL;
    size_t key_len = 0;
    for (char *line = head; line < head + end;) {
        char *eol = memchr(line, '\n', (size_t)(head + end - line));
        if (eol == NULL) break;
        if (strncasecmp(line, "Sec-WebSocket-Key:", 18) == 0) {
            key = line + 18;
            while (*key == ' ') key++;
            key_len = (size_t)(eol - key);
            while (key_len && (key[key_len - 1] == '\r' || key[key_len - 1] == ' ')) key_len--;
        }
        line = eol + 1;
    }
    if (key == NULL || key_len > 64) return -1;
    unsigned char joined[128], digest[20];
    memcpy(joined, key, key_len);
    memcpy(joined + key_len, GUID, sizeof GUID - 1);
    sha1(joined, key_len + sizeof GUID - 1, digest);
    char answer[256], accept[32];
    size_t accept_len = base64(digest, 20, accept);
    int n = snprintf(answer, sizeof answer,
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Accept: %.*s\r\n\r\n",
                     (int)accept_len, accept);
    queue(c, (const unsigned char *)answer, (size_t)n);
    c->open = 1;
    c->member = nmembers;
    members[nmembers++] = c->fd;
    return 0;
}

/* XOR a payload with its 4-byte key in place, eight bytes at a time. */
static void unmask(unsigned char *payload, size_t len, const unsigned char *key) {
    uint64_t word, wide;
    uint32_t four;
    size_t i = 0;
    memcpy(&four, key, 4);
    wide = (uint64_t)four << 32 | four;
    for (; i + 8 <= len; i += 8) {
        memcpy(&word, payload + i, 8);
        word ^= wide;
        memcpy(payload + i, &word, 8);
    }
    for (; i < len; i++) payload[i] ^= key[i & 3];
}

/* The bytes in buf[0:len]: the handshake, then frames. What was taken, or -1 to close. */
static ssize_t take(struct conn *c, unsigned char *buf, size_t len_in) {
    size_t at = 0;
    if (!c->open) {
        unsigned char *end = memmem(buf, len_in, "\r\n\r\n", 4);
        if (end == NULL) return len_in > 16384 ? -1 : 0;
        at = (size_t)(end - buf) + 4;
        if (upgrade(c, buf, at) < 0) return -1;
    }
    while (len_in - at >= 2) {
        unsigned char *f = buf + at;
        int fin = f[0] & 0x80, opcode = f[0] & 0x0f, masked = f[1] & 0x80;
        size_t len = f[1] & 0x7f, h = 2;
        if (len == 126) {
            if (len_in - at < 4) break;
            len = (size_t)f[2] << 8 | f[3], h = 4;
        }
        else if (len == 127) {
            if (len_in - at < 10) break;
            len = 0;
            for (int i = 0; i < 8; i++) len = len << 8 | f[2 + i];
            h = 10;
        }
        if (!masked || !fin || len > ((size_t)1 << 31)) return -1;
        if (len_in - at < h + 4 + len) break;
        unsigned char *key = f + h, *payload = f + h + 4;
        unmask(payload, len, key);
        at += h + 4 + len;
        if (opcode == 1 && len > 3 && memcmp(payload, "go:", 3) == 0) {
            int count = 0, size = 0;
            char text[64];
            size_t tl = len < sizeof text - 1 ? len : sizeof text - 1;
            memcpy(text, payload, tl);
            text[tl] = 0;
            if (sscanf(text, "go:%d:%d", &count, &size) == 2 && count > 0 && size >= 0) broadcast(count, size);
        }
        else if (opcode == 1 || opcode == 2) reply(c, opcode, payload, len);
        else if (opcode == 9) reply(c, 10, payload, len);
        else if (opcode == 8) {
            reply(c, 8, payload, len < 2 ? len : 2);
            c->closing = 1; /* nothing more is read or broadcast to it: it closes once the answer is sent */
            leave(c);
            break;
        }
    }
    return (ssize_t)at;
}

/* A read: into the shared buffer, taken there; only a part frame is kept by the connection. */
static int readable(struct conn *c) {
    static unsigned char shared[READ_CHUNK];
    unsigned char *buf = shared;
    size_t len;
    if (c->in_len) {
        grow(&c->in, &c->in_cap, c->in_len + READ_CHUNK);
        buf = c->in + c->in_len;
    }
    ssize_t got = recv(c->fd, buf, READ_CHUNK, 0);
    if (got == 0 || (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) return -1;
    if (got < 0) return 0;
    if (c->in_len) {
        c->in_len += (size_t)got;
        buf = c->in, len = c->in_len;
    }
    else len = (size_t)got;
    c->gathering = 1;
    ssize_t taken = take(c, buf, len);
    c->gathering = 0;
    if (taken < 0) return -1;
    if (c->out_len && !c->writing) send_out(c); /* everything the read produced, in one send */
    else if (c->closing && !c->writing) watch(c, 0); /* no read interest any more */
    if (buf == shared) {
        if ((size_t)taken < len) {
            grow(&c->in, &c->in_cap, len - (size_t)taken);
            memcpy(c->in, buf + taken, len - (size_t)taken);
        }
        c->in_len = len - (size_t)taken;
    }
    else {
        memmove(c->in, c->in + taken, c->in_len - (size_t)taken);
        c->in_len -= (size_t)taken;
    }
    return 0;
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 0, one = 1;
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 4096)) {
        perror("listen");
        return 2;
    }
    socklen_t addr_len = sizeof addr;
    getsockname(listener, (struct sockaddr *)&addr, &addr_len);
    printf("ready %d\n", ntohs(addr.sin_port));
    fflush(stdout);
    ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = listener}, events[512];
    epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev);
    for (;;) {
        int n = epoll_wait(ep, events, 512, -1);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == listener) {
                int client;
                while ((client = accept4(listener, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if (client >= MAX_FD) {
                        close(client);
                        continue;
                    }
                    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct conn *c = calloc(1, sizeof *c);
                    c->fd = client;
                    c->member = -1;
                    conns[client] = c;
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = client};
                    epoll_ctl(ep, EPOLL_CTL_ADD, client, &cev);
                }
                continue;
            }
            struct conn *c = conns[fd];
            if (c == NULL) continue;
            if (events[i].events & EPOLLOUT && c->out_len) send_out(c);
            if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR) && !c->closing && readable(c) < 0) {
                close_conn(c);
                continue;
            }
            if (c->closing && c->out_len == 0) close_conn(c); /* the close answered: the server closes */
        }
    }
}
