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

/* The reply frame for a call answered with `status` and the `len` bytes at `body`. */
static PyObject *reply_frame_of(uint32_t call_id, uint32_t status, const void *body, Py_ssize_t len) {
    PyObject *frame = PyBytes_FromStringAndSize(NULL, FRAME_HEADER + len);
    if (!frame) return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(frame);
    memset(p, 0, FRAME_HEADER);
    p[FRAME_KIND] = FRAME_REPLY;
    uint64_t length = (uint64_t)len;
    memcpy(p + FRAME_CALL_ID, &call_id, 4);        /* little-endian: the project's target is x86-64 / arm64 Linux */
    memcpy(p + FRAME_ARG, &status, 4);
    memcpy(p + FRAME_LENGTH, &length, 8);
    memcpy(p + FRAME_HEADER, body, len);
    return frame;
}

/* The reply frame for a call answered with `status` and `body` (bytes). */
static PyObject *reply_frame(uint32_t call_id, uint32_t status, PyObject *body) {
    return reply_frame_of(call_id, status, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body));
}

/* One call frame in a parser's buffer, as the short ways take it (see usual_frame). */
typedef struct {
    Py_buffer buf;              /* the parser's buffer, held: the frame starts at its start */
    uint16_t name_len;
    uint32_t call_id, arg;
    uint64_t length;            /* the payload's, after the name */
} usual_call;

/* 1 when the bytes that came (n) are exactly one whole call frame at the start of the parser's
 * (empty) buffer, uncompressed, within max_payload, of a codec the short way takes (`u->buf` is
 * then held: release it); 0 when not (nothing held: the parser takes it, and says what is wrong
 * with a frame that is not right); -1 on error.  Both short ways (Gateway, LocalWay) use it. */
