/*
 * Optional C speedups for pywsserver: unmasking client frames (RFC 6455 section 5.3), parsing the
 * common case of client frames, encoding server frames, and a read in the connection core's steady
 * state (parse, the handler's calls, the replies' frames) in one call.
 *
 * Built when a C compiler is available at install time; pywsserver falls back to pure-Python
 * implementations otherwise (pywsserver/protocols/_mask.py and _frames.py), with the same results
 * (tests/test_mask.py and tests/test_frames.py hold them equal).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#ifndef MS_WINDOWS
#include <sys/socket.h>
#include <netinet/in.h>
#include <unistd.h>
#endif

/* The flags of the sockets' send(2) here: MSG_NOSIGNAL where there is one, so that a peer gone
 * gives EPIPE, never SIGPIPE, even in a program that has set SIGPIPE back to its default
 * (Python ignores it at start; an embedding program may not). */
#ifdef MSG_NOSIGNAL
#define SEND_FLAGS MSG_NOSIGNAL
#else
#define SEND_FLAGS 0
#endif

/* What changed in Python 3.13: a Python int as a C int is public (the private name earlier releases
 * have is gone), and a type's version tag is valid when it is not 0 (the flag that said so before is
 * no longer set). */
#if PY_VERSION_HEX >= 0x030D0000
#define long_as_int PyLong_AsInt
#define VERSION_TAG_VALID(type) ((type)->tp_version_tag != 0)
#else
#define long_as_int _PyLong_AsInt
#define VERSION_TAG_VALID(type) (((type)->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG) != 0)
#endif

/* XOR `length` bytes of `in` with the repeated 4-byte `key` into `out`, eight bytes at a time. */
static void
unmask_into(unsigned char *out, const unsigned char *in, Py_ssize_t length, const unsigned char *key)
{
    Py_ssize_t i = 0;
    unsigned char key8[8];
    uint64_t word_key, word;

    memcpy(key8, key, 4);
    memcpy(key8 + 4, key, 4);
    memcpy(&word_key, key8, 8);
    for (; i + 8 <= length; i += 8) {
        memcpy(&word, in + i, 8);
        word ^= word_key;
        memcpy(out + i, &word, 8);
    }
    for (; i < length; i++) {
        out[i] = in[i] ^ key[i & 3];
    }
}

static PyObject *
apply_mask(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer data, mask;
    PyObject *result = NULL;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "apply_mask(data, mask) takes exactly two arguments");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[1], &mask, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    if (mask.len != 4) {
        PyErr_SetString(PyExc_ValueError, "the mask must be 4 bytes long");
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, data.len);
    if (result == NULL) {
        goto done;
    }
    unmask_into((unsigned char *)PyBytes_AS_STRING(result), (const unsigned char *)data.buf, data.len,
                (const unsigned char *)mask.buf);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&mask);
    return result;
}

/* What parse_frames stopped at (the same numbers as pywsserver/protocols/_frames.py). */
enum { STOP_INCOMPLETE = 0, STOP_OTHER = 1, STOP_CLOSE = 2, STOP_BAD_UTF8 = 3 };

/* The parse's answer: (items, position, stop, detail); steals the reference to `items`. */
static PyObject *
parse_result(PyObject *items, Py_ssize_t position, int stop, PyObject *detail)
{
    PyObject *result;

    if (detail == NULL) {
        detail = Py_None;
        Py_INCREF(detail);
    }
    result = Py_BuildValue("(NniN)", items, position, stop, detail);
    return result;
}

/*
 * Parse the common case of client frames from `buffer` (`size` bytes) into `items`, as
 * pywsserver/protocols/_frames.py parse_frames_python does it: whole masked frames with FIN set, no
 * reserved bits, opcode text, binary, close, ping or pong, at most `limit` bytes (125 for control
 * frames). Text is checked and decoded as UTF-8, payloads are unmasked. Items: str (text), bytes
 * (binary), (9, payload) ping, (10, payload) pong, (8, payload) a close frame (its payload is judged
 * by the caller). Sets `*position` and `*stop`: the end of the data or of the complete frames
 * (INCOMPLETE), a frame it does not take (OTHER: position is that frame's start), a close frame
 * (CLOSE: the last item; position is its start), or a text frame that is not UTF-8 (BAD_UTF8:
 * `*detail` is the decoder's message, position is after that frame). `*only_data` stays 1 while
 * every item is a text or binary message. Returns -1 with an exception set on failure.
 */
static int
parse_into(const unsigned char *buffer, Py_ssize_t size, Py_ssize_t limit, PyObject *items,
           Py_ssize_t *position_out, int *stop_out, PyObject **detail, int *only_data)
{
    Py_ssize_t position = 0;
    int stop = STOP_INCOMPLETE;
    /* Small payloads are unmasked on the stack, larger ones into their result object directly. */
    unsigned char small[128];

    while (size - position >= 2) {
        unsigned int first = buffer[position], second = buffer[position + 1];
        unsigned int opcode = first & 0x0F;
        uint64_t length = second & 0x7F;
        Py_ssize_t header = 2, end;
        const unsigned char *key, *masked;
        PyObject *item = NULL;

        if ((first & 0x70) || !(first & 0x80) || !(second & 0x80)
            || !(opcode == 1 || opcode == 2 || opcode == 8 || opcode == 9 || opcode == 10)) {
            stop = STOP_OTHER; /* reserved bits, a fragment, an unmasked frame, a reserved opcode */
            break;
        }
        if (length == 126) {
            if (size - position < 4) {
                break;
            }
            length = ((uint64_t)buffer[position + 2] << 8) | buffer[position + 3];
            header = 4;
        }
        else if (length == 127) {
            int i;
            if (size - position < 10) {
                break;
            }
            length = 0;
            for (i = 0; i < 8; i++) {
                length = (length << 8) | buffer[position + 2 + i];
            }
            header = 10;
        }
        if (length > (uint64_t)limit || (opcode > 2 && length > 125)) {
            stop = STOP_OTHER;
            break;
        }
        if (size - position < header + 4 || (uint64_t)(size - position - header - 4) < length) {
            break; /* not complete yet */
        }
        key = buffer + position + header;
        masked = key + 4;
        end = position + header + 4 + (Py_ssize_t)length;
        if (opcode == 2 || length > (uint64_t)sizeof(small)) {
            /* Binary, or a text too large for the stack: unmask into a bytes object. */
            PyObject *payload = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)length);
            if (payload == NULL) {
                return -1;
            }
            unmask_into((unsigned char *)PyBytes_AS_STRING(payload), masked, (Py_ssize_t)length, key);
            if (opcode == 1) {
                item = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(payload), (Py_ssize_t)length, NULL);
                Py_DECREF(payload);
            }
            else if (opcode == 2) {
                item = payload;
            }
            else {
                /* control frames are at most 125 bytes: never here */
                Py_DECREF(payload);
                PyErr_SetString(PyExc_SystemError, "parse_frames: control frame too long");
                return -1;
            }
        }
        else {
            unmask_into(small, masked, (Py_ssize_t)length, key);
            if (opcode == 1) {
                item = PyUnicode_DecodeUTF8((const char *)small, (Py_ssize_t)length, NULL);
            }
            else {
                item = Py_BuildValue("(iy#)", (int)opcode, (const char *)small, (Py_ssize_t)length);
                *only_data = 0;
            }
        }
        if (item == NULL) {
            if (opcode == 1 && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                /* Text that is not UTF-8: the message of the error, as str(error) gives it. */
                PyObject *type, *value, *traceback;
                PyErr_Fetch(&type, &value, &traceback);
                PyErr_NormalizeException(&type, &value, &traceback);
                *detail = value != NULL ? PyObject_Str(value) : NULL;
                Py_XDECREF(type);
                Py_XDECREF(value);
                Py_XDECREF(traceback);
                if (*detail == NULL) {
                    return -1;
                }
                position = end;
                stop = STOP_BAD_UTF8;
                break;
            }
            return -1;
        }
        if (PyList_Append(items, item) < 0) {
            Py_DECREF(item);
            return -1;
        }
        Py_DECREF(item);
        if (opcode == 8) {
            stop = STOP_CLOSE; /* position stays at its start: the caller judges its payload */
            break;
        }
        position = end;
    }
    *position_out = position;
    *stop_out = stop;
    return 0;
}

/* The message size limit argument as a non-negative Py_ssize_t; -1 with an exception set if not. */
static int
limit_arg(PyObject *arg, Py_ssize_t *limit)
{
    *limit = PyLong_AsSsize_t(arg);
    if (*limit == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (*limit < 0) {
        PyErr_SetString(PyExc_ValueError, "limit must not be negative");
        return -1;
    }
    return 0;
}

/* parse_frames(data, limit) -> (items, position, stop, detail): parse_into over a bytes-like object. */
static PyObject *
parse_frames(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t limit, position = 0;
    PyObject *items, *detail = NULL;
    int stop = STOP_INCOMPLETE, only_data = 1;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "parse_frames(data, limit) takes exactly two arguments");
        return NULL;
    }
    if (limit_arg(args[1], &limit) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    items = PyList_New(0);
    if (items == NULL
        || parse_into((const unsigned char *)view.buf, view.len, limit, items, &position, &stop, &detail,
                      &only_data) < 0) {
        PyBuffer_Release(&view);
        Py_XDECREF(items);
        Py_XDECREF(detail);
        return NULL;
    }
    PyBuffer_Release(&view);
    return parse_result(items, position, stop, detail);
}

/*
 * encode_frame(data) -> bytes: one unfragmented, unmasked (server-to-client) frame, text for str
 * (UTF-8), binary for any other bytes-like object; header and payload in one allocation.
 */
