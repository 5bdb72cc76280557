/*
 * Gateway: the TCP gateway's usual call, in C.
 *
 * A small call crosses the gateway twice per round trip; in Python, checking
 * the frame, taking a channel, posting, building the reply and counting cost
 * about as much as the worker's own share of the call.  This does the usual
 * case in C: one whole call frame at the start of the connection's (empty)
 * parser buffer, uncompressed, not pickle, with room in the gateway and a free
 * channel.  The call is posted straight from the read buffer (the request's
 * one copy) and, when the answer comes while spinning, the reply frame is
 * returned for the connection to write.  Anything else returns None with
 * nothing done, or (channels, channel, outcome) for a call that was posted (or
 * refused by the segment) but not answered at once: Python goes on with it.
 * The frame layout is framing.FRAME ("<BBHIIIQ"): kind, flags, name length,
 * call id, codec flags / status, timeout (ms), payload length (its constants
 * are in layout.h).
 */
#include "core.h"

typedef struct {
    PyObject_HEAD
    PyObject *transport, *server, *counters;
    unsigned codec_shift;
    uint64_t refused_codecs;   /* bit n: codec id n goes the long way (see refused_codec) */
    vectorcallfunc vectorcall;
} Gateway;

/* counters[key] += add, for a key the server counts (others are not counted). */
static int count(PyObject *counters, PyObject *key, long long add) {
    PyObject *old = PyDict_GetItemWithError(counters, key);   /* borrowed */
    if (!old) return PyErr_Occurred() ? -1 : 0;
    long long v = PyLong_AsLongLong(old);
    if (v == -1 && PyErr_Occurred()) return -1;
    PyObject *new = PyLong_FromLongLong(v + add);
    if (!new) return -1;
    int rc = PyDict_SetItem(counters, key, new);
    Py_DECREF(new);
    return rc;
}

/* The reply frame for a call answered with `status` and `body`. */
static PyObject *reply_frame(uint32_t call_id, uint32_t status, PyObject *body) {
    Py_ssize_t len = PyBytes_GET_SIZE(body);
    PyObject *frame = PyBytes_FromStringAndSize(NULL, FRAME_HEADER + len);
    if (!frame) return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(frame);
    memset(p, 0, FRAME_HEADER);
    p[FRAME_KIND] = FRAME_REPLY;
    uint64_t length = (uint64_t)len;
    memcpy(p + FRAME_CALL_ID, &call_id, 4);        /* little-endian: the project's target is x86-64 / arm64 Linux */
    memcpy(p + FRAME_ARG, &status, 4);
    memcpy(p + FRAME_LENGTH, &length, 8);
    memcpy(p + FRAME_HEADER, PyBytes_AS_STRING(body), len);
    return frame;
}

/* A codec the short way leaves to Python, which checks the client may use it: one whose bit is
 * set, and every id above the mask's 64 (no codec has one: registered ids are 1..63). */
static int refused_codec(Gateway *self, uint32_t flags) {
    unsigned codec = (flags >> self->codec_shift) & 0xFF;
    return codec >= 64 || (self->refused_codecs >> codec & 1);
}

