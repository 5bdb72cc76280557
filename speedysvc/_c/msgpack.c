/*
 * msgpack for the usual small values, in C.
 *
 * A service call encodes and decodes twice on each side; msgpack's own pack()
 * and unpackb() cost ~250 ns each on a small VM (a tenth of a shared-memory
 * call), most of it around the few bytes they write.  These do the common
 * values (None, bool, int, float, str, bytes, exact lists, tuples and dicts,
 * nested up to MP_DEPTH) byte for byte as msgpack.Packer(use_bin_type=True)
 * and msgpack.unpackb() with their defaults do, and hand everything else to
 * them (set_msgpack), so unusual values and every error come from msgpack.
 */
#include "core.h"

#define MP_DEPTH 32
#define MP_MAX_SIZE ((Py_ssize_t)1 << 40)   /* beyond this (shared references can make it so), msgpack's */
static PyObject *mp_pack_fallback, *mp_unpack_fallback, *mp_extra_data;

/* The encoded size of `o`, or -1: not one of ours (or an error to leave to msgpack). */
static Py_ssize_t mp_size(PyObject *o, int depth) {
    if (o == Py_None || o == Py_True || o == Py_False) return 1;
    if (PyLong_CheckExact(o)) {   /* (msgpack compares a subclass with 0, which may run its code) */
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (v == -1 && PyErr_Occurred()) { PyErr_Clear(); return -1; }
        if (overflow) {
            if (overflow < 0) return -1;
            unsigned long long u = PyLong_AsUnsignedLongLong(o);
            if (u == (unsigned long long)-1 && PyErr_Occurred()) { PyErr_Clear(); return -1; }
            return 9;
        }
        if (v >= -32 && v < 128) return 1;
        if (v >= -128 && v < 256) return 2;
        if (v >= -32768 && v < 65536) return 3;
        if (v >= -2147483648LL && v < 4294967296LL) return 5;
        return 9;
    }
    if (PyFloat_Check(o)) return 9;
    if (PyBytes_Check(o)) {
        Py_ssize_t n = PyBytes_GET_SIZE(o);
        return n < 256 ? 2 + n : n < 65536 ? 3 + n : n <= 0xFFFFFFFFLL ? 5 + n : -1;
    }
    if (PyUnicode_Check(o)) {
        Py_ssize_t n;
        if (!PyUnicode_AsUTF8AndSize(o, &n)) { PyErr_Clear(); return -1; }
        return n < 32 ? 1 + n : n < 256 ? 2 + n : n < 65536 ? 3 + n : n <= 0xFFFFFFFFLL ? 5 + n : -1;
    }
    if (depth >= MP_DEPTH) return -1;
    if (PyList_CheckExact(o) || PyTuple_CheckExact(o)) {
        Py_ssize_t n = PySequence_Fast_GET_SIZE(o), total = n < 16 ? 1 : n < 65536 ? 3 : 5;
        if (n > 0xFFFFFFFFLL) return -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_ssize_t s = mp_size(PySequence_Fast_GET_ITEM(o, i), depth + 1);
            if (s < 0 || (total += s) > MP_MAX_SIZE) return -1;
        }
        return total;
    }
    if (PyDict_CheckExact(o)) {
        Py_ssize_t n = PyDict_GET_SIZE(o), total = n < 16 ? 1 : n < 65536 ? 3 : 5, pos = 0;
        if (n > 0xFFFFFFFFLL) return -1;
        PyObject *k, *v;
        while (PyDict_Next(o, &pos, &k, &v)) {
            Py_ssize_t a = mp_size(k, depth + 1), b = a < 0 ? -1 : mp_size(v, depth + 1);
            if (b < 0 || (total += a + b) > MP_MAX_SIZE) return -1;
        }
        return total;
    }
    return -1;
}

static unsigned char *mp_be(unsigned char *p, uint64_t v, int n) {
    for (int i = n - 1; i >= 0; i--) { p[i] = (unsigned char)v; v >>= 8; }
    return p + n;
}

static unsigned char *mp_len(unsigned char *p, Py_ssize_t n, int fix, unsigned fixbit, unsigned char c8,
                             unsigned char c16, unsigned char c32) {
    if (n < fix) { *p++ = (unsigned char)(fixbit | n); return p; }
    if (c8 && n < 256) { *p++ = c8; *p++ = (unsigned char)n; return p; }
    if (n < 65536) { *p++ = c16; return mp_be(p, (uint64_t)n, 2); }
    *p++ = c32;
    return mp_be(p, (uint64_t)n, 4);
}

