/* CPython-level helpers shared by dtdispatch's C files (_dispatch.c, _function.c): version shims
 * and the small mechanisms both hot paths use. No twin of its own: each helper is one Python
 * expression of the twins (named in its comment), done with the fastest exported CPython calls.
 * Included by each extension module, so each has its own copy of the state below;
 * ``dtd_shared_init`` sets it up from the module's init function. */
#ifndef DTDISPATCH_PYCOMPAT_H
#define DTDISPATCH_PYCOMPAT_H

#include <Python.h>
#include <limits.h>

/* The known-hash dict helper and _PyObject_LookupAttr are exported (non-limited API) up to 3.12.
 * On newer Pythons the plain calls are used: same results, one more hash of the key per lookup. */
#if PY_VERSION_HEX < 0x030D0000
#define DTD_KNOWN_HASH 1
#define DTD_LOOKUP_ATTR _PyObject_LookupAttr
#else
#define DTD_KNOWN_HASH 0
#define DTD_LOOKUP_ATTR PyObject_GetOptionalAttr
#endif

/* Interns ``text`` into ``var``; the module init function returns NULL when that fails. */
#define INTERN(var, text)                                                                          \
    do {                                                                                           \
        if ((var = PyUnicode_InternFromString(text)) == NULL)                                      \
            return NULL;                                                                           \
    } while (0)

/* Names and constants the helpers below use (set by dtd_shared_init). */
static PyObject *dtd_s_move_to_end, *dtd_s_active, *dtd_s_narrow, *dtd_s_clone, *dtd_s_enter,
    *dtd_s_exit, *dtd_one;

/* d.get(key) for an exact dict, with key's hash already computed. Borrowed reference; NULL with or
 * without an error set (check PyErr_Occurred). */
static inline PyObject *dtd_dict_get_known_hash(PyObject *d, PyObject *key, Py_hash_t h)
{
#if DTD_KNOWN_HASH
    return _PyDict_GetItem_KnownHash(d, key, h);
#else
    (void)h;
    return PyDict_GetItemWithError(d, key);
#endif
}

/* ``fn()`` as a truth value: 1, 0, or -1 with an error. */
static inline int dtd_call_truth(PyObject *fn)
{
    PyObject *r = PyObject_CallNoArgs(fn);
    if (r == NULL)
        return -1;
    int v = PyObject_IsTrue(r);
    Py_DECREF(r);
    return v;
}

/* ``counters[i] += 1``: an exact list of exact ints is updated in place, anything else through
 * the generic item protocol. 0, or -1 with an error. */
static inline int dtd_bump(PyObject *counters, Py_ssize_t i)
{
    if (PyList_CheckExact(counters) && PyList_GET_SIZE(counters) > i &&
        PyLong_CheckExact(PyList_GET_ITEM(counters, i))) {
        long v = PyLong_AsLong(PyList_GET_ITEM(counters, i));
        if (!(v == -1 && PyErr_Occurred()) && v < LONG_MAX) {
            PyObject *n = PyLong_FromLong(v + 1);
            if (n == NULL)
                return -1;
            PyObject *old = PyList_GET_ITEM(counters, i);
            PyList_SET_ITEM(counters, i, n);
            Py_DECREF(old);
            return 0;
        }
        PyErr_Clear();
    }
    PyObject *idx = PyLong_FromSsize_t(i), *old = NULL, *new_value = NULL;
    int rc = -1;
    if (idx == NULL)
        return -1;
    if ((old = PyObject_GetItem(counters, idx)) != NULL &&
        (new_value = PyNumber_InPlaceAdd(old, dtd_one)) != NULL)
        rc = PyObject_SetItem(counters, idx, new_value);
    Py_DECREF(idx);
    Py_XDECREF(old);
    Py_XDECREF(new_value);
    return rc;
}