static int usual_frame(PyObject *parser, Py_ssize_t n, unsigned codec_shift, uint64_t refused, usual_call *u) {
    if (n < FRAME_HEADER) return 0;
    long long end = int_attr(parser, s_end);
    uint64_t max_payload;
    if (end == -1 && PyErr_Occurred()) return -1;
    if (end) return 0;
    PyObject *big = PyObject_GetAttr(parser, s_big);
    if (!big) return -1;
    Py_DECREF(big);
    if (big != Py_None) return 0;
    if (size_attr(parser, s_max_payload, &max_payload) < 0) return -1;
    PyObject *buf_obj = PyObject_GetAttr(parser, s_buf);
    if (!buf_obj) return -1;
    int rc = PyObject_GetBuffer(buf_obj, &u->buf, PyBUF_SIMPLE);
    Py_DECREF(buf_obj);
    if (rc < 0) return -1;
    const unsigned char *p = u->buf.buf;
    if (n > u->buf.len) goto no;
    memcpy(&u->name_len, p + FRAME_NAME_LEN, 2); memcpy(&u->call_id, p + FRAME_CALL_ID, 4);
    memcpy(&u->arg, p + FRAME_ARG, 4); memcpy(&u->length, p + FRAME_LENGTH, 8);
    /* a codec the short way leaves to Python, which checks the client may use it: one whose bit
     * is set in `refused`, and every id above the mask's 64 (registered ids are 1..63) */
    unsigned codec = (u->arg >> codec_shift) & 0xFF;
    if (p[FRAME_KIND] != FRAME_CALL || p[FRAME_FLAGS] || u->name_len < 1 || u->name_len > FRAME_MAX_NAME
        || u->length > max_payload || (uint64_t)n != FRAME_HEADER + u->name_len + u->length
        || codec >= 64 || (refused >> codec & 1))
        goto no;
    return 1;
no:
    PyBuffer_Release(&u->buf);
    return 0;
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
    usual_call u;
    int rc = usual_frame(parser, n, self->codec_shift, self->refused_codecs, &u);
    if (rc <= 0) return rc < 0 ? NULL : Py_NewRef(Py_None);
    Py_buffer buf = u.buf;
    const unsigned char *p = buf.buf;
    uint16_t name_len = u.name_len; uint32_t call_id = u.call_id, arg = u.arg; uint64_t length = u.length;
    taken_channel c = TAKEN_CHANNEL_INIT;
    PyObject *got = NULL, *result = NULL;
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

/*
 * LocalWay: the usual TCP call of a worker that serves TCP itself (speedysvc.tcp.inworker), in C.
 *
 * The same frame as the gateway's short way (usual_frame), to a method with a fast path
 * (dispatch.fast_path), while the worker is idle: its turn taken (tcp_phase_begin), the method
 * run by serve.c's run_method, the turn given back and the call counted (tcp_phase_end), the
 * reply frame built by reply_frame, in one call.  When the worker runs a call already, the
 * call is the gateway's (it posts it to the pool: its answer is the gateway's).  Anything else
 * returns None with nothing done (Python runs it in this process, or posts it).  A result that
 * is not (status, bytes within max_payload) goes to `finish(status, payload) -> (status,
 * bytes)` (InProcess.finish), which says what is wrong with it as the worker's loop would.
 */
typedef struct {
    PyObject_HEAD
    PyObject *region, *handlers, *gateway, *server, *counters, *finish;
    long widx;                 /* the worker's entry; -1 until it has one (every call posted) */
    uint64_t max_payload;
    PyObject *last_name, *last_spec;   /* the last method run (a run of calls to one skips the lookup) */
    vectorcallfunc vectorcall;
} LocalWay;

static PyObject *LW_call(LocalWay *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    if (PyVectorcall_NARGS(nargsf) != 2 || (kwnames && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "a LocalWay takes (parser, n)");
        return NULL;
    }
    if (self->widx < 0) return PyObject_Vectorcall(self->gateway, args, 2, NULL);
    PyObject *parser = args[0];
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if (n == -1 && PyErr_Occurred()) return NULL;
    PyObject *closing = PyObject_GetAttr(self->server, s_closing);
    if (!closing) return NULL;
    int stopping = PyObject_IsTrue(closing);
    Py_DECREF(closing);
    if (stopping) return stopping < 0 ? NULL : Py_NewRef(Py_None);   /* (Python answers "stopping") */
    Gateway *gw = (Gateway *)self->gateway;
    usual_call u;
    int rc = usual_frame(parser, n, gw->codec_shift, gw->refused_codecs, &u);
    if (rc <= 0) return rc < 0 ? NULL : Py_NewRef(Py_None);
    const char *p = u.buf.buf, *name = p + FRAME_HEADER, *body = name + u.name_len;
    PyObject *spec, *result = NULL;
    if (self->last_name && PyBytes_GET_SIZE(self->last_name) == u.name_len
        && memcmp(PyBytes_AS_STRING(self->last_name), name, u.name_len) == 0) {
        spec = self->last_spec;
    } else {
        PyObject *key = PyBytes_FromStringAndSize(name, u.name_len);
        if (!key) goto done;
        spec = PyDict_GetItemWithError(self->handlers, key);   /* borrowed */
        if (!spec) {
            Py_DECREF(key);
            if (!PyErr_Occurred()) result = Py_NewRef(Py_None);   /* (Python says there is no such method) */
            goto done;
        }
        Py_XSETREF(self->last_name, key);
        Py_XSETREF(self->last_spec, Py_NewRef(spec));
    }
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 4) {
        PyErr_SetString(PyExc_TypeError, "handlers values must be (handler, wants_view, method_index, fast)");
        goto done;
    }
    PyObject *fast = PyTuple_GET_ITEM(spec, 3);
    /* a method with a fast path (run_method runs it), or a raw one (its handler takes a view) */
    int raw = PyObject_IsTrue(PyTuple_GET_ITEM(spec, 1));
    if (raw < 0) goto done;
    if (!raw) {
        if (!PyTuple_Check(fast) || PyTuple_GET_SIZE(fast) != 6) { result = Py_NewRef(Py_None); goto done; }
        unsigned long fast_flags = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(fast, 3));
        if (fast_flags == (unsigned long)-1 && PyErr_Occurred()) goto done;
        if (fast_flags != u.arg) { result = Py_NewRef(Py_None); goto done; }
    }
    long method = PyLong_AsLong(PyTuple_GET_ITEM(spec, 2));
    if (method == -1 && PyErr_Occurred()) goto done;
    Region *region = (Region *)self->region;
    if (!tcp_phase_begin(region->base, self->widx, method)) {   /* the worker is busy: post it */
        PyBuffer_Release(&u.buf);
        return PyObject_Vectorcall(self->gateway, args, 2, NULL);
    }
    /* from here on the turn is ours: every path ends it */
    Py_INCREF(spec);   /* (the cache may drop it while the method runs) */
    uint32_t status = STATUS_ERROR;
    /* raw methods get a read-only view, as in the worker's loop: of a copy of the request, since
     * the read buffer is reused (a method may keep what it was given) */
    PyObject *request = (Py_ssize_t)u.length <= SMALL_REQUEST || raw
        ? PyBytes_FromStringAndSize(body, (Py_ssize_t)u.length)
        : PyMemoryView_FromMemory((char *)body, (Py_ssize_t)u.length, PyBUF_READ);
    if (request && raw) Py_SETREF(request, PyMemoryView_FromObject(request));
    PyObject *answer = request ? run_method(PyTuple_GET_ITEM(spec, 0), raw ? Py_None : fast, u.arg, request, NULL, NULL)
                               : NULL;
    Py_DECREF(spec);
    Py_buffer out = {0};
    if (answer && PyTuple_CheckExact(answer) && PyTuple_GET_SIZE(answer) == 2
        && PyLong_CheckExact(PyTuple_GET_ITEM(answer, 0)) && (PyBytes_CheckExact(PyTuple_GET_ITEM(answer, 1))
                                                               || PyMemoryView_Check(PyTuple_GET_ITEM(answer, 1)))) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(answer, 1), &out, PyBUF_SIMPLE) < 0) PyErr_Clear();
        else if ((uint64_t)out.len > self->max_payload) PyBuffer_Release(&out);
    }
    if (answer && !out.obj) {
        /* not (status, bytes within the limit): Python makes it an answer (or the error that says why) */
        PyObject *fixed = PyTuple_CheckExact(answer) && PyTuple_GET_SIZE(answer) == 2
            ? PyObject_CallFunctionObjArgs(self->finish, PyTuple_GET_ITEM(answer, 0), PyTuple_GET_ITEM(answer, 1), NULL)
            : NULL;
        if (!fixed && !PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "a handler answered something else than (status, payload)");
        Py_SETREF(answer, fixed);
    }
    if (answer) {
        unsigned long st = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(answer, 0));
        if (st == (unsigned long)-1 && PyErr_Occurred()) Py_CLEAR(answer);
        else status = (uint32_t)st;
    }
    if (answer && !out.obj && PyObject_GetBuffer(PyTuple_GET_ITEM(answer, 1), &out, PyBUF_SIMPLE) < 0)
        Py_CLEAR(answer);   /* (finish answers bytes) */
    result = answer ? reply_frame_of(u.call_id, status, out.buf, out.len) : NULL;
    if (out.obj) PyBuffer_Release(&out);
    Py_XDECREF(answer);
    Py_XDECREF(request);   /* (after the reply is made: a raw answer may be a view of it) */
    tcp_phase_end(region->base, self->widx, method, status);
    if (!result) goto done;   /* (handlers catch everything: only a bug lands here) */
    if (result && (count(self->counters, k_bytes_in, n) < 0 || count(self->counters, k_calls, 1) < 0
                   || count(self->counters, k_answered, 1) < 0
                   || count(self->counters, k_bytes_out, PyBytes_GET_SIZE(result)) < 0
                   || (status != STATUS_OK && count(self->counters, k_errors, 1) < 0)))
        Py_CLEAR(result);