/* Writes what mp_size measured (same object, no Python code ran in between). */
static unsigned char *mp_write(PyObject *o, unsigned char *p) {
    if (o == Py_None) { *p++ = 0xc0; return p; }
    if (o == Py_True) { *p++ = 0xc3; return p; }
    if (o == Py_False) { *p++ = 0xc2; return p; }
    if (PyLong_CheckExact(o)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (overflow) { *p++ = 0xcf; return mp_be(p, PyLong_AsUnsignedLongLong(o), 8); }
        if (v < -32) {
            if (v >= -128) { *p++ = 0xd0; return mp_be(p, (uint64_t)v, 1); }
            if (v >= -32768) { *p++ = 0xd1; return mp_be(p, (uint64_t)v, 2); }
            if (v >= -2147483648LL) { *p++ = 0xd2; return mp_be(p, (uint64_t)v, 4); }
            *p++ = 0xd3;
            return mp_be(p, (uint64_t)v, 8);
        }
        if (v < 128) { *p++ = (unsigned char)v; return p; }
        if (v < 256) { *p++ = 0xcc; return mp_be(p, (uint64_t)v, 1); }
        if (v < 65536) { *p++ = 0xcd; return mp_be(p, (uint64_t)v, 2); }
        if (v < 4294967296LL) { *p++ = 0xce; return mp_be(p, (uint64_t)v, 4); }
        *p++ = 0xcf;
        return mp_be(p, (uint64_t)v, 8);
    }
    if (PyFloat_Check(o)) {
        double d = PyFloat_AS_DOUBLE(o);
        uint64_t bits;
        memcpy(&bits, &d, 8);
        *p++ = 0xcb;
        return mp_be(p, bits, 8);
    }
    if (PyBytes_Check(o)) {
        Py_ssize_t n = PyBytes_GET_SIZE(o);
        p = mp_len(p, n, 0, 0, 0xc4, 0xc5, 0xc6);
        memcpy(p, PyBytes_AS_STRING(o), n);
        return p + n;
    }
    if (PyUnicode_Check(o)) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(o, &n);   /* cached by mp_size */
        p = mp_len(p, n, 32, 0xa0, 0xd9, 0xda, 0xdb);
        memcpy(p, s, n);
        return p + n;
    }
    if (PyDict_CheckExact(o)) {
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        p = mp_len(p, PyDict_GET_SIZE(o), 16, 0x80, 0, 0xde, 0xdf);
        while (PyDict_Next(o, &pos, &k, &v)) p = mp_write(v, mp_write(k, p));
        return p;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(o);   /* an exact list or tuple */
    p = mp_len(p, n, 16, 0x90, 0, 0xdc, 0xdd);
    for (Py_ssize_t i = 0; i < n; i++) p = mp_write(PySequence_Fast_GET_ITEM(o, i), p);
    return p;
}

