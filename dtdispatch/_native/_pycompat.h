/* CPython-version shims shared by dtdispatch's C files (_dispatch.c, _function.c). No twin: nothing
 * here decides anything, it only picks the fastest exported CPython call for the running version. */
#ifndef DTDISPATCH_PYCOMPAT_H
#define DTDISPATCH_PYCOMPAT_H

#include <Python.h>

/* The known-hash dict helper and _PyObject_LookupAttr are exported (non-limited API) up to 3.12. On
 * newer Pythons the plain calls are used: same results, one more hash of the key per lookup. */
#if PY_VERSION_HEX < 0x030D0000
#define DTD_KNOWN_HASH 1
#define DTD_LOOKUP_ATTR _PyObject_LookupAttr
#else
#define DTD_KNOWN_HASH 0
#define DTD_LOOKUP_ATTR PyObject_GetOptionalAttr
#endif

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

#endif /* DTDISPATCH_PYCOMPAT_H */
