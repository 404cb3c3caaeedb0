/*
 * Optional C speedups for pywsserver: unmasking client frames (RFC 6455 section 5.3), parsing the
 * common case of client frames and encoding server frames.
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
 * parse_frames(data, limit) -> (items, position, stop, detail)
 *
 * The common case of client frames, as pywsserver/protocols/_frames.py parse_frames_python does it:
 * whole masked frames with FIN set, no reserved bits, opcode text, binary, close, ping or pong, at
 * most `limit` bytes (125 for control frames). Text is checked and decoded as UTF-8, payloads are
 * unmasked. Items: str (text), bytes (binary), (9, payload) ping, (10, payload) pong, (8, payload) a
 * close frame (its payload is judged by the caller). It stops at the end of the data or of the
 * complete frames (INCOMPLETE), at a frame it does not take (OTHER: position is that frame's start),
 * at a close frame (CLOSE: the last item; position is its start), or at a text frame that is not
 * UTF-8 (BAD_UTF8: detail is the decoder's message, position is after that frame).
 */
static PyObject *
parse_frames(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t limit, size, position = 0;
    PyObject *items = NULL, *detail = NULL, *result = NULL;
    int stop = STOP_INCOMPLETE;
    /* Small payloads are unmasked on the stack, larger ones into their result object directly. */
    unsigned char small[128];

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "parse_frames(data, limit) takes exactly two arguments");
        return NULL;
    }
    limit = PyLong_AsSsize_t(args[1]);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (limit < 0) {
        PyErr_SetString(PyExc_ValueError, "limit must not be negative");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    items = PyList_New(0);
    if (items == NULL) {
        goto error;
    }
    {
        const unsigned char *buffer = (const unsigned char *)view.buf;
        size = view.len;
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
                    goto error;
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
                    goto error;
                }
            }
            else {
                unmask_into(small, masked, (Py_ssize_t)length, key);
                if (opcode == 1) {
                    item = PyUnicode_DecodeUTF8((const char *)small, (Py_ssize_t)length, NULL);
                }
                else {
                    item = Py_BuildValue("(iy#)", (int)opcode, (const char *)small, (Py_ssize_t)length);
                }
            }
            if (item == NULL) {
                if (opcode == 1 && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                    /* Text that is not UTF-8: the message of the error, as str(error) gives it. */
                    PyObject *type, *value, *traceback;
                    PyErr_Fetch(&type, &value, &traceback);
                    PyErr_NormalizeException(&type, &value, &traceback);
                    detail = value != NULL ? PyObject_Str(value) : NULL;
                    Py_XDECREF(type);
                    Py_XDECREF(value);
                    Py_XDECREF(traceback);
                    if (detail == NULL) {
                        goto error;
                    }
                    position = end;
                    stop = STOP_BAD_UTF8;
                    break;
                }
                goto error;
            }
            if (PyList_Append(items, item) < 0) {
                Py_DECREF(item);
                goto error;
            }
            Py_DECREF(item);
            if (opcode == 8) {
                stop = STOP_CLOSE; /* position stays at its start: the caller judges its payload */
                break;
            }
            position = end;
        }
    }
    PyBuffer_Release(&view);
    return parse_result(items, position, stop, detail);
error:
    Py_XDECREF(items);
    Py_XDECREF(detail);
    PyBuffer_Release(&view);
    return result;
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

static PyMethodDef speedups_methods[] = {
    {"apply_mask", (PyCFunction)(void (*)(void))apply_mask, METH_FASTCALL,
     "apply_mask(data, mask) -> bytes: XOR data with the repeated 4-byte mask."},
    {"parse_frames", (PyCFunction)(void (*)(void))parse_frames, METH_FASTCALL,
     "parse_frames(data, limit) -> (items, position, stop, detail): the common case of client frames."},
    {"encode_frame", (PyCFunction)encode_frame, METH_O,
     "encode_frame(data) -> bytes: one unmasked server frame, text for str, binary for bytes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "pywsserver._speedups", "Optional C speedups for pywsserver.", -1, speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&speedups_module);
}