static PyObject *
encode_frame(PyObject *module, PyObject *data)
{
    Py_buffer view;
    const char *payload;
    Py_ssize_t size, header;
    PyObject *encoded = NULL, *result;
    unsigned char first;
    unsigned char *out;

    if (PyUnicode_Check(data)) {
        first = 0x81;
        if (PyUnicode_IS_COMPACT_ASCII(data)) {
            payload = (const char *)PyUnicode_DATA(data); /* ASCII is its own UTF-8: no copy */
            size = PyUnicode_GET_LENGTH(data);
        }
        else {
            encoded = PyUnicode_AsUTF8String(data);
            if (encoded == NULL) {
                return NULL;
            }
            payload = PyBytes_AS_STRING(encoded);
            size = PyBytes_GET_SIZE(encoded);
        }
        view.obj = NULL;
    }
    else {
        first = 0x82;
        if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
            return NULL;
        }
        payload = (const char *)view.buf;
        size = view.len;
    }
    header = size < 126 ? 2 : (size < 65536 ? 4 : 10);
    result = PyBytes_FromStringAndSize(NULL, header + size);
    if (result != NULL) {
        out = (unsigned char *)PyBytes_AS_STRING(result);
        out[0] = first;
        if (header == 2) {
            out[1] = (unsigned char)size;
        }
        else if (header == 4) {
            out[1] = 126;
            out[2] = (unsigned char)(size >> 8);
            out[3] = (unsigned char)size;
        }
        else {
            int i;
            uint64_t length = (uint64_t)size;
            out[1] = 127;
            for (i = 0; i < 8; i++) {
                out[2 + i] = (unsigned char)(length >> (56 - 8 * i));
            }
        }
        memcpy(out + header, payload, (size_t)size);
    }
    Py_XDECREF(encoded);
    if (view.obj != NULL) {
        PyBuffer_Release(&view);
    }
    return result;
}

/*
 * The head of an HTTP request (pywsserver/protocols/_http.py, parse_request_head), the common case
 * only: a request line "METHOD TARGET HTTP/d.d" (a token, visible ASCII without "%", two digits) and
 * header lines "name:value" (a token, a value without control characters but HTAB), lines split at
 * CRLF, the bytes read as Latin-1. Returns (method, target, path, query, (major, minor), raw, index)
 * as the Python parse builds them (raw: the (name, value) pairs in order, each value stripped of
 * spaces and tabs; index: lower-case name to its values), or None for anything else, which the
 * Python parse then answers, with its error (tests/test_http_head_speedup.py holds the two equal).
 * The Python parse costs about 57,000 instructions for the usual six-line request under callgrind.
 */
static const unsigned char *
find_crlf(const unsigned char *start, const unsigned char *end)
{
    const unsigned char *p = start;
    while (p + 1 < end) {
        const unsigned char *cr = memchr(p, '\r', (size_t)(end - p - 1));
        if (cr == NULL) {
            return end;
        }
        if (cr[1] == '\n') {
            return cr;
        }
        p = cr + 1;
    }
    return end;
}

/* RFC 9110 tchar: "!#$%&'*+-.^_`|~", digits and letters. */
static int
is_tchar(unsigned char c)
{
    if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) {
        return 1;
    }
    return c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

/* Latin-1 text of [start, end), lower-cased in ASCII when `lower` (the caller knows it is ASCII). */
static PyObject *
latin1_text(const unsigned char *start, const unsigned char *end, int lower)
{
    Py_ssize_t i, size = end - start;
    PyObject *text;
    Py_UCS1 *data;

    if (!lower) {
        return PyUnicode_DecodeLatin1((const char *)start, size, NULL);
    }
    text = PyUnicode_New(size, 127);
    if (text == NULL) {
        return NULL;
    }
    data = PyUnicode_1BYTE_DATA(text);
    for (i = 0; i < size; i++) {
        unsigned char c = start[i];
        data[i] = (c >= 'A' && c <= 'Z') ? (Py_UCS1)(c + 32) : (Py_UCS1)c;
    }
    return text;
}

/*
 * The header names of a usual upgrade request, as strings made once (interned, their hashes kept):
 * such a name costs no new string for its lower-case form, nor for itself when it is spelled the
 * usual way, and its look-up in the index hashes nothing; HTTP/1.1's version tuple is made once too.
 * With the worker taking the acceptor's addresses as they come: 478,500 to 472,400 instructions per
 * handshake under callgrind (benchmarks/instructions.py --mode handshake).
 */
typedef struct {
    const char *lower;
    const char *usual;
    Py_ssize_t size;
    PyObject *lower_text;
    PyObject *usual_text;
} KnownName;

static KnownName known_names[] = {
    {"host", "Host", 0, NULL, NULL},
    {"upgrade", "Upgrade", 0, NULL, NULL},
    {"connection", "Connection", 0, NULL, NULL},
    {"sec-websocket-key", "Sec-WebSocket-Key", 0, NULL, NULL},
    {"sec-websocket-version", "Sec-WebSocket-Version", 0, NULL, NULL},
    {"sec-websocket-extensions", "Sec-WebSocket-Extensions", 0, NULL, NULL},
    {"sec-websocket-protocol", "Sec-WebSocket-Protocol", 0, NULL, NULL},
    {"origin", "Origin", 0, NULL, NULL},
    {"user-agent", "User-Agent", 0, NULL, NULL},
    {"accept-encoding", "Accept-Encoding", 0, NULL, NULL},
    {"accept-language", "Accept-Language", 0, NULL, NULL},
    {"cache-control", "Cache-Control", 0, NULL, NULL},
    {"pragma", "Pragma", 0, NULL, NULL},
    {"cookie", "Cookie", 0, NULL, NULL},
    {"authorization", "Authorization", 0, NULL, NULL},
    {"x-forwarded-for", "X-Forwarded-For", 0, NULL, NULL},
};
#define KNOWN_NAMES ((int)(sizeof(known_names) / sizeof(known_names[0])))

/* A version tuple made once: HTTP/1.1, the version of every upgrade request. */
static PyObject *version_1_1;

static int
known_names_intern(void)
{
    int i;
    for (i = 0; i < KNOWN_NAMES; i++) {
        known_names[i].size = (Py_ssize_t)strlen(known_names[i].lower);
        known_names[i].lower_text = PyUnicode_InternFromString(known_names[i].lower);
        known_names[i].usual_text = PyUnicode_InternFromString(known_names[i].usual);
        if (known_names[i].lower_text == NULL || known_names[i].usual_text == NULL) {
            return -1;
        }
    }
    version_1_1 = Py_BuildValue("(ii)", 1, 1);
    return version_1_1 == NULL ? -1 : 0;
}

/* The known name [start, start + size) is, in any case, or NULL. */
static KnownName *
known_name(const unsigned char *start, Py_ssize_t size)
{
    int i;
    Py_ssize_t j;
    for (i = 0; i < KNOWN_NAMES; i++) {
        KnownName *known = &known_names[i];
        if (known->size != size) {
            continue;
        }
        for (j = 0; j < size; j++) {
            unsigned char c = start[j];
            if (c >= 'A' && c <= 'Z') {
                c = (unsigned char)(c + 32);
            }
            if (c != (unsigned char)known->lower[j]) {
                break;
            }
        }
        if (j == size) {
            return known;
        }
    }
    return NULL;
}

/* One header line [start, end): appended to `raw` and `index`; 0 done, 1 not the common case, -1 error. */
static int
head_line(const unsigned char *start, const unsigned char *end, PyObject *raw, PyObject *index)
{
    const unsigned char *colon = start, *value, *value_end, *p;
    PyObject *name = NULL, *lower = NULL, *text = NULL, *pair = NULL, *values;
    KnownName *known;
    int result = -1;

    while (colon < end && is_tchar(*colon)) {
        colon++;
    }
    if (colon == start || colon == end || *colon != ':') {
        return 1;
    }
    for (p = colon + 1; p < end; p++) {
        if ((*p <= 0x1f && *p != '\t') || *p == 0x7f) {
            return 1;
        }
    }
    value = colon + 1;
    value_end = end;
    while (value < value_end && (*value == ' ' || *value == '\t')) {
        value++;
    }
    while (value_end > value && (value_end[-1] == ' ' || value_end[-1] == '\t')) {
        value_end--;
    }
    known = known_name(start, colon - start);
    if (known != NULL) {
        lower = Py_NewRef(known->lower_text);
        name = memcmp(start, known->usual, (size_t)known->size) == 0 ? Py_NewRef(known->usual_text)
                                                                     : latin1_text(start, colon, 0);
    }
    else {
        name = latin1_text(start, colon, 0);
        lower = name == NULL ? NULL : latin1_text(start, colon, 1);
    }
    text = (name == NULL || lower == NULL) ? NULL : latin1_text(value, value_end, 0);
    pair = text == NULL ? NULL : PyTuple_Pack(2, name, text);
    if (pair == NULL || PyList_Append(raw, pair) < 0) {
        goto done;
    }
    values = PyDict_GetItemWithError(index, lower); /* borrowed */
    if (values == NULL) {
        if (PyErr_Occurred()) {
            goto done;
        }
        values = PyList_New(0);
        if (values == NULL) {
            goto done;
        }
        if (PyDict_SetItem(index, lower, values) < 0) {
            Py_DECREF(values);
            goto done;
        }
        Py_DECREF(values); /* the dict holds it */
    }
    if (PyList_Append(values, text) < 0) {
        goto done;
    }
    result = 0;
done:
    Py_XDECREF(name);
    Py_XDECREF(lower);
    Py_XDECREF(text);
    Py_XDECREF(pair);
    return result;
}