done:
    PyBuffer_Release(&u.buf);
    return result;
}

/* LocalWay(region, handlers, gateway, admission, counters, finish, max_payload) */
static PyObject *LW_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *region, *handlers, *gateway, *server, *counters, *finish;
    unsigned long long max_payload;
    if (kw && PyDict_GET_SIZE(kw)) { PyErr_SetString(PyExc_TypeError, "LocalWay takes no keyword arguments"); return NULL; }
    if (!PyArg_ParseTuple(args, "O!O!O!OO!OK:LocalWay", &RegionType, &region, &PyDict_Type, &handlers,
                          &GatewayType, &gateway, &server, &PyDict_Type, &counters, &finish, &max_payload))
        return NULL;
    LocalWay *self = (LocalWay *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->region = Py_NewRef(region); self->handlers = Py_NewRef(handlers); self->gateway = Py_NewRef(gateway);
    self->server = Py_NewRef(server); self->counters = Py_NewRef(counters); self->finish = Py_NewRef(finish);
    self->max_payload = (uint64_t)max_payload;
    self->widx = -1;
    self->vectorcall = (vectorcallfunc)LW_call;
    return (PyObject *)self;
}

/* registered(worker_index): the worker has its entry; calls may run in its process from now on. */
static PyObject *LW_registered(LocalWay *self, PyObject *arg) {
    long widx = PyLong_AsLong(arg);
    if (widx == -1 && PyErr_Occurred()) return NULL;
    if (widx < 0 || widx >= MAX_WORKERS) { PyErr_SetString(PyExc_ValueError, "bad worker index"); return NULL; }
    self->widx = widx;
    Py_RETURN_NONE;
}

