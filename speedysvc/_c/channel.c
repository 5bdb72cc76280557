/*
 * A transport's channel for one call made in C (ShmMethod, Gateway): taking
 * it from the attachment's free list, giving it back, and settling it when the
 * call is interrupted.  The same steps in Python are ShmTransport._take,
 * _give_back and _abort (shm/transport.py); the channels are shm/channels.py's
 * Channels and Channel.
 *
 * The free list is a plain Python list that Python's threads and these
 * functions share with no lock of their own: the GIL is what keeps it
 * consistent (see "What the GIL protects" in core.h).  Between looking at the
 * list and popping from it, and between reading `closed` and appending to it,
 * no Python code runs, so no other thread can either.
 */
#include "core.h"

/* 1 taken; 0 none here, nothing taken (no attachment or no free channel yet: the transport
 * takes one in Python); -1 with an exception set, and nothing left taken (a channel that
 * turned out unusable was settled through transport._abort). */
int channel_take(PyObject *transport, taken_channel *c) {
    if (!(c->chans = PyObject_GetAttr(transport, s_channels))) return -1;
    if (c->chans == Py_None) return 0;   /* not attached yet */
    PyObject *svc = c->svc = PyObject_GetAttr(c->chans, s_chans_region);
    if (!svc) return -1;
    if (!PyObject_TypeCheck(svc, &RegionType)) return 0;
    if (!(c->free = PyObject_GetAttr(c->chans, s_free))) return -1;
    if (!PyList_CheckExact(c->free) || PyList_GET_SIZE(c->free) == 0) return 0;
    Py_ssize_t last = PyList_GET_SIZE(c->free) - 1;
    c->ch = Py_NewRef(PyList_GET_ITEM(c->free, last));
    if (PyList_SetSlice(c->free, last, last + 1, NULL) < 0) { Py_CLEAR(c->ch); return -1; }
    /* from here on the channel is ours: every path gives it back or hands it to Python */
    PyObject *data = c->data = PyObject_GetAttr(c->ch, s_ch_region);
    PyObject *slot_obj = data ? PyObject_GetAttr(c->ch, s_slot) : NULL;
    c->slot = slot_obj ? PyLong_AsLong(slot_obj) : -1;
    Py_XDECREF(slot_obj);
    if (c->slot == -1 && PyErr_Occurred()) { channel_abort(transport, c); return -1; }
    if (!PyObject_TypeCheck(data, &RegionType) || check_slot((Region *)svc, c->slot)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "bad channel");
        channel_abort(transport, c);
        return -1;
    }
    return 1;
}

/* After a call that went well: the channel goes back on the free list or, when
 * the attachment was closed while the call ran, is freed (chans.retire(ch), as
 * ShmTransport._give_back does then).  0, or -1 with an exception set (the
 * channel was settled all the same). */
int channel_give_back(PyObject *transport, taken_channel *c) {
    PyObject *closed = PyObject_GetAttr(c->chans, s_closed);
    if (!closed || (closed == Py_False && PyList_Append(c->free, c->ch) < 0)) {   /* (out of memory) */
        Py_XDECREF(closed);
        channel_abort(transport, c);   /* which gives the channel back */
        return -1;
    }
    int rc = 0;
    if (closed != Py_False) {
        PyObject *r = PyObject_CallMethodOneArg(c->chans, s_retire, c->ch);
        if (r) Py_DECREF(r); else rc = -1;
    }
    Py_DECREF(closed);
    return rc;
}

/* An exception is pending (a signal handler's, most likely) with the channel
 * ours: transport._abort settles the channel and gives it back, and the
 * exception stays the one raised. */
void channel_abort(PyObject *transport, taken_channel *c) {
    call_keeping_error(transport, s_abort, c->chans, c->ch);
}

/* Drops the references (not the channel: give it back or abort first). */
void channel_release(taken_channel *c) {
    Py_CLEAR(c->chans); Py_CLEAR(c->free); Py_CLEAR(c->ch); Py_CLEAR(c->svc); Py_CLEAR(c->data);
}