static PyObject *
parse_head(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    const unsigned char *start, *end, *line_end, *space1 = NULL, *space2 = NULL, *p, *question;
    PyObject *raw = NULL, *index = NULL, *raw_tuple = NULL, *method = NULL, *target = NULL, *path = NULL;
    PyObject *query = NULL, *version = NULL, *result = NULL;
    int status;

    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    start = (const unsigned char *)view.buf;
    end = start + view.len;
    line_end = find_crlf(start, end);
    /* The request line: exactly two spaces. */
    for (p = start; p < line_end; p++) {
        if (*p == ' ') {
            if (space1 == NULL) {
                space1 = p;
            }
            else if (space2 == NULL) {
                space2 = p;
            }
            else {
                goto common_case_not;
            }
        }
    }
    if (space2 == NULL || space1 == start || space2 == space1 + 1) {
        goto common_case_not;
    }
    for (p = start; p < space1; p++) {
        if (!is_tchar(*p)) {
            goto common_case_not;
        }
    }
    for (p = space1 + 1; p < space2; p++) {
        if (*p < 0x21 || *p > 0x7e || *p == '%') { /* a percent-escape: decoded by the Python parse */
            goto common_case_not;
        }
    }
    p = space2 + 1;
    if (line_end - p != 8 || memcmp(p, "HTTP/", 5) != 0 || p[5] < '0' || p[5] > '9' || p[6] != '.' || p[7] < '0'
        || p[7] > '9') {
        goto common_case_not;
    }
    raw = PyList_New(0);
    index = raw == NULL ? NULL : PyDict_New();
    if (index == NULL) {
        goto done;
    }
    if (line_end < end) {
        p = line_end + 2;
        for (;;) {
            const unsigned char *next = find_crlf(p, end);
            status = head_line(p, next, raw, index);
            if (status < 0) {
                goto done;
            }
            if (status > 0) {
                goto common_case_not;
            }
            if (next == end) {
                break;
            }
            p = next + 2;
        }
    }
    question = memchr(space1 + 1, '?', (size_t)(space2 - space1 - 1));
    method = latin1_text(start, space1, 0);
    target = method == NULL ? NULL : latin1_text(space1 + 1, space2, 0);
    if (target == NULL) {
        goto done;
    }
    if (question == NULL) {
        path = Py_NewRef(target);
        query = PyUnicode_New(0, 0);
    }
    else {
        path = latin1_text(space1 + 1, question, 0);
        query = path == NULL ? NULL : latin1_text(question + 1, space2, 0);
    }
    if (query == NULL) {
        version = NULL;
    }
    else if (space2[6] == '1' && space2[8] == '1') {
        version = Py_NewRef(version_1_1);
    }
    else {
        version = Py_BuildValue("(ii)", space2[6] - '0', space2[8] - '0');
    }
    raw_tuple = version == NULL ? NULL : PyList_AsTuple(raw);
    if (raw_tuple != NULL) {
        result = PyTuple_Pack(7, method, target, path, query, version, raw_tuple, index);
    }
    goto done;
common_case_not:
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&view);
    Py_XDECREF(raw);
    Py_XDECREF(index);
    Py_XDECREF(raw_tuple);
    Py_XDECREF(method);
    Py_XDECREF(target);
    Py_XDECREF(path);
    Py_XDECREF(query);
    Py_XDECREF(version);
    return result;
}

/*
 * Attributes read where they lie. A read of the steady state reads and writes about a dozen
 * attributes of the connection core; PyObject_GetAttr on a __slots__ attribute costs about 100
 * instructions (the type's method cache, the member descriptor and its checks), more than the
 * interpreter's own specialised read. The core's attributes are plain object slots, so their
 * offsets are looked up once per type and the slots read and written directly. A table holds the
 * offsets for one type (a strong reference) and that type's version tag: the type changed in any
 * way (an attribute set on the class), the tag changes and the table is filled again. An
 * attribute that is not a plain writable object slot of a type with the generic getattr and
 * setattr (and any attribute of an object of another type) is looked up by name as Python would.
 */
#define TABLE_SIZE 16

typedef struct {
    int count;
    const char *spelled[TABLE_SIZE];
    PyObject *names[TABLE_SIZE];    /* interned at import */
    PyTypeObject *type;             /* the offsets' type (a strong reference), or NULL */
    unsigned int version;           /* its version tag then; 0: not to be trusted, fill again */
    Py_ssize_t offsets[TABLE_SIZE]; /* 0: looked up by name */
    int slots;                      /* every attribute has its offset (see table_slots) */
} SlotTable;

/* The connection core's attributes (pywsserver/_core.py ConnectionCore). */
enum {
    CORE_STEADY_OK, CORE_STEADY_IDLE, CORE_STEADY_LIMIT, CORE_HANDLER_OBJECT, CORE_HANDLER_STATE, CORE_OUT,
    CORE_BYTES_IN, CORE_MESSAGES_IN, CORE_BYTES_OUT, CORE_MODULE, CORE_SOCKET_CLOSED, CORE_WRITER, CORE_COUNT
};
static SlotTable core_table = {
    CORE_COUNT,
    {"_steady_ok", "_steady_idle", "_steady_limit", "_handler_object", "_handler_state", "_out", "_bytes_in",
     "_messages_in", "_bytes_out", "_module", "_socket_closed", "_writer"},
};
/* The protocol module's (the WebSocket module's counter of messages sent). */
enum { MODULE_MESSAGES_OUT, MODULE_COUNT };
static SlotTable module_table = {MODULE_COUNT, {"messages_out"}};
/* The transport's (a plain transport of the asyncio driver: no slots, looked up by name). */
enum { TRANSPORT_BUFFER, TRANSPORT_CONN_LOST, TRANSPORT_SOCK, TRANSPORT_COUNT };
static SlotTable transport_table = {TRANSPORT_COUNT, {"_buffer", "_conn_lost", "_sock"}};

static int
table_intern(SlotTable *table)
{
    int i;
    for (i = 0; i < table->count; i++) {
        table->names[i] = PyUnicode_InternFromString(table->spelled[i]);
        if (table->names[i] == NULL) {
            return -1;
        }
    }
    return 0;
}

/* The table filled for `type` as it is now. */
static void
table_fill(SlotTable *table, PyTypeObject *type)
{
    int i, generic;
    PyTypeObject *old;

    generic = type->tp_getattro == PyObject_GenericGetAttr && type->tp_setattro == PyObject_GenericSetAttr;
    for (i = 0; i < table->count; i++) {
        /* _PyType_Lookup gives the type a version tag if it has none (a borrowed reference, no error). */
        PyObject *descr = generic ? _PyType_Lookup(type, table->names[i]) : NULL;
        Py_ssize_t offset = 0;
        /* Only a member of the object's own type or a base: a descriptor taken from another class and
         * set on this one would point into someone else's layout (Python raises TypeError there). */
        if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)
            && PyType_IsSubtype(type, ((PyDescrObject *)descr)->d_type)) {
            PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
            if (member->type == T_OBJECT_EX && !(member->flags & READONLY) && member->offset > 0) {
                offset = member->offset;
            }
        }
        table->offsets[i] = offset;
    }
    old = table->type;
    table->type = (PyTypeObject *)Py_NewRef(type);
    table->version = generic && VERSION_TAG_VALID(type) ? type->tp_version_tag : 0;
    if (table->version == 0) {
        for (i = 0; i < table->count; i++) {
            table->offsets[i] = 0;
        }
    }
    table->slots = 1;
    for (i = 0; i < table->count; i++) {
        table->slots = table->slots && table->offsets[i] != 0;
    }
    Py_XDECREF(old); /* last: the table is whole whatever releasing the old type runs */
}

/* The table made ready for `object`'s type: filled again unless it is for that type as it is now
 * (inlined: three comparisons per attribute). */
static inline void
table_ready(SlotTable *table, PyObject *object)
{
    PyTypeObject *type = Py_TYPE(object);

    if (type != table->type || table->version == 0 || type->tp_version_tag != table->version) {
        table_fill(table, type);
    }
}

/* object.<name> as a new reference (NULL with an exception set, as getattr would). */
static PyObject *
table_get(SlotTable *table, PyObject *object, int index)
{
    Py_ssize_t offset;

    table_ready(table, object);
    offset = table->offsets[index];
    if (offset != 0) {
        PyObject *value = *(PyObject **)((char *)object + offset);
        if (value != NULL) {
            return Py_NewRef(value);
        }
    }
    return PyObject_GetAttr(object, table->names[index]); /* an empty slot: AttributeError, as Python */
}

/* object.<name> = value; -1 with an exception set on failure. */
static int
table_set(SlotTable *table, PyObject *object, int index, PyObject *value)
{
    Py_ssize_t offset;

    table_ready(table, object);
    offset = table->offsets[index];
    if (offset != 0) {
        PyObject **slot = (PyObject **)((char *)object + offset);
        PyObject *old = *slot;
        *slot = Py_NewRef(value);
        Py_XDECREF(old); /* last: a finaliser it runs sees the new value */
        return 0;
    }
    return PyObject_SetAttr(object, table->names[index], value);
}

/* object.<name> += amount (an int object); -1 with an exception set on failure. */
static int
table_add(SlotTable *table, PyObject *object, int index, PyObject *amount)
{
    PyObject *value = table_get(table, object, index), *sum;
    int result;

    if (value == NULL) {
        return -1;
    }
    sum = PyNumber_InPlaceAdd(value, amount);
    Py_DECREF(value);
    if (sum == NULL) {
        return -1;
    }
    result = table_set(table, object, index, sum);
    Py_DECREF(sum);
    return result;
}

/* object.<name> += amount; -1 with an exception set on failure. An exact int that fits a C long
 * is added as a C long (no number protocol: about 150 instructions less per counter). */
static int
table_add_ssize(SlotTable *table, PyObject *object, int index, Py_ssize_t amount)
{
    PyObject *value = table_get(table, object, index), *sum;
    int result, overflow;

    if (value == NULL) {
        return -1;
    }
    if (PyLong_CheckExact(value)) {
        long current = PyLong_AsLongAndOverflow(value, &overflow);
        if (!overflow && current >= 0 && amount >= 0 && (unsigned long)amount <= (unsigned long)(LONG_MAX - current)) {
            Py_DECREF(value);
            sum = PyLong_FromLong(current + (long)amount);
            if (sum == NULL) {
                return -1;
            }
            result = table_set(table, object, index, sum);
            Py_DECREF(sum);
            return result;
        }
    }
    Py_DECREF(value);
    value = PyLong_FromSsize_t(amount);
    if (value == NULL) {
        return -1;
    }
    result = table_add(table, object, index, value);
    Py_DECREF(value);
    return result;
}