static PyMethodDef LW_methods[] = {
    {"registered", (PyCFunction)LW_registered, METH_O, "the worker's entry: calls may run here from now on"},
    {NULL}
};

static int LW_traverse(LocalWay *self, visitproc visit, void *arg) {
    Py_VISIT(self->region); Py_VISIT(self->handlers); Py_VISIT(self->gateway); Py_VISIT(self->server);
    Py_VISIT(self->counters); Py_VISIT(self->finish); Py_VISIT(self->last_name); Py_VISIT(self->last_spec);
    return 0;
}

static int LW_clear(LocalWay *self) {
    Py_CLEAR(self->region); Py_CLEAR(self->handlers); Py_CLEAR(self->gateway); Py_CLEAR(self->server);
    Py_CLEAR(self->counters); Py_CLEAR(self->finish); Py_CLEAR(self->last_name); Py_CLEAR(self->last_spec);
    return 0;
}

static void LW_dealloc(LocalWay *self) {
    PyObject_GC_UnTrack(self);
    LW_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyTypeObject LocalWayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "speedysvc._shmcore.LocalWay",
    .tp_basicsize = sizeof(LocalWay),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "A worker's usual TCP call run in its own process: local(parser, n) -> reply frame, None, "
              "or what the gateway answers (the worker is busy).",
    .tp_new = LW_new,
    .tp_dealloc = (destructor)LW_dealloc,
    .tp_traverse = (traverseproc)LW_traverse,
    .tp_clear = (inquiry)LW_clear,
    .tp_methods = LW_methods,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(LocalWay, vectorcall),
};

/*
 * ServerConnectionCore: the asyncio protocol methods of a served TCP connection that run for
 * every read, in C (tcp/connection.py's ServerConnection is its subclass).
 *
 * The event loop asks the protocol for a buffer and then tells it how many bytes came, twice
 * per call; as Python methods that is two frames and a dozen lookups on top of the short way's
 * own work.  get_buffer hands the parser's buffer out (parser.get_buffer, bound when the parser
 * is set; before the handshake, the Python method _hello_buffer); buffer_updated offers what
 * came to the short way (core.Gateway or core.LocalWay, once the handshake chose it) and writes
 * a reply it answered at once through the transport's bound write; anything else goes to the
 * Python methods _posted(n, posted) and _buffer_updated(n), which do what ServerConnection did.
 */
#undef T_SHORT   /* (layout.h's, unused here: structmember.h's member type of that name is meant) */
#include <structmember.h>

typedef struct {
    PyObject_HEAD
    PyObject *parser, *parser_get_buffer, *transport, *transport_write, *short_way;
    Py_ssize_t inflight, share;
    char closed;
} ServerConnectionCore;

static PyObject *SC_get_buffer(ServerConnectionCore *self, PyObject *sizehint) {
    if (self->parser_get_buffer) return PyObject_CallNoArgs(self->parser_get_buffer);
    return PyObject_CallMethodOneArg((PyObject *)self, s_hello_buffer, sizehint);
}