PyObject *m_msgpack_dumps(PyObject *mod, PyObject *o) {
    Py_ssize_t size = mp_size(o, 0);
    if (size < 0) {
        if (!mp_pack_fallback) { PyErr_SetString(PyExc_RuntimeError, "set_msgpack() first"); return NULL; }
        PyObject *fallback = Py_NewRef(mp_pack_fallback);   /* set_msgpack may run meanwhile */
        PyObject *r = PyObject_CallOneArg(fallback, o);
        Py_DECREF(fallback);
        return r;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (!out) return NULL;
    mp_write(o, (unsigned char *)PyBytes_AS_STRING(out));
    return out;
}

/* Encoding straight into shared memory (ShmMethod's requests, the worker's responses): the
 * size `o` encodes to, or -1 when it is not one of ours (dumps then goes to msgpack); and the
 * encoding itself, which must follow with no Python code run in between. */
Py_ssize_t mp_encoded_size(PyObject *o) { return mp_size(o, 0); }
void mp_encode(PyObject *o, char *p) { mp_write(o, (unsigned char *)p); }
int is_c_msgpack_dumps(PyObject *f) {
    return PyCFunction_Check(f) && PyCFunction_GET_FUNCTION(f) == (PyCFunction)(void (*)(void))m_msgpack_dumps;
}

typedef struct { const unsigned char *p, *end; } mp_reader;

/* binaries this large are copied out of the encoded value without the interpreter lock */
#define MP_COPY_WITHOUT_GIL (1 << 20)

static int mp_need(mp_reader *r, Py_ssize_t n) { return r->end - r->p >= n; }

static uint64_t mp_read_be(mp_reader *r, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = v << 8 | r->p[i];
    r->p += n;
    return v;
}

/* The next value; NULL without an exception: not one of ours (or not valid); NULL with one set:
 * out of memory (a list or map being built falls back to msgpack even then). */
static PyObject *mp_read(mp_reader *r, int depth) {
    if (!mp_need(r, 1)) return NULL;
    unsigned c = *r->p++;
    Py_ssize_t n;
    if (c < 0x80) return PyLong_FromLong((long)c);
    if (c >= 0xe0) return PyLong_FromLong((long)(signed char)c);
    if ((c & 0xe0) == 0xa0) { n = c & 0x1f; goto str; }
    if ((c & 0xf0) == 0x90) { n = c & 0x0f; goto array; }
    if ((c & 0xf0) == 0x80) { n = c & 0x0f; goto map; }
    switch (c) {
    case 0xc0: Py_RETURN_NONE;
    case 0xc2: Py_RETURN_FALSE;
    case 0xc3: Py_RETURN_TRUE;
    case 0xcc: case 0xcd: case 0xce: case 0xcf: {
        int w = 1 << (c - 0xcc);
        if (!mp_need(r, w)) return NULL;
        return PyLong_FromUnsignedLongLong(mp_read_be(r, w));
    }
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
        int w = 1 << (c - 0xd0);
        if (!mp_need(r, w)) return NULL;
        uint64_t u = mp_read_be(r, w);
        int64_t v = w == 1 ? (int8_t)u : w == 2 ? (int16_t)u : w == 4 ? (int32_t)u : (int64_t)u;
        return PyLong_FromLongLong(v);
    }
    case 0xca: {
        if (!mp_need(r, 4)) return NULL;
        uint32_t u = (uint32_t)mp_read_be(r, 4);
        float f;
        memcpy(&f, &u, 4);
        return PyFloat_FromDouble(f);
    }
    case 0xcb: {
        if (!mp_need(r, 8)) return NULL;
        uint64_t u = mp_read_be(r, 8);
        double d;
        memcpy(&d, &u, 8);
        return PyFloat_FromDouble(d);
    }
    case 0xd9: case 0xda: case 0xdb: {
        int w = 1 << (c - 0xd9);
        if (!mp_need(r, w)) return NULL;
        n = (Py_ssize_t)mp_read_be(r, w);
        goto str;
    }
    case 0xc4: case 0xc5: case 0xc6: {
        int w = 1 << (c - 0xc4);
        if (!mp_need(r, w)) return NULL;
        n = (Py_ssize_t)mp_read_be(r, w);
        if (!mp_need(r, n)) return NULL;
        r->p += n;
        if (n < MP_COPY_WITHOUT_GIL) return PyBytes_FromStringAndSize((const char *)r->p - n, n);
        /* A large binary is copied (and its fresh pages faulted in) without the interpreter
         * lock: the new object is nobody else's yet, and the source stays exported to us.  A
         * worker that serves TCP runs its event loop in another thread of the same process: a
         * 256 MiB argument decoded with the lock held kept that loop from its clients for a
         * tenth of a second. */
        PyObject *b = PyBytes_FromStringAndSize(NULL, n);
        if (!b) return NULL;
        const unsigned char *from = r->p - n;
        Py_BEGIN_ALLOW_THREADS
        memcpy(PyBytes_AS_STRING(b), from, (size_t)n);
        Py_END_ALLOW_THREADS
        return b;
    }
    case 0xdc: case 0xdd: {
        int w = c == 0xdc ? 2 : 4;
        if (!mp_need(r, w)) return NULL;
        n = (Py_ssize_t)mp_read_be(r, w);
        goto array;
    }
    case 0xde: case 0xdf: {
        int w = c == 0xde ? 2 : 4;
        if (!mp_need(r, w)) return NULL;
        n = (Py_ssize_t)mp_read_be(r, w);
        goto map;
    }
    default:
        return NULL;   /* ext, timestamps, the unused byte: msgpack's */
    }
str:
    if (!mp_need(r, n)) return NULL;
    r->p += n;
    {
        PyObject *s = PyUnicode_DecodeUTF8((const char *)r->p - n, n, NULL);
        if (!s) PyErr_Clear();   /* msgpack says what is wrong with it */
        return s;
    }
array:
    if (depth >= MP_DEPTH || !mp_need(r, n)) return NULL;   /* (each item takes a byte at least) */
    {
        PyObject *list = PyList_New(n);
        if (!list) { PyErr_Clear(); return NULL; }
        /* Not tracked by the garbage collector while items are missing: a large binary in it is
         * copied without the interpreter lock, and another thread must not find the list
         * half-made through gc.get_objects() (NULL items). */
        PyObject_GC_UnTrack(list);
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = mp_read(r, depth + 1);
            if (!item) { Py_DECREF(list); return NULL; }
            PyList_SET_ITEM(list, i, item);
        }
        PyObject_GC_Track(list);
        return list;
    }