/* bool(object.<name>): 1, 0, or -1 with an exception set. */
static int
table_true(SlotTable *table, PyObject *object, int index)
{
    PyObject *value = table_get(table, object, index);
    int result;

    if (value == NULL) {
        return -1;
    }
    result = PyObject_IsTrue(value);
    Py_DECREF(value);
    return result;
}

/* How steady_read's answer begins (the same numbers as pywsserver/protocols/_frames.py). */
enum { STEADY_DONE = 0, STEADY_PARSED = 1, STEADY_RESULT = 2, STEADY_RAISED = 3, STEADY_FATAL = 4 };

/* Interned at import: the handler's literals "reply" and "noreply" are the same objects, so most
 * tests are one pointer comparison. */
static PyObject *str_reply, *str_noreply, *str_handle, *str_set_timer, *str_idle, *str_write, *str_send;

/* Whether `value` is exactly the str `literal` (an exact str, not a subclass). */
static int
is_literal(PyObject *value, PyObject *literal)
{
    if (value == literal) {
        return 1;
    }
    return PyUnicode_CheckExact(value) && PyUnicode_Compare(value, literal) == 0;
}

/* Whether `core._steady_ok` is True now (the handler's call may have left the steady state). */
static int
still_steady(PyObject *core)
{
    PyObject *flag = table_get(&core_table, core, CORE_STEADY_OK);
    int ok;

    if (flag == NULL) {
        PyErr_Clear(); /* no flag: not steady, the general path goes on */
        return 0;
    }
    ok = flag == Py_True;
    Py_DECREF(flag);
    return ok;
}

/* What `out` holds, as one bytes object (None if nothing), `out` emptied; NULL on failure. */
static PyObject *
take_output(PyObject *out)
{
    Py_ssize_t parts = PyList_GET_SIZE(out), size = 0, i;
    PyObject *data;
    char *end;

    if (parts == 0) {
        Py_RETURN_NONE;
    }
    if (parts == 1) {
        data = PyList_GET_ITEM(out, 0);
        Py_INCREF(data);
    }
    else {
        for (i = 0; i < parts; i++) {
            PyObject *part = PyList_GET_ITEM(out, i);
            if (!PyBytes_Check(part)) { /* never so: what the core gathers is bytes */
                PyErr_SetString(PyExc_TypeError, "the output must be bytes");
                return NULL;
            }
            size += PyBytes_GET_SIZE(part);
        }
        data = PyBytes_FromStringAndSize(NULL, size);
        if (data == NULL) {
            return NULL;
        }
        end = PyBytes_AS_STRING(data);
        for (i = 0; i < parts; i++) {
            PyObject *part = PyList_GET_ITEM(out, i);
            memcpy(end, PyBytes_AS_STRING(part), (size_t)PyBytes_GET_SIZE(part));
            end += PyBytes_GET_SIZE(part);
        }
    }
    if (PyList_SetSlice(out, 0, parts, NULL) < 0) {
        Py_DECREF(data);
        return NULL;
    }
    return data;
}

/* Where a read of the steady state stopped, and what it holds (every reference a new one). */
typedef struct {
    int kind;
    PyObject *state; /* the last state (every kind but PARSED) */
    Py_ssize_t count, replies;
    PyObject *items; /* RESULT, RAISED, FATAL: the messages */
    PyObject *value; /* PARSED: the parse; RESULT: the result; RAISED, FATAL: the exception */
} SteadyRun;

/*
 * The parse and the handler's calls of steady_read (see there) over `buffer`'s first `nbytes`;
 * fills `run`. Returns -1 with an exception set on failure (nothing held).
 */
static int
steady_run(PyObject *buffer, Py_ssize_t nbytes, Py_ssize_t limit, PyObject *handler, PyObject *state, PyObject *out,
           PyObject *core, SteadyRun *run)
{
    Py_buffer view;
    Py_ssize_t position = 0, count = 0, replies = 0, total;
    PyObject *items, *detail = NULL;
    int stop = STOP_INCOMPLETE, only_data = 1, failed;

    if (!PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "out must be a list");
        return -1;
    }
    if (PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE) < 0) {
        return -1;
    }
    if (nbytes < 0 || nbytes > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "nbytes must be within the buffer");
        return -1;
    }
    items = PyList_New(0);
    failed = items == NULL
             || parse_into((const unsigned char *)view.buf, nbytes, limit, items, &position, &stop, &detail,
                           &only_data) < 0;
    /* Every message is a copy: the buffer is not needed (nor held) while handlers run. */
    PyBuffer_Release(&view);
    if (failed) {
        Py_XDECREF(items);
        Py_XDECREF(detail);
        return -1;
    }
    run->state = run->items = run->value = NULL;
    run->count = run->replies = 0;
    if (stop != STOP_INCOMPLETE || position != nbytes || !only_data) {
        run->kind = STEADY_PARSED;
        run->value = parse_result(items, position, stop, detail);
        return run->value == NULL ? -1 : 0;
    }
    Py_INCREF(state);
    total = PyList_GET_SIZE(items);
    while (count < total) {
        /* handler.handle(message, state), looked up for each call as the general path does, with
         * no bound method made (a method call, not an attribute then a call: about 500 instructions
         * less per read). */
        PyObject *call[4] = {NULL, handler, PyList_GET_ITEM(items, count), state};
        PyObject *raw = PyObject_VectorcallMethod(str_handle, call + 1, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);

        count++;
        if (raw == NULL) {
            PyObject *type, *value, *traceback;
            run->kind = PyErr_ExceptionMatches(PyExc_Exception) ? STEADY_RAISED : STEADY_FATAL;
            PyErr_Fetch(&type, &value, &traceback);
            PyErr_NormalizeException(&type, &value, &traceback);
            if (value == NULL) {
                value = Py_None;
                Py_INCREF(value);
            }
            else if (traceback != NULL) {
                PyException_SetTraceback(value, traceback);
            }
            Py_XDECREF(type);
            Py_XDECREF(traceback);
            run->value = value;
            break;
        }
        if (PyTuple_CheckExact(raw) && still_steady(core)) {
            Py_ssize_t size = PyTuple_GET_SIZE(raw);
            if (size == 3 && is_literal(PyTuple_GET_ITEM(raw, 0), str_reply)) {
                PyObject *data = PyTuple_GET_ITEM(raw, 1);
                if (PyUnicode_CheckExact(data) || PyBytes_CheckExact(data)) {
                    PyObject *frame = encode_frame(NULL, data);
                    if (frame != NULL && PyList_Append(out, frame) == 0) {
                        Py_DECREF(frame);
                        replies++;
                        Py_SETREF(state, Py_NewRef(PyTuple_GET_ITEM(raw, 2)));
                        Py_DECREF(raw);
                        continue;
                    }
                    /* Text that cannot be encoded (a lone surrogate), or no memory: the general
                     * path meets the same failure where it would. */
                    Py_XDECREF(frame);
                    PyErr_Clear();
                }
            }
            else if (size == 2 && is_literal(PyTuple_GET_ITEM(raw, 0), str_noreply)) {
                Py_SETREF(state, Py_NewRef(PyTuple_GET_ITEM(raw, 1)));
                Py_DECREF(raw);
                continue;
            }
        }
        run->kind = STEADY_RESULT;
        run->value = raw;
        break;
    }
    run->state = state;
    run->count = count;
    run->replies = replies;
    if (run->value == NULL) {
        run->kind = STEADY_DONE;
        Py_DECREF(items);
    }
    else {
        run->items = items;
    }
    return 0;
}

/* (kind, state, count, replies, output) when `items` is NULL, else (kind, state, count, replies,
 * items, value): steals the references to `state`, `items`, `value`. */
static PyObject *
steady_answer(int kind, PyObject *state, Py_ssize_t count, Py_ssize_t replies, PyObject *items, PyObject *value)
{
    Py_ssize_t size = items != NULL ? 6 : 5;
    PyObject *answer = PyTuple_New(size);
    PyObject *numbers[3];
    Py_ssize_t i;

    numbers[0] = PyLong_FromLong(kind);
    numbers[1] = PyLong_FromSsize_t(count);
    numbers[2] = PyLong_FromSsize_t(replies);
    if (answer == NULL || numbers[0] == NULL || numbers[1] == NULL || numbers[2] == NULL
        || (items == NULL && value == NULL)) {
        Py_XDECREF(answer);
        for (i = 0; i < 3; i++) {
            Py_XDECREF(numbers[i]);
        }
        Py_XDECREF(state);
        Py_XDECREF(items);
        Py_XDECREF(value);
        return NULL;
    }
    PyTuple_SET_ITEM(answer, 0, numbers[0]);
    PyTuple_SET_ITEM(answer, 1, state);
    PyTuple_SET_ITEM(answer, 2, numbers[1]);
    PyTuple_SET_ITEM(answer, 3, numbers[2]);
    if (items != NULL) {
        PyTuple_SET_ITEM(answer, 4, items);
        PyTuple_SET_ITEM(answer, 5, value);
    }
    else {
        PyTuple_SET_ITEM(answer, 4, value);
    }
    return answer;
}

/* A stopped run's answer, as steady_read gives it: (PARSED, parsed), or (kind, state, count,
 * replies, items, value). Takes the run's references. */