static PyObject *SC_buffer_updated(ServerConnectionCore *self, PyObject *nbytes) {
    PyObject *short_way = self->short_way;
    if (short_way && short_way != Py_None && !self->closed && self->inflight < self->share && self->parser
        && self->transport_write) {
        PyObject *parser = Py_NewRef(self->parser), *args[2] = {parser, nbytes};
        Py_INCREF(short_way);   /* (both held: the method the short way runs may replace them) */
        PyObject *posted = PyObject_Vectorcall(short_way, args, 2, NULL);
        Py_DECREF(short_way);
        Py_DECREF(parser);
        if (!posted) return NULL;
        if (PyBytes_CheckExact(posted)) {
            PyObject *write = Py_NewRef(self->transport_write);
            PyObject *r = PyObject_CallOneArg(write, posted);
            Py_DECREF(write);
            Py_DECREF(posted);
            if (!r) return NULL;
            Py_DECREF(r);
            Py_RETURN_NONE;
        }
        if (posted != Py_None) {
            PyObject *r = PyObject_CallMethodObjArgs((PyObject *)self, s_posted, nbytes, posted, NULL);
            Py_DECREF(posted);
            return r;
        }
        Py_DECREF(posted);
    }
    return PyObject_CallMethodOneArg((PyObject *)self, s_buffer_updated_slow, nbytes);
}

/* parser and transport: set with their bound get_buffer and write (no lookup per read) */
static int SC_set(ServerConnectionCore *self, PyObject *value, void *which) {
    int is_parser = which == NULL;
    PyObject **slot = is_parser ? &self->parser : &self->transport;
    PyObject **bound = is_parser ? &self->parser_get_buffer : &self->transport_write;
    if (!value) { PyErr_SetString(PyExc_AttributeError, "cannot be deleted"); return -1; }
    PyObject *method = NULL;
    if (value != Py_None && !(method = PyObject_GetAttr(value, is_parser ? s_parser_get_buffer : s_write)))
        return -1;
    Py_XSETREF(*slot, Py_NewRef(value));
    Py_XSETREF(*bound, method);
    return 0;
}

static PyObject *SC_get(ServerConnectionCore *self, void *which) {
    PyObject *v = which == NULL ? self->parser : self->transport;
    return Py_NewRef(v ? v : Py_None);
}

static PyGetSetDef SC_getset[] = {
    {"parser", (getter)SC_get, (setter)SC_set, "the FrameParser, once the handshake is over (None before)", NULL},
    {"transport", (getter)SC_get, (setter)SC_set, "the asyncio transport (None before connection_made)", (void *)1},
    {NULL}
};

static PyMemberDef SC_members[] = {
    {"short_way", T_OBJECT, offsetof(ServerConnectionCore, short_way), 0,
     "the server's core.Gateway or core.LocalWay, once the handshake chose no compression (None: the long way)"},
    {"closed", T_BOOL, offsetof(ServerConnectionCore, closed), 0, "the connection is over"},
    {"inflight", T_PYSSIZET, offsetof(ServerConnectionCore, inflight), 0, "its calls posted and not answered"},
    {"share", T_PYSSIZET, offsetof(ServerConnectionCore, share), 0, "the most calls it may have in flight"},
    {NULL}
};

static PyMethodDef SC_methods[] = {
    {"get_buffer", (PyCFunction)SC_get_buffer, METH_O, "asyncio.BufferedProtocol.get_buffer"},
    {"buffer_updated", (PyCFunction)SC_buffer_updated, METH_O, "asyncio.BufferedProtocol.buffer_updated"},
    {NULL}
};

static int SC_traverse(ServerConnectionCore *self, visitproc visit, void *arg) {
    Py_VISIT(self->parser); Py_VISIT(self->parser_get_buffer); Py_VISIT(self->transport);
    Py_VISIT(self->transport_write); Py_VISIT(self->short_way);
    return 0;
}

static int SC_clear(ServerConnectionCore *self) {
    Py_CLEAR(self->parser); Py_CLEAR(self->parser_get_buffer); Py_CLEAR(self->transport);
    Py_CLEAR(self->transport_write); Py_CLEAR(self->short_way);
    return 0;
}

static void SC_dealloc(ServerConnectionCore *self) {
    PyObject_GC_UnTrack(self);
    SC_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyTypeObject ServerConnectionCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "speedysvc._shmcore.ServerConnectionCore",
    .tp_basicsize = sizeof(ServerConnectionCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A served TCP connection's protocol methods for every read (ServerConnection's base).",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)SC_dealloc,
    .tp_traverse = (traverseproc)SC_traverse,
    .tp_clear = (inquiry)SC_clear,
    .tp_methods = SC_methods,
    .tp_members = SC_members,
    .tp_getset = SC_getset,
};