/* ``getattr(explicit_local, "_active", None) is not None``: whether an
 * ExplicitRedistributionContext is active (then every implicit redistribution must be observed,
 * and may raise). 1, 0, or -1 with an error. */
static inline int dtd_explicit_active(PyObject *explicit_local)
{
    PyObject *active = NULL;
    if (DTD_LOOKUP_ATTR(explicit_local, dtd_s_active, &active) < 0)
        return -1;
    int on = active != NULL && active != Py_None;
    Py_XDECREF(active);
    return on;
}

/* ``local.narrow(dim, offset, length).clone()``: a plan's verified local chunk (the
 * communication-free Replicate -> Shard redistribution). New reference. */
static inline PyObject *dtd_local_chunk(PyObject *local, PyObject *dim, PyObject *offset,
                                        PyObject *length)
{
    PyObject *narrowed = PyObject_VectorcallMethod(
        dtd_s_narrow, (PyObject *[]){local, dim, offset, length},
        4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (narrowed == NULL)
        return NULL;
    PyObject *cloned = PyObject_VectorcallMethod(dtd_s_clone, &narrowed,
                                                 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(narrowed);
    return cloned;
}

/* This thread's memo: the tuple stored under ``name`` in the thread-state dict when it has
 * ``size`` items and item 0 is ``tag`` (the callable the memo was made from, so that a
 * re-configure is never served a stale object). Borrowed; NULL without an error when there is
 * none (or no thread-state dict), NULL with an error when the lookup failed. */
static inline PyObject *dtd_thread_memo_get(PyObject *name, PyObject *tag, Py_ssize_t size)
{
    PyObject *tsd = PyThreadState_GetDict(); /* borrowed; NULL (no error) when unavailable */
    if (tsd == NULL)
        return NULL;
    PyObject *memo = PyDict_GetItemWithError(tsd, name);
    if (memo != NULL && PyTuple_CheckExact(memo) && PyTuple_GET_SIZE(memo) == size &&
        PyTuple_GET_ITEM(memo, 0) == tag)
        return memo;
    return NULL;
}

/* The exception being raised, set aside while Python code runs. PyErr_GetRaisedException /
 * PyErr_SetRaisedException are 3.12+; the fetch/restore triple works everywhere. */
typedef struct {
    PyObject *type, *value, *tb;
} DtdSavedError;

static inline DtdSavedError dtd_save_error(void)
{
    DtdSavedError e;
    PyErr_Fetch(&e.type, &e.value, &e.tb);
    return e;
}

/* The start of ``with guard:`` (the twins' ``with c["disable_subclass"]():`` ...): __exit__
 * looked up, then __enter__() called, its result dropped. The bound __exit__ (new reference, for
 * dtd_with_exit), or NULL with an error. */
static inline PyObject *dtd_with_enter(PyObject *guard)
{
    PyObject *exit_ = PyObject_GetAttr(guard, dtd_s_exit);
    if (exit_ == NULL)
        return NULL;
    PyObject *entered = PyObject_CallMethodNoArgs(guard, dtd_s_enter);
    if (entered == NULL) {
        Py_DECREF(exit_);
        return NULL;
    }
    Py_DECREF(entered);
    return exit_;
}

/* The end of ``with guard:``: exit_(None, None, None) (exit_ is the bound __exit__, borrowed),
 * the body's exception, if any, set aside meanwhile and raised again after. 0; -1 when __exit__
 * raised: its exception replaces the body's. NOTE: None as the exception triple even when the
 * body raised: the guards used here (torch's DisableTorchFunctionSubclass, the below-autograd
 * guard) restore their state whatever they are given and never swallow an exception. */
static inline int dtd_with_exit(PyObject *exit_)
{
    DtdSavedError exc = dtd_save_error();
    PyObject *exit_args[3] = {Py_None, Py_None, Py_None};
    PyObject *exited = PyObject_Vectorcall(exit_, exit_args, 3, NULL);
    if (exited == NULL) {
        Py_XDECREF(exc.type);
        Py_XDECREF(exc.value);
        Py_XDECREF(exc.tb);
        return -1;
    }
    Py_DECREF(exited);
    PyErr_Restore(exc.type, exc.value, exc.tb);
    return 0;
}

/* HashedKey: a tuple equal to a cache key whose hash is the one already computed, the argument of
 * move_to_end (which re-hashes its argument; a key holding an op and specs costs Python-level
 * __hash__ calls). Only the object registered in dtd_hashed_key_obj answers from
 * dtd_hashed_key_value; any other instance (none is kept) hashes as a tuple. It compares equal to
 * the stored key, as a tuple. */
static PyObject *dtd_hashed_key_obj;
static Py_hash_t dtd_hashed_key_value;

static Py_hash_t dtd_hashed_key_hash(PyObject *self)
{
    if (self == dtd_hashed_key_obj)
        return dtd_hashed_key_value;
    return PyTuple_Type.tp_hash(self);
}

static PyTypeObject DtdHashedKeyType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "HashedKey", /* "<module>.HashedKey" once ready */
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A cache key (a tuple) carrying its precomputed hash for one move_to_end call.",
    .tp_hash = dtd_hashed_key_hash,
};

/* ``entries.move_to_end(key)``, with a HashedKey carrying the key's hash ``kh`` (when kh is -1 or
 * key is not an exact tuple: key itself). 0, or -1 with an error. */
static inline int dtd_move_to_end(PyObject *entries, PyObject *key, Py_hash_t kh)
{
    PyObject *probe = NULL;
    if (kh != -1 && PyTuple_CheckExact(key)) {
        Py_ssize_t n = PyTuple_GET_SIZE(key);
        probe = DtdHashedKeyType.tp_alloc(&DtdHashedKeyType, n);
        if (probe == NULL)
            return -1;
        for (Py_ssize_t i = 0; i < n; i++)
            PyTuple_SET_ITEM(probe, i, Py_NewRef(PyTuple_GET_ITEM(key, i)));
        dtd_hashed_key_obj = probe;
        dtd_hashed_key_value = kh;
    }
    PyObject *res = PyObject_VectorcallMethod(
        dtd_s_move_to_end, (PyObject *[]){entries, probe != NULL ? probe : key},
        2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (probe != NULL) {
        if (dtd_hashed_key_obj == probe)
            dtd_hashed_key_obj = NULL;
        Py_DECREF(probe);
    }
    if (res == NULL)
        return -1;
    Py_DECREF(res);
    return 0;
}

/* Sets up the state above, from the module init function; ``module_name`` names the HashedKey
 * type. 0, or -1 with an error. */
static int dtd_shared_init(const char *module_name)
{
    static char hashed_key_name[128];
    if (PyOS_snprintf(hashed_key_name, sizeof(hashed_key_name), "%s.HashedKey", module_name) >=
        (int)sizeof(hashed_key_name)) {
        PyErr_SetString(PyExc_SystemError, "module name too long");
        return -1;
    }
    if ((dtd_s_move_to_end = PyUnicode_InternFromString("move_to_end")) == NULL ||
        (dtd_s_active = PyUnicode_InternFromString("_active")) == NULL ||
        (dtd_s_narrow = PyUnicode_InternFromString("narrow")) == NULL ||
        (dtd_s_clone = PyUnicode_InternFromString("clone")) == NULL ||
        (dtd_s_enter = PyUnicode_InternFromString("__enter__")) == NULL ||
        (dtd_s_exit = PyUnicode_InternFromString("__exit__")) == NULL ||
        (dtd_one = PyLong_FromLong(1)) == NULL)
        return -1;
    DtdHashedKeyType.tp_name = hashed_key_name;
    DtdHashedKeyType.tp_base = &PyTuple_Type;
    return PyType_Ready(&DtdHashedKeyType);
}

#endif /* DTDISPATCH_PYCOMPAT_H */
