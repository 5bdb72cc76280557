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

static int add_name(PyObject *table, const char *owner, PyObject *name) {
    PyObject *names = PyDict_GetItemString(table, owner);   /* borrowed */
    if (!names) {
        if (!(names = PyList_New(0))) return -1;
        int rc = PyDict_SetItemString(table, owner, names);
        Py_DECREF(names);   /* (the table holds it) */
        if (rc < 0) return -1;
    }
    return PyList_Append(names, name);
}

/* The table of names.h for Python: a read-only {owner: (name, ...)} (after names_init). */
PyObject *names_table(void) {
    PyObject *table = PyDict_New(), *owner, *names;
    if (!table) return NULL;
#define ADD_NAME(owner, var, text) if (add_name(table, owner, var) < 0) goto fail;
    PYTHON_NAMES(ADD_NAME)
#undef ADD_NAME
    Py_ssize_t pos = 0;
    while (PyDict_Next(table, &pos, &owner, &names)) {   /* (replacing values keeps the iteration valid) */
        PyObject *tuple = PyList_AsTuple(names);
        if (!tuple || PyDict_SetItem(table, owner, tuple) < 0) { Py_XDECREF(tuple); goto fail; }
        Py_DECREF(tuple);
    }
    PyObject *proxy = PyDictProxy_New(table);
    Py_DECREF(table);
    return proxy;
fail:
    Py_DECREF(table);
    return NULL;
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