map:
    if (depth >= MP_DEPTH || !mp_need(r, 2 * n)) return NULL;
    {
        PyObject *dict = PyDict_New();
        if (!dict) { PyErr_Clear(); return NULL; }
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *k = mp_read(r, depth + 1), *v = k ? mp_read(r, depth + 1) : NULL;
            /* unpackb's default (strict_map_key) takes str and bytes keys only, and interns str keys */
            if (v && PyUnicode_CheckExact(k)) PyUnicode_InternInPlace(&k);
            int ok = v && (PyUnicode_CheckExact(k) || PyBytes_CheckExact(k)) && PyDict_SetItem(dict, k, v) == 0;
            Py_XDECREF(k); Py_XDECREF(v);
            if (!ok) { PyErr_Clear(); Py_DECREF(dict); return NULL; }
        }
        return dict;
    }
}

PyObject *m_msgpack_loads(PyObject *mod, PyObject *data) {
    Py_buffer buf;
    if (PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();   /* not a buffer: msgpack's error */
    } else if (buf.itemsize != 1) {
        PyBuffer_Release(&buf);   /* msgpack refuses multi-byte items: its error */
    } else {
        mp_reader r = {buf.buf, (const unsigned char *)buf.buf + buf.len};
        Py_ssize_t len = buf.len;
        PyObject *v = mp_read(&r, 0);
        int whole = v && r.p == r.end;
        PyBuffer_Release(&buf);
        if (whole) return v;
        if (v && mp_extra_data) {
            /* One whole value of ours, then more bytes: unpackb would decode the same value and
             * raise ExtraData too, after copying the rest into it with the interpreter lock
             * held (a peer's 256 MiB of zeros: 0.15 s).  Raised here with `extra` empty. */
            PyObject *exc = PyObject_CallFunction(mp_extra_data, "(Oy#)", v, "", (Py_ssize_t)0);
            Py_DECREF(v);
            if (exc) {
                PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
                Py_DECREF(exc);
            }
            return NULL;
        }
        Py_XDECREF(v);
        if (PyErr_Occurred()) return NULL;   /* (only what cannot be left to msgpack, e.g. memory) */
        if (len >= MP_LARGE_FALLBACK) {
            /* unpackb would hold the interpreter lock through all of it: the codec's loads
             * (codecs/msgpack.py) reads such a value in slices instead */
            PyErr_SetString(PyExc_ValueError, "a large msgpack value left to msgpack.Unpacker");
            return NULL;
        }
    }
    if (!mp_unpack_fallback) { PyErr_SetString(PyExc_RuntimeError, "set_msgpack() first"); return NULL; }
    PyObject *fallback = Py_NewRef(mp_unpack_fallback);
    PyObject *r = PyObject_CallOneArg(fallback, data);
    Py_DECREF(fallback);
    return r;
}

PyObject *m_set_msgpack(PyObject *mod, PyObject *args) {
    PyObject *pack, *unpack, *extra_data = NULL;
    if (!PyArg_ParseTuple(args, "OO|O:set_msgpack", &pack, &unpack, &extra_data)) return NULL;
    Py_XSETREF(mp_pack_fallback, Py_NewRef(pack));
    Py_XSETREF(mp_unpack_fallback, Py_NewRef(unpack));
    Py_XSETREF(mp_extra_data, extra_data ? Py_NewRef(extra_data) : NULL);
    Py_RETURN_NONE;
}