static PyObject *
run_answer(SteadyRun *run)
{
    PyObject *answer;
    PyObject *numbers[3];
    Py_ssize_t size = run->kind == STEADY_PARSED ? 2 : 6, i;

    answer = PyTuple_New(size);
    numbers[0] = PyLong_FromLong(run->kind);
    numbers[1] = PyLong_FromSsize_t(run->count);
    numbers[2] = PyLong_FromSsize_t(run->replies);
    if (answer == NULL || numbers[0] == NULL || numbers[1] == NULL || numbers[2] == NULL) {
        Py_XDECREF(answer);
        for (i = 0; i < 3; i++) {
            Py_XDECREF(numbers[i]);
        }
        Py_XDECREF(run->state);
        Py_XDECREF(run->items);
        Py_XDECREF(run->value);
        return NULL;
    }
    PyTuple_SET_ITEM(answer, 0, numbers[0]);
    if (run->kind == STEADY_PARSED) {
        PyTuple_SET_ITEM(answer, 1, run->value);
        Py_DECREF(numbers[1]);
        Py_DECREF(numbers[2]);
        return answer;
    }
    PyTuple_SET_ITEM(answer, 1, run->state);
    PyTuple_SET_ITEM(answer, 2, numbers[1]);
    PyTuple_SET_ITEM(answer, 3, numbers[2]);
    PyTuple_SET_ITEM(answer, 4, run->items);
    PyTuple_SET_ITEM(answer, 5, run->value);
    return answer;
}

/* The five arguments' common checks; -1 with an exception set if they are wrong. */
static int
size_arguments(PyObject *nbytes_arg, PyObject *limit_value, Py_ssize_t *nbytes, Py_ssize_t *limit)
{
    *nbytes = PyLong_AsSsize_t(nbytes_arg);
    if (*nbytes == -1 && PyErr_Occurred()) {
        return -1;
    }
    return limit_arg(limit_value, limit);
}

/*
 * steady_read(buffer, nbytes, limit, handler, state, out, core) -> answer
 *
 * A read in the connection core's steady state (pywsserver/_core.py ConnectionCore._steady_read),
 * as pywsserver/protocols/_frames.py steady_read_python does it. The first `nbytes` of `buffer` are
 * parsed as parse_frames does (with `limit`). Unless they are whole text and binary frames and
 * nothing else, no handler is called and the answer is (PARSED, (items, position, stop, detail)).
 * Else each message goes to `handler.handle(message, state)` in turn; a result ("reply", str or
 * bytes, state) has its frame appended to the list `out`, ("noreply", state) nothing, and the next
 * call gets the new state, while `core._steady_ok` stays True after the call. The answer is then
 * (DONE, state, count, replies, output): the last state, the messages handed to `handle`, the
 * frames appended, and what `out` held (None if nothing) as one bytes object, `out` emptied. At
 * any other result (another shape, a tuple subclass, an encoding that fails, or the
 * flag gone False during the call) it stops: (RESULT, state, count, replies, items, result), the
 * state being the one that call got and items[count - 1] the message it was given; the general
 * path goes on from there. An exception from `handle` stops it too: (RAISED, ..., items,
 * exception) for an Exception, (FATAL, ..., items, exception) for any other (to be raised again).
 */
static PyObject *
steady_read(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t nbytes, limit;
    SteadyRun run;

    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "steady_read(buffer, nbytes, limit, handler, state, out, core) takes exactly 7 arguments");
        return NULL;
    }
    if (size_arguments(args[1], args[2], &nbytes, &limit) < 0
        || steady_run(args[0], nbytes, limit, args[3], args[4], args[5], args[6], &run) < 0) {
        return NULL;
    }
    if (run.kind != STEADY_DONE) {
        return run_answer(&run);
    }
    return steady_answer(STEADY_DONE, run.state, run.count, run.replies, NULL, take_output(args[5]));
}
/* Hand `data` to `target.write(data)`; -1 with an exception set on failure. */
static int
call_write(PyObject *target, PyObject *data)
{
    PyObject *result = PyObject_CallMethodOneArg(target, str_write, data);

    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 0;
}

/*
 * The reply of a read written as ConnectionCore's writer would: when `transport` (the asyncio
 * driver's SocketTransport or asyncio's selector socket transport, or None) buffers nothing and
 * is not closing, handed to its socket with one send, the rest (after a short send) to the
 * transport's write, which buffers it and waits for the socket, as its own write does (`fd` is its
 * socket's descriptor); an error of the send goes to the transport's write, which meets it again
 * and closes the transport as it would.
 * Otherwise `core._writer.write(reply)`.
 */
static int
write_reply(PyObject *core, PyObject *transport, int fd, PyObject *reply)
{
    PyObject *writer;
    int result;

    if (transport != Py_None) {
        int busy = table_true(&transport_table, transport, TRANSPORT_BUFFER);
        if (busy == 0) {
            busy = table_true(&transport_table, transport, TRANSPORT_CONN_LOST);
        }
        if (busy < 0) {
            return -1;
        }
        if (!busy) {
            Py_buffer data;
            Py_ssize_t sent;
            PyObject *rest;
#ifdef MS_WINDOWS
            (void)fd;
            PyObject *sock = table_get(&transport_table, transport, TRANSPORT_SOCK), *number;
            if (sock == NULL) {
                return -1;
            }
            number = PyObject_CallMethodOneArg(sock, str_send, reply);
            Py_DECREF(sock);
            if (number == NULL) {
                if (PyErr_ExceptionMatches(PyExc_BlockingIOError) || PyErr_ExceptionMatches(PyExc_InterruptedError)) {
                    PyErr_Clear();
                    sent = 0;
                }
                else if (PyErr_ExceptionMatches(PyExc_Exception)) {
                    PyErr_Clear();
                    return call_write(transport, reply);
                }
                else {
                    return -1;
                }
            }
            else {
                sent = PyLong_AsSsize_t(number);
                Py_DECREF(number);
                if (sent == -1 && PyErr_Occurred()) {
                    return -1;
                }
            }
#else
            /* The socket's send(2) without socket.send's argument parsing and the release and
             * retaking of the interpreter's lock (the socket does not block): about 500
             * instructions per send in callgrind's profile. */
            if (PyObject_GetBuffer(reply, &data, PyBUF_SIMPLE) < 0) {
                return -1;
            }
            sent = send(fd, data.buf, (size_t)data.len, SEND_FLAGS);
            PyBuffer_Release(&data);
            if (sent < 0) {
                if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                    return call_write(transport, reply); /* fails the same way, and closes the transport */
                }
                sent = 0;
            }
#endif
            if (PyObject_GetBuffer(reply, &data, PyBUF_SIMPLE) < 0) {
                return -1;
            }
            if (sent >= data.len) {
                PyBuffer_Release(&data);
                return 0;
            }
            rest = PyBytes_FromStringAndSize((const char *)data.buf + sent, data.len - sent);
            PyBuffer_Release(&data);
            if (rest == NULL) {
                return -1;
            }
            result = call_write(transport, rest);
            Py_DECREF(rest);
            return result;
        }
    }
    writer = table_get(&core_table, core, CORE_WRITER);
    if (writer == NULL) {
        return -1;
    }
    result = call_write(writer, reply);
    Py_DECREF(writer);
    return result;
}

/*
 * steady_step(core, buffer, nbytes, transport, fd) -> None or answer
 *
 * A whole read of the connection core's steady state (pywsserver/_core.py
 * ConnectionCore._steady_read), as pywsserver/protocols/_frames.py steady_step_python does it: the
 * idle timer restarted (`core._set_timer("idle", core._steady_idle)` unless that is None), the
 * bytes counted, steady_read over the first `nbytes` of `buffer` with the core's limit, handler,
 * state and output list. When it answered every message (DONE) the step carries that out itself:
 * the state stored, the messages and replies counted (the core's `_messages_in`, its module's
 * `messages_out`), and unless the socket is closed the output counted and written (write_reply;
 * `transport` is the core's writer when it is the driver's plain transport, else None, and
 * `fd` its socket's descriptor, passed by the caller: read here it would cost about 220 instructions) and
 * None returned. Any other answer is returned as steady_read gives it, for the core's
 * `_steady_answer`, with only the timer and the bytes in done.
 */
