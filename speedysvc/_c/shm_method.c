/*
 * ShmMethod: a client's method, the common case in C.
 *
 * A generated client method costs two Python frames and a dozen attribute
 * lookups above the codec and the wait; for a small call that is a third of
 * the round trip.  This does the common case (positional arguments, a free
 * channel, a small successful response) in C and leaves everything else to
 * Python: `fallback` (the method in Python) for keyword arguments or arguments
 * the codec refuses, the transport's call() when it has no attachment or free
 * channel yet, its _resume() for any outcome of the call but a small success,
 * and its _abort() when the wait is interrupted.
 */
#include "core.h"

typedef struct {
    PyObject_HEAD
    PyObject *dict, *weakrefs;
    PyObject *transport, *name, *codec, *dumps, *loads, *timeout, *fallback, *flags_obj;
    double slice;
    uint32_t flags;
    int in_place;   /* dumps is msgpack's C encoder: large requests are encoded into the channel */
    vectorcallfunc vectorcall;
} ShmMethod;

/* The arguments' tuple encoded: by msgpack's C encoder when `size` (mp_encoded_size's, >= 0)
 * says it takes them, else by dumps(tuple).  (TcpMethod's too.) */
PyObject *encode_tuple(PyObject *dumps, PyObject *tuple, Py_ssize_t size) {
    if (size < 0) return PyObject_CallOneArg(dumps, tuple);
    PyObject *payload = PyBytes_FromStringAndSize(NULL, size);
    if (payload) mp_encode(tuple, PyBytes_AS_STRING(payload));
    return payload;
}

static PyObject *SM_fallback(ShmMethod *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

/* After the call was posted on channel `c` (got: what the wait returned): the result, the
 * channel given back or handed to Python with it.  `payload` is the encoded request, or, for
 * a request encoded in place, the arguments' tuple: a call withdrawn before any worker took
 * it (its service stopped to restart) is sent again once the service is back, and _resume
 * encodes the tuple again for that (the tuple holds what it encodes, unchanged). */
static PyObject *SM_finish(ShmMethod *self, taken_channel *c, PyObject *got, PyObject *payload) {
    PyObject *result = NULL;
    /* A signal that came while spinning is handled here, while the channel is still
     * ours to settle: the next Python code to run might not give it back. */
    if (!got || PyErr_CheckSignals() < 0) { channel_abort(self->transport, c); return NULL; }
    if (PyBytes_CheckExact(got)) {
        result = PyObject_CallOneArg(self->loads, got);
        if (result) {
            if (channel_give_back(self->transport, c) < 0) Py_CLEAR(result);
            return result;
        }
        if (!PyErr_ExceptionMatches(PyExc_Exception)) { channel_abort(self->transport, c); return NULL; }
        PyErr_Clear();   /* _resume decodes it in Python and reports what is wrong */
    }
    return PyObject_CallMethodObjArgs(self->transport, s_resume, c->chans, c->ch, got, self->name, payload,
                                      self->flags_obj, self->codec, self->timeout, NULL);
}

/* A large request that msgpack's C encoder takes, written straight into a free channel's
 * data segment.  1 when done (*result set, or NULL with an exception set); 0 when not
 * possible (no channel in C's reach, too small a channel, the service not serving): nothing
 * taken, nothing posted, and the caller goes the usual way, which grows the channel. */
static int SM_call_in_place(ShmMethod *self, PyObject *tuple, PyObject **result) {
    taken_channel c = TAKEN_CHANNEL_INIT;
    int taken = channel_take(self->transport, &c);
    if (taken <= 0) { channel_release(&c); *result = NULL; return taken < 0; }
    Region *svc = (Region *)c.svc, *data = (Region *)c.data;
    Py_ssize_t name_len = PyBytes_GET_SIZE(self->name);
    /* measured again now that the channel is in hand: channel_take may have run Python code */
    Py_ssize_t size = mp_encoded_size(tuple);
    if (size < IN_PLACE_MIN || post_check(svc->base, data, name_len, size)) {
        *result = NULL;
        if (channel_give_back(self->transport, &c) < 0) { channel_release(&c); return 1; }
        channel_release(&c);
        return 0;
    }
    memcpy(data->base, PyBytes_AS_STRING(self->name), (size_t)name_len);
    mp_encode(tuple, data->base + name_len);
    int rc = post_publish(svc->base, c.slot, name_len, name_len + size, self->flags);
    PyObject *got = collect_channel(svc, c.slot, data, self->slice, rc == POSTED_WOKE);
    *result = SM_finish(self, &c, got, tuple);
    Py_XDECREF(got);
    channel_release(&c);
    return 1;
}

static PyObject *SM_call(ShmMethod *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    if (kwnames && PyTuple_GET_SIZE(kwnames)) return SM_fallback(self, args, nargsf, kwnames);
    PyObject *payload = NULL;
    if (self->dumps == Py_None) {   /* raw: the one bytes argument is the payload */
        if (n != 1 || !PyBytes_CheckExact(args[0])) return SM_fallback(self, args, nargsf, kwnames);
        payload = Py_NewRef(args[0]);
    } else {
        PyObject *tuple = PyTuple_New(n);
        if (!tuple) return NULL;
        for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(tuple, i, Py_NewRef(args[i]));
        Py_ssize_t size = self->in_place ? mp_encoded_size(tuple) : -1;
        if (size >= IN_PLACE_MIN) {
            PyObject *result;
            if (SM_call_in_place(self, tuple, &result)) { Py_DECREF(tuple); return result; }
            if (PyErr_Occurred()) { Py_DECREF(tuple); return NULL; }
            size = mp_encoded_size(tuple);   /* (Python code may have run) */
        }
        payload = encode_tuple(self->dumps, tuple, size);
        Py_DECREF(tuple);
        if (!payload) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL;
            PyErr_Clear();   /* the fallback encodes again and raises a clear error */
            return SM_fallback(self, args, nargsf, kwnames);
        }
        if (!PyBytes_CheckExact(payload)) {   /* buffers beside the bytes (pickle's out-of-band): Python places them */
            PyObject *result = PyObject_CallMethodObjArgs(self->transport, s_call, self->name, payload,
                                                          self->flags_obj, self->codec, self->timeout, NULL);
            Py_DECREF(payload);
            return result;
        }
    }
    taken_channel c = TAKEN_CHANNEL_INIT;
    PyObject *got = NULL, *result = NULL;
    int taken = channel_take(self->transport, &c);
    if (taken < 0) goto done;
    if (taken == 0) {   /* the transport does the rest in Python, with the arguments already encoded */
        result = PyObject_CallMethodObjArgs(self->transport, s_call, self->name, payload, self->flags_obj,
                                            self->codec, self->timeout, NULL);
        goto done;
    }
    /* the channel is ours: every path below gives it back */
    got = call_channel((Region *)c.svc, c.slot, (Region *)c.data, self->name, payload, self->flags, self->slice);
    result = SM_finish(self, &c, got, payload);
done:
    Py_DECREF(payload);
    Py_XDECREF(got);
    channel_release(&c);
    return result;
}

