/*
 * The Python side as C sees it: the interned names of names.h, reading
 * attributes of Python objects, and calling a Python hook with an exception
 * pending.
 */
#include "core.h"

#define DEFINE_NAME(owner, var, text) PyObject *var;
PYTHON_NAMES(DEFINE_NAME)
#undef DEFINE_NAME

int names_init(void) {
#define INTERN(owner, var, text) if (!(var = PyUnicode_InternFromString(text))) return -1;
    PYTHON_NAMES(INTERN)
#undef INTERN
    return 0;
}

/* An int attribute; -1 with an exception set when it is missing or not an int. */
long long int_attr(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (!v) return -1;
    long long r = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return r;
}

/* A size limit attribute (a non-negative int of any size, clamped to 2**64-1); -1 on error. */
int size_attr(PyObject *obj, PyObject *name, uint64_t *out) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (!v) return -1;
    unsigned long long r = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if (r == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
        PyErr_Clear();   /* above 2**64-1 (no limit, in effect); a negative one never comes from the parser */
    }
    *out = r;
    return 0;
}

/* obj.<name>(a, b) with an exception pending (a signal handler's, most likely),
 * which stays the one raised: what the call itself raises is written as
 * unraisable, since the first exception is what the caller must see. */
void call_keeping_error(PyObject *obj, PyObject *name, PyObject *a, PyObject *b) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *r = PyObject_CallMethodObjArgs(obj, name, a, b, NULL);
    if (r) Py_DECREF(r);
    else PyErr_WriteUnraisable(obj);
    PyErr_Restore(type, value, tb);
}