static PyObject *
steady_step(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *core, *transport, *value, *handler, *state, *out, *reply;
    Py_ssize_t nbytes, limit, size;
    SteadyRun run;
    int failed, fd;

    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "steady_step(core, buffer, nbytes, transport, fd) takes exactly 5 arguments");
        return NULL;
    }
    core = args[0];
    transport = args[3];
    fd = long_as_int(args[4]);
    if (fd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    value = table_get(&core_table, core, CORE_STEADY_IDLE);
    if (value == NULL) {
        return NULL;
    }
    if (value != Py_None) { /* the idle timer first, as the module's data_received would */
        PyObject *call[3] = {core, str_idle, value};
        PyObject *result = PyObject_VectorcallMethod(str_set_timer, call, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(value);
        if (result == NULL) {
            return NULL;
        }
        Py_DECREF(result);
    }
    else {
        Py_DECREF(value);
    }
    nbytes = PyLong_AsSsize_t(args[2]);
    if ((nbytes == -1 && PyErr_Occurred()) || table_add_ssize(&core_table, core, CORE_BYTES_IN, nbytes) < 0) {
        return NULL;
    }
    value = table_get(&core_table, core, CORE_STEADY_LIMIT);
    if (value == NULL) {
        return NULL;
    }
    failed = limit_arg(value, &limit);
    Py_DECREF(value);
    if (failed) {
        return NULL;
    }
    handler = table_get(&core_table, core, CORE_HANDLER_OBJECT);
    state = handler == NULL ? NULL : table_get(&core_table, core, CORE_HANDLER_STATE);
    out = state == NULL ? NULL : table_get(&core_table, core, CORE_OUT);
    failed = out == NULL || steady_run(args[1], nbytes, limit, handler, state, out, core, &run) < 0;
    Py_XDECREF(handler);
    Py_XDECREF(state);
    if (failed) {
        Py_XDECREF(out);
        return NULL;
    }
    if (run.kind != STEADY_DONE) {
        Py_DECREF(out);
        return run_answer(&run);
    }
    /* The output taken before the stores, as the Python twin's steady_read hands it back: a store
       that fails (no real core's can) loses the reply the same way in both. */
    reply = take_output(out);
    Py_DECREF(out);
    failed = reply == NULL || table_set(&core_table, core, CORE_HANDLER_STATE, run.state) < 0
             || (run.count && table_add_ssize(&core_table, core, CORE_MESSAGES_IN, run.count) < 0);
    Py_DECREF(run.state);
    if (!failed && run.replies) {
        PyObject *protocol = table_get(&core_table, core, CORE_MODULE);
        failed = protocol == NULL || table_add_ssize(&module_table, protocol, MODULE_MESSAGES_OUT, run.replies) < 0;
        Py_XDECREF(protocol);
    }
    if (failed) {
        Py_XDECREF(reply);
        return NULL;
    }
    if (reply == Py_None) {
        return reply;
    }
    failed = table_true(&core_table, core, CORE_SOCKET_CLOSED);
    if (failed) { /* closed (1): the reply goes nowhere, as the core's flush would drop it */
        Py_DECREF(reply);
        if (failed < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    size = PyObject_Length(reply);
    failed = size < 0 || table_add_ssize(&core_table, core, CORE_BYTES_OUT, size) < 0
             || write_reply(core, transport, fd, reply) < 0;
    Py_DECREF(reply);
    if (failed) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/*
 * Broadcast delivery (pywsserver/_broadcast.py, pywsserver/_asyncio_driver.py). A broadcast to a
 * group touches every member twice: its frame is gathered on the member's core
 * (ConnectionCore._broadcast_now), and at the end of the event-loop turn each core's frames are
 * sent (the asyncio driver's _LoopShared.flush). In Python that is about 3,400 instructions of
 * bytecode per member. Here the common case only, and nothing else: a core whose attributes are
 * all plain slots (the tables above, every offset known: `table_slots`), read directly as borrowed
 * references while no Python code runs, and the socket written with send(2). Anything unusual is
 * left untouched and handed back, for the Python path to do as it always did.
 */
enum {
    BCAST_RAW_MODULE, BCAST_SOCKET_CLOSED, BCAST_STOPPED, BCAST_CAN_WRITE, BCAST_MAILBOX_SEND, BCAST_OUT,
    BCAST_MESSAGES_OUT, BCAST_FLUSHES, BCAST_DRIVER, BCAST_FRAMES_LOG, BCAST_WRITER, BCAST_BYTES_OUT, BCAST_COUNT
};
static SlotTable bcast_table = {
    BCAST_COUNT,
    {"_raw_module", "_socket_closed", "_stopped", "_can_write", "_mailbox_send", "_out", "_messages_out",
     "_flushes", "_driver", "_frames_log", "_writer", "_bytes_out"},
};
/* The protocol module's flag (the WebSocket module: a broadcast's ready-made frame may go as is). */
enum { RAW_FRAMES, RAW_COUNT };
static SlotTable raw_table = {RAW_COUNT, {"raw_frames"}};
/* The asyncio driver's (ProtocolDriver): its transport when the shortcut is allowed, its socket's fd. */
enum { DRIVER_PLAIN, DRIVER_FD, DRIVER_COUNT };
static SlotTable driver_table = {DRIVER_COUNT, {"_plain", "_fd"}};

/* The trio driver's (TrioDriver): what its flush_soon reads to send a lone frame at once. */
enum { TRIO_PENDING, TRIO_LOST, TRIO_FD, TRIO_COUNT };
static SlotTable trio_table = {TRIO_COUNT, {"_pending", "_lost", "_fd"}};

static PyObject *str_flush_soon, *str_keep, *str_failed;

/* Whether every attribute of `table` is a slot of `object` at a known offset (then SLOT reads it;
 * read by name, each costs about 100 instructions more). */
static inline int
table_slots(SlotTable *table, PyObject *object)
{
    table_ready(table, object);
    return table->slots;
}

/* The slot's value, a borrowed reference (NULL when unset); only after table_slots said 1. */
#define SLOT(table, object, index) (*(PyObject **)((char *)(object) + (table)->offsets[index]))

/* object.<slot index> += amount after table_slots said 1: an exact int that fits a C long added in
 * place of the table's get and set (about 60 instructions less per counter); else table_add_ssize.
 * -1 with an exception set on failure. */
static int
slot_add(SlotTable *table, PyObject *object, int index, Py_ssize_t amount)
{
    PyObject **slot = &SLOT(table, object, index), *old = *slot, *sum;
    long current;
    int overflow;

    if (old != NULL && PyLong_CheckExact(old)) {
        current = PyLong_AsLongAndOverflow(old, &overflow);
        if (!overflow && current >= 0 && amount >= 0 && (unsigned long)amount <= (unsigned long)(LONG_MAX - current)) {
            sum = PyLong_FromLong(current + (long)amount);
            if (sum == NULL) {
                return -1;
            }
            *slot = sum;
            Py_DECREF(old); /* last: an int's release runs no Python code, but the slot is whole first */
            return 0;
        }
    }
    return table_add_ssize(table, object, index, amount);
}

/*
 * What `out` holds as one bytes object (every item an exact bytes, at least one: the caller
 * checks), `out` emptied. A single frame in a list of the size one append makes (4 items) is
 * taken with the list's array kept: the next frame's append then allocates nothing (a list that
 * is cleared frees its array, and the append makes one again: about 130 instructions per member
 * and broadcast, for at most 32 bytes kept per connection). Anything else as take_output does,
 * the array released. NULL on failure.
 */
static PyObject *
take_frames(PyObject *out)
{
    PyObject *data;

    if (PyList_GET_SIZE(out) == 1 && ((PyListObject *)out)->allocated <= 4) {
        data = PyList_GET_ITEM(out, 0); /* the list's reference becomes ours */
        Py_SET_SIZE(out, 0);
        return data;
    }
    return take_output(out);
}

static Py_ssize_t send_data(PyObject *transport, int fd, PyObject *data);

/*
 * The socket's fd when `driver` is a trio driver whose flush_soon would send a lone frame at once
 * (nothing pending, the socket not lost) and the core keeps no frame log; else -1.
 */
static int
trio_fd(PyObject *core, PyObject *driver, PyObject *frame)
{
    PyObject *pending, *number;
    long fd;

    if (!PyBytes_CheckExact(frame) || SLOT(&bcast_table, core, BCAST_FRAMES_LOG) != Py_None
        || !table_slots(&trio_table, driver)) {
        return -1;
    }
    pending = SLOT(&trio_table, driver, TRIO_PENDING);
    number = SLOT(&trio_table, driver, TRIO_FD);
    if (pending == NULL || !PyList_CheckExact(pending) || PyList_GET_SIZE(pending) != 0
        || SLOT(&trio_table, driver, TRIO_LOST) != Py_False || number == NULL || !PyLong_CheckExact(number)) {
        return -1;
    }
    fd = PyLong_AsLong(number);
    if (fd < 0 || fd > INT_MAX) {
        PyErr_Clear();
        return -1;
    }
    return (int)fd;
}

/*
 * TrioDriver.flush_soon for a lone frame, written out (trio_fd said `fd`): counted, sent, the
 * rest of a short send to the driver's _keep, a failed send to its _failed, as there; the frame
 * never enters `_out`. Instead of the call of flush_soon and socket.send from Python: 4,761 to
 * 1,147 instructions per delivery on trio under callgrind. 0 done, -1 with an exception set.
 */
static int
trio_send(PyObject *core, PyObject *driver, int fd, PyObject *frame)
{
    Py_ssize_t size = PyBytes_GET_SIZE(frame), sent;
    PyObject *called;

    if (slot_add(&bcast_table, core, BCAST_BYTES_OUT, size) < 0 || (sent = send_data(driver, fd, frame)) == -1) {
        return -1;
    }
    if (sent == size) {
        return 0;
    }
    if (sent == -2) {
        called = PyObject_CallMethodNoArgs(driver, str_failed);
    }
    else {
        PyObject *number = PyLong_FromSsize_t(sent);
        if (number == NULL) {
            return -1;
        }
        called = PyObject_CallMethodObjArgs(driver, str_keep, frame, number, NULL);
        Py_DECREF(number);
    }
    Py_XDECREF(called);
    return called == NULL ? -1 : 0;
}

/*
 * ConnectionCore._broadcast_now(frame) for one member, when it is plainly possible: 1 done (the
 * frame gathered, the core on the loop's flushes or its driver's flush_soon called, as there; on
 * trio a lone frame sent at once by trio_send, as that flush_soon would), 0
 * left untouched (not a core, its module encodes per connection, it cannot take output now, it has
 * a mailbox, anything unusual: the Python path decides), -1 with an exception set.
 */
static int
deliver_one(PyObject *member, PyObject *frame, PyTypeObject *core_type)
{
    PyObject *raw, *mailbox, *out, *flushes = NULL, *driver = NULL;
    int result = -1, fd = -1;

    if (!PyObject_TypeCheck(member, core_type) || !table_slots(&bcast_table, member)) {
        return 0;
    }
    raw = SLOT(&bcast_table, member, BCAST_RAW_MODULE);
    if (raw == NULL || raw == Py_None || !table_slots(&raw_table, raw) || SLOT(&raw_table, raw, RAW_FRAMES) != Py_True) {
        return 0;
    }
    /* Closed, stopped, paused (or flags that are not plain bools): the Python path queues or drops. */
    if (SLOT(&bcast_table, member, BCAST_SOCKET_CLOSED) != Py_False || SLOT(&bcast_table, member, BCAST_STOPPED) != Py_False
        || SLOT(&bcast_table, member, BCAST_CAN_WRITE) != Py_True) {
        return 0;
    }
    mailbox = SLOT(&bcast_table, member, BCAST_MAILBOX_SEND);
    out = SLOT(&bcast_table, member, BCAST_OUT);
    if (mailbox != Py_None || out == NULL || !PyList_CheckExact(out)) { /* a mailbox: the Python path asks it */
        return 0;
    }
    if (PyList_GET_SIZE(out) == 0) { /* nothing gathered yet: the loop's list (trio: None, the driver writes now) */
        flushes = SLOT(&bcast_table, member, BCAST_FLUSHES);
        driver = SLOT(&bcast_table, member, BCAST_DRIVER);
        if (flushes == NULL || driver == NULL || (flushes != Py_None && !PyList_CheckExact(flushes))) {
            return 0;
        }
        Py_INCREF(flushes); /* held: flush_soon's call below runs Python code */
        Py_INCREF(driver);
        if (flushes == Py_None) {
            fd = trio_fd(member, driver, frame);
        }
    }
    Py_INCREF(out);
    /* Only now is anything changed, in _broadcast_now's order. */
    if (slot_add(&bcast_table, member, BCAST_MESSAGES_OUT, 1) < 0) {
        goto done;
    }
    if (fd >= 0) { /* trio, a lone frame: its driver's flush_soon written out */
        result = trio_send(member, driver, fd, frame) < 0 ? -1 : 1;
        goto done;
    }
    if (flushes != NULL) {
        if (flushes == Py_None || PyList_GET_SIZE(flushes) == 0) { /* trio, or the turn's first: one callback */
            PyObject *called;
            if (flushes == Py_None && PyList_Append(out, frame) < 0) {
                goto done;
            }
            called = PyObject_CallMethodNoArgs(driver, str_flush_soon);
            if (called == NULL) {
                goto done;
            }
            Py_DECREF(called);
            if (flushes == Py_None) {
                result = 1;
                goto done;
            }
        }
        if (PyList_Append(flushes, member) < 0) {
            goto done;
        }
    }
    result = PyList_Append(out, frame) < 0 ? -1 : 1;
done:
    Py_XDECREF(driver);
    Py_XDECREF(flushes);
    Py_DECREF(out);
    return result;
}

/*
 * deliver_frames(members, frame, core_type) -> (delivered, rest)
 *
 * `member._broadcast_now(frame)` for each member of `core_type` that can plainly take the frame
 * now (see deliver_one); `rest` holds every other member, untouched and in order, for the Python
 * path (pywsserver/_broadcast.py _deliver). Same effects as deliver_frames_python there.
 */
static PyObject *
deliver_frames(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *members, *rest;
    Py_ssize_t i, delivered = 0;

    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "deliver_frames(members, frame, core_type) takes exactly 3 arguments");
        return NULL;
    }
    if (!PyBytes_Check(args[1]) || !PyType_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "deliver_frames() takes a frame of bytes and a type");
        return NULL;
    }
    members = PySequence_Fast(args[0], "deliver_frames() takes a sequence of members");
    if (members == NULL) {
        return NULL;
    }
    rest = PyList_New(0);
    if (rest == NULL) {
        Py_DECREF(members);
        return NULL;
    }
    /* The list may change under flush_soon's call: its length read each time, each member held. */
    for (i = 0; i < PySequence_Fast_GET_SIZE(members); i++) {
        PyObject *member = Py_NewRef(PySequence_Fast_GET_ITEM(members, i));
        int done = deliver_one(member, args[1], (PyTypeObject *)args[2]);
        if (done == 0) {
            done = PyList_Append(rest, member) < 0 ? -1 : 0;
        }
        Py_DECREF(member);
        if (done < 0) {
            Py_DECREF(members);
            Py_DECREF(rest);
            return NULL;
        }
        delivered += done;
    }
    Py_DECREF(members);
    return Py_BuildValue("(nN)", delivered, rest);
}

/* The transport's type as last checked by transport_idle: its version tag then (0: check again). */
static PyTypeObject *idle_type;
static unsigned int idle_version;
static PyObject *str_buffer, *str_conn_lost;
/* collections.deque: the transport's `_buffer` from Python 3.12 on (a bytearray before). */
static PyObject *deque_type;

/*
 * Whether a plain transport (the asyncio driver's SocketTransport, or asyncio's selector socket
 * transport) buffers nothing and has not lost its connection
 * (`not transport._buffer and not transport._conn_lost`; `_buffer` an exact bytearray up to
 * Python 3.11, an exact collections.deque from 3.12, whose length no Python code computes):
 * 1, 0 (or not known: a type whose
 * attributes could be anything), -1 with an exception set. Both are in the instance's dict, read
 * there (about 230 instructions less per member than two getattr calls), which is what getattr
 * does when the class has no data descriptor of those names (checked once per type and version).
 */
static int
transport_idle(PyObject *transport)
{
    PyTypeObject *type = Py_TYPE(transport);
    PyObject *dict, *value;
    int idle = 0;

    if (type != idle_type || idle_version == 0 || type->tp_version_tag != idle_version) {
        PyObject *names[2] = {str_buffer, str_conn_lost};
        int i, plain = type->tp_getattro == PyObject_GenericGetAttr && type->tp_dictoffset != 0
                       && VERSION_TAG_VALID(type);
        for (i = 0; plain && i < 2; i++) {
            PyObject *descr = _PyType_Lookup(type, names[i]);
            plain = descr == NULL || Py_TYPE(descr)->tp_descr_set == NULL;
        }
        Py_XSETREF(idle_type, (PyTypeObject *)Py_NewRef(type));
        idle_version = plain ? type->tp_version_tag : 0;
        if (!plain) {
            return 0;
        }
    }
    dict = PyObject_GenericGetDict(transport, NULL);
    if (dict == NULL) {
        return -1;
    }
    if (PyDict_CheckExact(dict)) {
        value = PyDict_GetItemWithError(dict, str_buffer); /* borrowed; no Python code runs */
        if (value != NULL
            && ((PyByteArray_CheckExact(value) && PyByteArray_GET_SIZE(value) == 0)
                || ((PyObject *)Py_TYPE(value) == deque_type && PyObject_Size(value) == 0))) {
            value = PyDict_GetItemWithError(dict, str_conn_lost);
            idle = value != NULL && PyLong_CheckExact(value) && PyObject_IsTrue(value) == 0;
        }
    }
    Py_DECREF(dict);
    return PyErr_Occurred() ? -1 : idle;
}

/*
 * The socket's send of `data`: the bytes it took (0 when it takes nothing now), or -2 when it
 * failed (the caller hands the data to the transport's write, which fails the same way and closes
 * the transport), or -1 with an exception set.
 */
static Py_ssize_t
send_data(PyObject *transport, int fd, PyObject *data)
{
    Py_ssize_t sent;
#ifdef MS_WINDOWS
    PyObject *sock = PyObject_GetAttrString(transport, "_sock"), *number;

    (void)fd;
    if (sock == NULL) {
        return -1;
    }
    number = PyObject_CallMethodOneArg(sock, str_send, data);
    Py_DECREF(sock);
    if (number == NULL) {
        if (PyErr_ExceptionMatches(PyExc_BlockingIOError) || PyErr_ExceptionMatches(PyExc_InterruptedError)) {
            PyErr_Clear();
            return 0;
        }
        if (PyErr_ExceptionMatches(PyExc_Exception)) {
            PyErr_Clear();
            return -2;
        }
        return -1;
    }
    sent = PyLong_AsSsize_t(number);
    Py_DECREF(number);
    return sent;
#else
    (void)transport;
    /* send(2) without socket.send's argument parsing and the release and retaking of the
     * interpreter's lock (the socket does not block): about 500 instructions per member. */
    sent = send(fd, PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data), SEND_FLAGS);
    if (sent < 0) {
        return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -2;
    }
    return sent;
#endif
}