/* gateway(parser, n); the "server" it was made with is the TCP side's Admission */
static PyObject *GW_call(Gateway *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    if (PyVectorcall_NARGS(nargsf) != 2 || (kwnames && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "a Gateway takes (parser, n)");
        return NULL;
    }
    PyObject *parser = args[0];
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < FRAME_HEADER) Py_RETURN_NONE;
    /* room in the gateway, nobody waiting for it, and not stopping */
    PyObject *closing = PyObject_GetAttr(self->server, s_closing);
    if (!closing) return NULL;
    int stopping = PyObject_IsTrue(closing);
    Py_DECREF(closing);
    if (stopping) return stopping < 0 ? NULL : Py_NewRef(Py_None);
    long long inflight = int_attr(self->server, s_inflight), max_inflight;
    if (inflight == -1 && PyErr_Occurred()) return NULL;
    if ((max_inflight = int_attr(self->server, s_max_inflight)) == -1 && PyErr_Occurred()) return NULL;
    if (inflight >= max_inflight) Py_RETURN_NONE;
    PyObject *waiting = PyObject_GetAttr(self->server, s_waiting);
    if (!waiting) return NULL;
    Py_ssize_t nwaiting = PyObject_Length(waiting);
    Py_DECREF(waiting);
    if (nwaiting) return nwaiting < 0 ? NULL : Py_NewRef(Py_None);
    /* the parser holds nothing: the frame starts at its buffer's start */
    long long end = int_attr(parser, s_end);
    uint64_t max_payload;
    if (end == -1 && PyErr_Occurred()) return NULL;
    if (end) Py_RETURN_NONE;
    PyObject *big = PyObject_GetAttr(parser, s_big);
    if (!big) return NULL;
    Py_DECREF(big);
    if (big != Py_None) Py_RETURN_NONE;
    if (size_attr(parser, s_max_payload, &max_payload) < 0) return NULL;
    PyObject *buf_obj = PyObject_GetAttr(parser, s_buf);
    if (!buf_obj) return NULL;
    Py_buffer buf;
    int rc = PyObject_GetBuffer(buf_obj, &buf, PyBUF_SIMPLE);
    Py_DECREF(buf_obj);
    if (rc < 0) return NULL;
    taken_channel c = TAKEN_CHANNEL_INIT;
    PyObject *got = NULL, *result = NULL;
    if (n > buf.len) goto none;
    const unsigned char *p = buf.buf;
    uint16_t name_len; uint32_t call_id, arg; uint64_t length;
    memcpy(&name_len, p + FRAME_NAME_LEN, 2); memcpy(&call_id, p + FRAME_CALL_ID, 4);
    memcpy(&arg, p + FRAME_ARG, 4); memcpy(&length, p + FRAME_LENGTH, 8);
    /* (a frame that is not right is left to the parser, which says what is wrong with it) */
    if (p[FRAME_KIND] != FRAME_CALL || p[FRAME_FLAGS] || name_len < 1 || name_len > FRAME_MAX_NAME || length > max_payload
        || (uint64_t)n != FRAME_HEADER + name_len + length || refused_codec(self, arg))
        goto none;
    /* a channel, as ShmMethod takes one */
    int taken = channel_take(self->transport, &c);
    if (taken < 0) goto done;
    if (taken == 0) goto none;
    /* from here on the channel is ours: every path gives it back or hands it to Python */
    if (count(self->counters, k_bytes_in, n) < 0) goto abort;
    Region *svc = (Region *)c.svc, *data = (Region *)c.data;
    Py_buffer name = {.buf = (void *)(p + FRAME_HEADER), .len = name_len};
    Py_buffer payload = {.buf = (void *)(p + FRAME_HEADER + name_len), .len = (Py_ssize_t)length};
    rc = post_call(svc->base, c.slot, data, &name, &payload, arg);
    got = rc == CALL_TOO_BIG || rc == CALL_NOT_SERVING ? PyLong_FromLong(rc)
        : collect_channel(svc, c.slot, data, 0.0, rc == POSTED_WOKE);
    if (!got || PyErr_CheckSignals() < 0) goto abort;
    uint32_t status = STATUS_OK;
    PyObject *body = got;
    if (PyTuple_CheckExact(got) && PyTuple_GET_SIZE(got) == 2) {   /* (status, bytes): a small error response */
        unsigned long st = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(got, 0));
        if (st == (unsigned long)-1 && PyErr_Occurred()) goto abort;
        status = (uint32_t)st;
        body = PyTuple_GET_ITEM(got, 1);
    }
    if (!PyBytes_CheckExact(body)) {   /* in flight still, or an answer to read the long way */
        result = PyTuple_Pack(3, c.chans, c.ch, got);
        goto done;
    }
    if (!(result = reply_frame(call_id, status, body))) goto abort;
    if (channel_give_back(self->transport, &c) < 0) Py_CLEAR(result);
    if (result && (count(self->counters, k_calls, 1) < 0 || count(self->counters, k_answered, 1) < 0
                   || count(self->counters, k_bytes_out, PyBytes_GET_SIZE(result)) < 0
                   || (status != STATUS_OK && count(self->counters, k_errors, 1) < 0)))
        Py_CLEAR(result);
    goto done;
abort:   /* an error (a signal handler's exception, most likely) with the channel ours: settle it */
    channel_abort(self->transport, &c);
    goto done;
none:
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&buf);
    Py_XDECREF(got);
    channel_release(&c);
    return result;
}

/* Gateway(transport, admission, counters, codec_shift, refused_codecs): refused_codecs is a
 * mask, bit n for codec id n (codecs.mask()). */
static PyObject *GW_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *transport, *server, *counters;
    unsigned int shift;
    unsigned long long refused;
    if (kw && PyDict_GET_SIZE(kw)) { PyErr_SetString(PyExc_TypeError, "Gateway takes no keyword arguments"); return NULL; }
    if (!PyArg_ParseTuple(args, "OOO!IK:Gateway", &transport, &server, &PyDict_Type, &counters, &shift, &refused))
        return NULL;
    if (shift > 24) { PyErr_SetString(PyExc_ValueError, "codec_shift out of range"); return NULL; }
    Gateway *self = (Gateway *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->transport = Py_NewRef(transport); self->server = Py_NewRef(server); self->counters = Py_NewRef(counters);
    self->codec_shift = shift;
    self->refused_codecs = (uint64_t)refused;
    self->vectorcall = (vectorcallfunc)GW_call;
    return (PyObject *)self;
}

static int GW_traverse(Gateway *self, visitproc visit, void *arg) {
    Py_VISIT(self->transport); Py_VISIT(self->server); Py_VISIT(self->counters);
    return 0;
}

static int GW_clear(Gateway *self) {
    Py_CLEAR(self->transport); Py_CLEAR(self->server); Py_CLEAR(self->counters);
    return 0;
}

static void GW_dealloc(Gateway *self) {
    PyObject_GC_UnTrack(self);
    GW_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyTypeObject GatewayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "speedysvc._shmcore.Gateway",
    .tp_basicsize = sizeof(Gateway),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "The TCP gateway's usual call: gateway(parser, n) -> reply frame, None or (channels, channel, outcome).",
    .tp_new = GW_new,
    .tp_dealloc = (destructor)GW_dealloc,
    .tp_traverse = (traverseproc)GW_traverse,
    .tp_clear = (inquiry)GW_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Gateway, vectorcall),
};