/* ShmMethod(transport, name, codec, dumps, loads, flags, timeout, slice, fallback):
 * dumps None for a raw method; timeout as given by the user (for _resume),
 * slice the wait before each liveness check. */
static PyObject *SM_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *transport, *name, *codec, *dumps, *loads, *flags, *timeout, *fallback;
    double slice;
    if (kw && PyDict_GET_SIZE(kw)) { PyErr_SetString(PyExc_TypeError, "ShmMethod takes no keyword arguments"); return NULL; }
    if (!PyArg_ParseTuple(args, "OSOOOO!OdO:ShmMethod", &transport, &name, &codec, &dumps, &loads, &PyLong_Type,
                          &flags, &timeout, &slice, &fallback))
        return NULL;
    if (check_timeout(slice)) return NULL;
    unsigned long f = PyLong_AsUnsignedLong(flags);
    if (f == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    if (f > UINT32_MAX) { PyErr_SetString(PyExc_ValueError, "flags out of range"); return NULL; }
    if ((dumps != Py_None && !PyCallable_Check(dumps)) || !PyCallable_Check(loads) || !PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "dumps, loads and fallback must be callable");
        return NULL;
    }
    ShmMethod *self = (ShmMethod *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->transport = Py_NewRef(transport); self->name = Py_NewRef(name); self->codec = Py_NewRef(codec);
    self->dumps = Py_NewRef(dumps); self->loads = Py_NewRef(loads); self->flags_obj = Py_NewRef(flags);
    self->timeout = Py_NewRef(timeout); self->fallback = Py_NewRef(fallback);
    self->flags = (uint32_t)f;
    self->in_place = dumps != Py_None && is_c_msgpack_dumps(dumps);
    self->slice = slice;
    self->vectorcall = (vectorcallfunc)SM_call;
    return (PyObject *)self;
}

static int SM_traverse(ShmMethod *self, visitproc visit, void *arg) {
    Py_VISIT(self->dict); Py_VISIT(self->transport); Py_VISIT(self->name); Py_VISIT(self->codec);
    Py_VISIT(self->dumps); Py_VISIT(self->loads); Py_VISIT(self->timeout); Py_VISIT(self->fallback);
    Py_VISIT(self->flags_obj);
    return 0;
}

static int SM_clear(ShmMethod *self) {
    Py_CLEAR(self->dict); Py_CLEAR(self->transport); Py_CLEAR(self->name); Py_CLEAR(self->codec);
    Py_CLEAR(self->dumps); Py_CLEAR(self->loads); Py_CLEAR(self->timeout); Py_CLEAR(self->fallback);
    Py_CLEAR(self->flags_obj);
    return 0;
}

static void SM_dealloc(ShmMethod *self) {
    PyObject_GC_UnTrack(self);
    if (self->weakrefs) PyObject_ClearWeakRefs((PyObject *)self);
    SM_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyGetSetDef SM_getset[] = {{"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL}, {NULL}};

PyTypeObject ShmMethodType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "speedysvc._shmcore.ShmMethod",
    .tp_basicsize = sizeof(ShmMethod),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "A client's method of a service over shared memory.",
    .tp_new = SM_new,
    .tp_dealloc = (destructor)SM_dealloc,
    .tp_traverse = (traverseproc)SM_traverse,
    .tp_clear = (inquiry)SM_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(ShmMethod, vectorcall),
    .tp_dictoffset = offsetof(ShmMethod, dict),
    .tp_weaklistoffset = offsetof(ShmMethod, weakrefs),
    .tp_getset = SM_getset,
};