/*
 * Hand (core, rest) to the Python path: appended to `left`, the caller's list, so that what is
 * already there is not lost if a later core fails. 0, or -1 with an exception set.
 */
static int
hand_back(PyObject *left, PyObject *core, PyObject *rest)
{
    PyObject *pair = PyTuple_Pack(2, core, rest);
    int result;

    if (pair == NULL) {
        return -1;
    }
    result = PyList_Append(left, pair);
    Py_DECREF(pair);
    return result;
}

/*
 * One core of flush_frames: 0 done (written whole, nothing to write, or handed back to `left`),
 * -1 with an exception set. Until the send, a failure puts the frames back in `_out` (the
 * caller's general path then writes them); after a short send, only a failure to copy the rest
 * loses it (no memory even for that: the peer then sees a cut frame and fails the connection).
 */
static int
flush_one(PyObject *core, PyObject *left)
{
    PyObject *out, *writer, *driver, *number, *data = NULL, *rest = Py_None;
    Py_ssize_t size, sent, i;
    long fd;
    int idle, ok, result = -1;

    if (!table_slots(&bcast_table, core)) {
        goto general;
    }
    out = SLOT(&bcast_table, core, BCAST_OUT);
    if (out == NULL || !PyList_CheckExact(out)) {
        goto general;
    }
    if (PyList_GET_SIZE(out) == 0) {
        return 0;
    }
    /* The general path (core._flush: the transport's write buffers or reports as always) unless the
     * transport is the driver's plain one, buffers nothing and is not closed, and no frame log. */
    writer = SLOT(&bcast_table, core, BCAST_WRITER);
    driver = SLOT(&bcast_table, core, BCAST_DRIVER);
    if (SLOT(&bcast_table, core, BCAST_SOCKET_CLOSED) != Py_False || SLOT(&bcast_table, core, BCAST_FRAMES_LOG) != Py_None
        || writer == NULL || driver == NULL || !table_slots(&driver_table, driver)
        || SLOT(&driver_table, driver, DRIVER_PLAIN) != writer) {
        goto general;
    }
    number = SLOT(&driver_table, driver, DRIVER_FD);
    if (number == NULL || !PyLong_CheckExact(number)) {
        goto general;
    }
    fd = PyLong_AsLong(number);
    if (fd < 0 || fd > INT_MAX) {
        PyErr_Clear();
        goto general;
    }
    Py_INCREF(writer);
    idle = transport_idle(writer);
    if (idle != 1) {
        Py_DECREF(writer);
        if (idle < 0) {
            return -1;
        }
        goto general;
    }
    /* Read again after transport_idle (a type's release there could run code): a list of exact
     * bytes, as take_frames needs (never else: what the core gathers is bytes). */
    out = SLOT(&bcast_table, core, BCAST_OUT);
    ok = out != NULL && PyList_CheckExact(out) && PyList_GET_SIZE(out) > 0;
    for (i = 0; ok && i < PyList_GET_SIZE(out); i++) {
        ok = PyBytes_CheckExact(PyList_GET_ITEM(out, i));
    }
    if (!ok) {
        Py_DECREF(writer);
        goto general;
    }
    Py_INCREF(out);
    data = take_frames(out);
    if (data == NULL) {
        goto done;
    }
    size = PyBytes_GET_SIZE(data);
    if (slot_add(&bcast_table, core, BCAST_BYTES_OUT, size) < 0) {
        /* Nothing sent: the frames back in `_out`, for the caller's general path. */
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        if (PyList_Insert(out, 0, data) < 0) {
            PyErr_Clear();
        }
        PyErr_Restore(type, value, traceback);
        goto done;
    }
    sent = send_data(writer, (int)fd, data);
    if (sent == -1) {
        goto done;
    }
    if (sent == -2) { /* failed: the transport's write meets the error again and closes the transport */
        rest = Py_NewRef(data);
    }
    else if (sent < size) { /* short: the rest to the transport's write, which buffers it */
        rest = PyBytes_FromStringAndSize(PyBytes_AS_STRING(data) + sent, size - sent);
        if (rest == NULL) {
            goto done;
        }
    }
    else {
        result = 0;
        goto done;
    }
    result = hand_back(left, core, rest);
    Py_DECREF(rest);
done:
    Py_XDECREF(data);
    Py_DECREF(out);
    Py_DECREF(writer);
    return result;
general: /* untouched: the general path */
    return hand_back(left, core, Py_None);
}

