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
#include <stdint.h>
#include <string.h>

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

/* How steady_read's answer begins (the same numbers as pywsserver/protocols/_frames.py). */
enum { STEADY_DONE = 0, STEADY_PARSED = 1, STEADY_RESULT = 2, STEADY_RAISED = 3, STEADY_FATAL = 4 };

/* Interned at import: the handler's literals "reply" and "noreply" are the same objects, so most
 * tests are one pointer comparison. */
static PyObject *str_reply, *str_noreply, *str_steady_ok, *str_handle;

/* Whether `value` is exactly the str `literal` (an exact str, not a subclass). */
static int
is_literal(PyObject *value, PyObject *literal)
{
    if (value == literal) {
        return 1;
    }
    return PyUnicode_CheckExact(value) && PyUnicode_Compare(value, literal) == 0;
}

/* Whether `core.<_steady_ok>` is True now (the handler's call may have left the steady state). */
static int
still_steady(PyObject *core)
{
    PyObject *flag = PyObject_GetAttr(core, str_steady_ok);
    if (flag == NULL) {
        PyErr_Clear(); /* no flag: not steady, the general path goes on */
        return 0;
    }
    int ok = flag == Py_True;
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
    Py_buffer view;
    Py_ssize_t nbytes, limit, position = 0, count = 0, replies = 0, total;
    PyObject *items, *detail = NULL, *handler, *state, *out, *core;
    int stop = STOP_INCOMPLETE, only_data = 1, failed;

    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "steady_read(buffer, nbytes, limit, handler, state, out, core) takes exactly 7 arguments");
        return NULL;
    }
    nbytes = PyLong_AsSsize_t(args[1]);
    if (nbytes == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (limit_arg(args[2], &limit) < 0) {
        return NULL;
    }
    handler = args[3];
    out = args[5];
    core = args[6];
    if (!PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "out must be a list");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (nbytes < 0 || nbytes > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "nbytes must be within the buffer");
        return NULL;
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
        return NULL;
    }
    if (stop != STOP_INCOMPLETE || position != nbytes || !only_data) {
        PyObject *parsed = parse_result(items, position, stop, detail), *answer;
        if (parsed == NULL) {
            return NULL;
        }
        answer = PyTuple_New(2);
        if (answer == NULL) {
            Py_DECREF(parsed);
            return NULL;
        }
        PyTuple_SET_ITEM(answer, 0, PyLong_FromLong(STEADY_PARSED)); /* a small int: cached, never NULL */
        PyTuple_SET_ITEM(answer, 1, parsed);
        return answer;
    }
    state = args[4];
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
            int kind = PyErr_ExceptionMatches(PyExc_Exception) ? STEADY_RAISED : STEADY_FATAL;
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
            return steady_answer(kind, state, count, replies, items, value);
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
        return steady_answer(STEADY_RESULT, state, count, replies, items, raw);
    }
    Py_DECREF(items);
    return steady_answer(STEADY_DONE, state, count, replies, NULL, take_output(out));
}

static PyMethodDef speedups_methods[] = {
    {"apply_mask", (PyCFunction)(void (*)(void))apply_mask, METH_FASTCALL,
     "apply_mask(data, mask) -> bytes: XOR data with the repeated 4-byte mask."},
    {"parse_frames", (PyCFunction)(void (*)(void))parse_frames, METH_FASTCALL,
     "parse_frames(data, limit) -> (items, position, stop, detail): the common case of client frames."},
    {"encode_frame", (PyCFunction)encode_frame, METH_O,
     "encode_frame(data) -> bytes: one unmasked server frame, text for str, binary for bytes."},
    {"steady_read", (PyCFunction)(void (*)(void))steady_read, METH_FASTCALL,
     "steady_read(buffer, nbytes, limit, handler, state, out, core) -> answer: a read in the steady state."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "pywsserver._speedups", "Optional C speedups for pywsserver.", -1, speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (str_reply == NULL) {
        str_reply = PyUnicode_InternFromString("reply");
        str_noreply = PyUnicode_InternFromString("noreply");
        str_steady_ok = PyUnicode_InternFromString("_steady_ok");
        str_handle = PyUnicode_InternFromString("handle");
        if (str_reply == NULL || str_noreply == NULL || str_steady_ok == NULL || str_handle == NULL) {
            return NULL;
        }
    }
    return PyModule_Create(&speedups_module);
}
