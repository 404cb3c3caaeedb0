/*
 * Optional C speedups for pywsserver: unmasking client frames (RFC 6455 section 5.3).
 *
 * Built when a C compiler is available at install time; pywsserver falls back to a pure-Python
 * implementation otherwise (pywsserver/protocols/_mask.py), with the same results.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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
    {
        const unsigned char *in = (const unsigned char *)data.buf;
        const unsigned char *key = (const unsigned char *)mask.buf;
        unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
        Py_ssize_t length = data.len, i = 0;
        unsigned char key8[8];
        uint64_t word_key, word;

        memcpy(key8, key, 4);
        memcpy(key8 + 4, key, 4);
        memcpy(&word_key, key8, 8);
        /* Eight bytes at a time; the key repeats every four bytes, so word-sized steps keep its phase. */
        for (; i + 8 <= length; i += 8) {
            memcpy(&word, in + i, 8);
            word ^= word_key;
            memcpy(out + i, &word, 8);
        }
        for (; i < length; i++) {
            out[i] = in[i] ^ key[i & 3];
        }
    }
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&mask);
    return result;
}

static PyMethodDef speedups_methods[] = {
    {"apply_mask", (PyCFunction)(void (*)(void))apply_mask, METH_FASTCALL,
     "apply_mask(data, mask) -> bytes: XOR data with the repeated 4-byte mask."},
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