/*
 * flush_frames(cores, left) -> None
 *
 * The end of an event-loop turn on asyncio (pywsserver/_asyncio_driver.py _LoopShared.flush): the
 * frames each core gathered, joined and handed to its socket with one send when its transport is
 * the driver's plain one, buffers nothing and is not closed, counted in `_bytes_out`, `_out`
 * emptied. Appended to `left` (the caller's list, so that an error leaves it what was handed
 * back before) are the cores the Python path must finish: (core, None) untouched, for the
 * general path (core._flush()); (core, data) when the send was short or failed, `data` for the
 * transport's write. Same effects as flush_frames_python there.
 */
static PyObject *
flush_frames(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *sequence, *left;
    Py_ssize_t i;

    if (nargs != 2 || !PyList_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "flush_frames() takes a sequence of cores and a list");
        return NULL;
    }
    left = args[1];
    sequence = PySequence_Fast(args[0], "flush_frames() takes a sequence of cores");
    if (sequence == NULL) {
        return NULL;
    }
    for (i = 0; i < PySequence_Fast_GET_SIZE(sequence); i++) {
        PyObject *core = Py_NewRef(PySequence_Fast_GET_ITEM(sequence, i));
        int result = flush_one(core, left);
        Py_DECREF(core);
        if (result < 0) {
            Py_DECREF(sequence);
            return NULL;
        }
    }
    Py_DECREF(sequence);
    Py_RETURN_NONE;
}

/*
 * Accepting a connection (the asyncio acceptor's `_Listening.take_waiting`). Python's
 * ``socket._accept`` raises BlockingIOError when no connection waits (an exception made, with its
 * message decoded from strerror, once per readiness event), formats the peer's address with
 * inet_ntop and sprintf, and leaves the new socket blocking (one more system call to set it
 * non-blocking). Here: None when none waits, the socket non-blocking and close-on-exec from
 * accept4, and an IPv4 peer's address formatted directly (the worker takes it, instead of asking
 * getpeername again). Other families' addresses are None: the worker asks the socket.
 */
#if !defined(MS_WINDOWS) && defined(SOCK_NONBLOCK) && defined(SOCK_CLOEXEC)
#define HAVE_ACCEPT_SOCKET 1

/* "a.b.c.d" of an IPv4 address in network order. */
static PyObject *
ipv4_text(const struct in_addr *address)
{
    const unsigned char *octets = (const unsigned char *)&address->s_addr;
    char text[16];
    int i, length = 0;

    for (i = 0; i < 4; i++) {
        unsigned int octet = octets[i];
        if (i > 0) {
            text[length++] = '.';
        }
        if (octet >= 100) {
            text[length++] = (char)('0' + octet / 100);
        }
        if (octet >= 10) {
            text[length++] = (char)('0' + (octet / 10) % 10);
        }
        text[length++] = (char)('0' + octet % 10);
    }
    return PyUnicode_DecodeASCII(text, length, NULL);
}

static PyObject *
accept_socket(PyObject *module, PyObject *arg)
{
    struct sockaddr_storage address;
    socklen_t length;
    PyObject *peer = NULL, *host, *port, *number, *result;
    int listening = long_as_int(arg), fd;

    if (listening == -1 && PyErr_Occurred()) {
        return NULL;
    }
    for (;;) {
        length = (socklen_t)sizeof(address);
        fd = accept4(listening, (struct sockaddr *)&address, &length, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            break;
        }
        if (errno == EINTR) {
            if (PyErr_CheckSignals() < 0) {
                return NULL;
            }
            continue;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            Py_RETURN_NONE;
        }
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (length >= (socklen_t)sizeof(struct sockaddr_in) && address.ss_family == AF_INET) {
        const struct sockaddr_in *inet = (const struct sockaddr_in *)&address;
        host = ipv4_text(&inet->sin_addr);
        port = host == NULL ? NULL : PyLong_FromLong((long)ntohs(inet->sin_port));
        peer = port == NULL ? NULL : PyTuple_Pack(2, host, port);
        Py_XDECREF(host);
        Py_XDECREF(port);
        if (peer == NULL) {
            close(fd);
            return NULL;
        }
    }
    else {
        peer = Py_NewRef(Py_None);
    }
    number = PyLong_FromLong((long)fd);
    result = number == NULL ? NULL : PyTuple_Pack(2, number, peer);
    Py_XDECREF(number);
    Py_DECREF(peer);
    if (result == NULL) {
        close(fd);
    }
    return result;
}
#endif

static PyMethodDef speedups_methods[] = {
    {"apply_mask", (PyCFunction)(void (*)(void))apply_mask, METH_FASTCALL,
     "apply_mask(data, mask) -> bytes: XOR data with the repeated 4-byte mask."},
    {"parse_frames", (PyCFunction)(void (*)(void))parse_frames, METH_FASTCALL,
     "parse_frames(data, limit) -> (items, position, stop, detail): the common case of client frames."},
    {"encode_frame", (PyCFunction)encode_frame, METH_O,
     "encode_frame(data) -> bytes: one unmasked server frame, text for str, binary for bytes."},
    {"parse_head", (PyCFunction)parse_head, METH_O,
     "parse_head(head) -> (method, target, path, query, version, raw, index) or None: an HTTP request head."},
    {"steady_read", (PyCFunction)(void (*)(void))steady_read, METH_FASTCALL,
     "steady_read(buffer, nbytes, limit, handler, state, out, core) -> answer: a read in the steady state."},
    {"steady_step", (PyCFunction)(void (*)(void))steady_step, METH_FASTCALL,
     "steady_step(core, buffer, nbytes, transport, fd) -> None or answer: a whole read of the steady state."},
    {"deliver_frames", (PyCFunction)(void (*)(void))deliver_frames, METH_FASTCALL,
     "deliver_frames(members, frame, core_type) -> (delivered, rest): a broadcast's frame gathered on each core."},
    {"flush_frames", (PyCFunction)(void (*)(void))flush_frames, METH_FASTCALL,
     "flush_frames(cores, left) -> None: the cores' gathered frames sent at the turn's end, what the "
     "Python path must finish appended to left as (core, data or None)."},
#ifdef HAVE_ACCEPT_SOCKET
    {"accept_socket", (PyCFunction)accept_socket, METH_O,
     "accept_socket(fd) -> (fd, peer) or None: a waiting connection, its socket non-blocking; peer is "
     "an IPv4 peer's (host, port), else None."},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "pywsserver._speedups", "Optional C speedups for pywsserver.", -1, speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyObject *collections;

    if (str_reply == NULL) {
        str_reply = PyUnicode_InternFromString("reply");
        str_noreply = PyUnicode_InternFromString("noreply");
        str_handle = PyUnicode_InternFromString("handle");
        str_set_timer = PyUnicode_InternFromString("_set_timer");
        str_idle = PyUnicode_InternFromString("idle");
        str_write = PyUnicode_InternFromString("write");
        str_send = PyUnicode_InternFromString("send");
        str_flush_soon = PyUnicode_InternFromString("flush_soon");
        str_keep = PyUnicode_InternFromString("_keep");
        str_failed = PyUnicode_InternFromString("_failed");
        str_buffer = PyUnicode_InternFromString("_buffer");
        str_conn_lost = PyUnicode_InternFromString("_conn_lost");
        collections = PyImport_ImportModule("collections");
        deque_type = collections == NULL ? NULL : PyObject_GetAttrString(collections, "deque");
        Py_XDECREF(collections);
        if (str_reply == NULL || str_noreply == NULL || str_handle == NULL || str_set_timer == NULL
            || str_idle == NULL || str_write == NULL || str_send == NULL || str_flush_soon == NULL
            || str_keep == NULL || str_failed == NULL
            || str_buffer == NULL || str_conn_lost == NULL || deque_type == NULL
            || table_intern(&core_table) < 0
            || table_intern(&module_table) < 0 || table_intern(&transport_table) < 0
            || table_intern(&bcast_table) < 0 || table_intern(&raw_table) < 0 || table_intern(&driver_table) < 0
            || table_intern(&trio_table) < 0 || known_names_intern() < 0) {
            return NULL;
        }
    }
    return PyModule_Create(&speedups_module);
}
