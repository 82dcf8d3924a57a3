/*
 * dtdispatch._native._function: the C hot path above dispatch (FastDTensor.__torch_function__,
 * ARCHITECTURE "The path above dispatch").
 *
 * The specification is Python: dtdispatch/_native/function.py (``configure``, ``ambient``,
 * ``build_key``, ``_entry``, ``_unwrap``, ``torch_function``, ``_step_aside``, ``_output``). Every
 * block below names the Python block it mirrors; change both together. CPython C API only: no torch
 * headers. Everything torch-specific (types, the disabled implementation, mode and grad queries,
 * guards, markers) is taken from Python at ``configure`` time. The miss (observing a call and
 * writing its plan) stays Python (dtdispatch._above.miss).
 *
 * Shortcuts whose answer is provably the twin's:
 *   - this thread's AboveCache and its containers (entries, per_func, negative, stepped_aside) are
 *     remembered in the thread-state dict, tagged with the thread_cache callable they came from.
 *     NOTE: valid because AboveCache never rebinds those attributes (it clears them in place).
 *   - ``isinstance(a, torch.Tensor)`` is skipped for exact int/float/bool/complex/str/None, which
 *     are never tensors.
 *   - the twin's ``with DisableTorchFunctionSubclass():`` around the key uses one guard object per
 *     thread (in the same thread-state memo): its __enter__/__exit__ pairs never nest, because
 *     nothing between them can re-enter this handler (torch function is off for subclasses there).
 *
 * Threading: module state is written by ``configure`` and read by the hot path, with the GIL held.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "_pycompat.h"

#ifdef Py_GIL_DISABLED
#error "dtdispatch._native._function relies on the GIL (module state and AboveCache are unlocked)"
#endif

/* Module state: mirrors _native.function._config. */
static PyObject *c_fast_type, *c_autograd_type, *c_tensor_type, *c_new, *c_disabled, *c_passthrough,
    *c_view_functions, *c_thread_cache,
    *c_miss, *c_is_compiling, *c_tf_mode, *c_dispatch_modes, *c_grad_enabled, *c_inference,
    *c_default_dtype, *c_any_autocast, *c_autocast_state, *c_disable_subclass, *c_increment_version,
    *c_below_autograd, *c_kw_marker, *c_value_marker, *c_structure_marker, *c_explicit_local,
    *c_op_dispatcher;

static PyObject *s_requires_grad, *s_spec, *s_local_tensor, *s_entries, *s_per_func, *s_negative,
    *s_stepped_aside, *s_memo_key,
    *s_mode_or_compiling, *s_unhashable, *s_kwnames_rg, *s_args, *s_kwargs, *small_one,
    *s_explicit, *s_compiling_flag, *c_compiler_module, *s_is_inference, *s_is_conj,
    *s_is_neg, *s_custom_op_handlers, *s_custom_handler, *s_base, *s_view_function;

/* Output entry kinds: mirrors _native.function.OUT_*. */
enum { OUT_NEW = 0, OUT_ARG = 1, OUT_NONE = 2, OUT_SEQ = 3, OUT_VIEW = 4 };

static struct {
    const char *name;
    PyObject **slot;
} config_names[] = {
    {"fast_type", &c_fast_type},
    {"autograd_type", &c_autograd_type},
    {"tensor_type", &c_tensor_type},
    {"new", &c_new},
    {"disabled", &c_disabled},
    {"passthrough", &c_passthrough},
    {"view_functions", &c_view_functions},
    {"thread_cache", &c_thread_cache},
    {"miss", &c_miss},
    {"is_compiling", &c_is_compiling},
    {"tf_mode", &c_tf_mode},
    {"dispatch_modes", &c_dispatch_modes},
    {"grad_enabled", &c_grad_enabled},
    {"inference", &c_inference},
    {"default_dtype", &c_default_dtype},
    {"any_autocast", &c_any_autocast},
    {"autocast_state", &c_autocast_state},
    {"disable_subclass", &c_disable_subclass},
    {"increment_version", &c_increment_version},
    {"below_autograd", &c_below_autograd},
    {"kw_marker", &c_kw_marker},
    {"value_marker", &c_value_marker},
    {"structure_marker", &c_structure_marker},
    {"explicit_local", &c_explicit_local},
    {"op_dispatcher", &c_op_dispatcher},
};
#define N_CONFIG ((Py_ssize_t)(sizeof(config_names) / sizeof(config_names[0])))

/* configure: mirrors _native.function.configure (``_config.update(config)``). */
static PyObject *fn_configure(PyObject *Py_UNUSED(module), PyObject *config)
{
    if (!PyDict_Check(config)) {
        PyErr_Format(PyExc_TypeError, "configure() expects a dict, got %s",
                     Py_TYPE(config)->tp_name);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < N_CONFIG; i++) {
        PyObject *value = PyDict_GetItemString(config, config_names[i].name); /* borrowed */
        if (value != NULL)
            Py_XSETREF(*config_names[i].slot, Py_NewRef(value));
    }
    Py_CLEAR(c_compiler_module); /* re-read from the (possibly new) is_compiling */
    Py_RETURN_NONE;
}

static int configured(void)
{
    for (Py_ssize_t i = 0; i < N_CONFIG; i++) {
        if (*config_names[i].slot == NULL) {
            PyErr_Format(PyExc_KeyError, "'%s'", config_names[i].name);
            return 0;
        }
    }
    return 1;
}

/* ---------------------------------------------------------------------------------------------- */
/* The thread's cache: (thread_cache, cache, entries, per_func, negative, stepped_aside,          */
/* guard_enter, guard_exit), memoized in the thread-state dict.                                   */
/* ---------------------------------------------------------------------------------------------- */
enum { M_TC, M_CACHE, M_ENTRIES, M_PER_FUNC, M_NEGATIVE, M_STEPPED, M_ENTER, M_EXIT, M_SIZE };

/* Borrowed reference to this thread's memo tuple (owned by the thread-state dict, or by *hold). */
static PyObject *thread_memo(PyObject **hold)
{
    *hold = NULL;
    PyObject *memo = dtd_thread_memo_get(s_memo_key, c_thread_cache, M_SIZE);
    if (memo != NULL || PyErr_Occurred())
        return memo;
    PyObject *cache = PyObject_CallNoArgs(c_thread_cache);
    if (cache == NULL)
        return NULL;
    PyObject *entries = PyObject_GetAttr(cache, s_entries);
    PyObject *per_func = entries ? PyObject_GetAttr(cache, s_per_func) : NULL;
    PyObject *negative = per_func ? PyObject_GetAttr(cache, s_negative) : NULL;
    PyObject *stepped = negative ? PyObject_GetAttr(cache, s_stepped_aside) : NULL;
    PyObject *guard = stepped ? PyObject_CallNoArgs(c_disable_subclass) : NULL;
    PyObject *enter = guard ? PyObject_GetAttr(guard, dtd_s_enter) : NULL;
    PyObject *exit_ = enter ? PyObject_GetAttr(guard, dtd_s_exit) : NULL;
    if (exit_ != NULL) {
        if (!PyDict_CheckExact(per_func) || !PyDict_CheckExact(negative) ||
            !PyDict_CheckExact(stepped) || !PyDict_Check(entries))
            PyErr_SetString(PyExc_TypeError, "AboveCache containers must be dicts");
        else
            memo = PyTuple_Pack(M_SIZE, c_thread_cache, cache, entries, per_func, negative, stepped,
                                enter, exit_);
    }
    Py_DECREF(cache);
    Py_XDECREF(entries);
    Py_XDECREF(per_func);
    Py_XDECREF(negative);
    Py_XDECREF(stepped);
    Py_XDECREF(guard);
    Py_XDECREF(enter);
    Py_XDECREF(exit_);
    if (memo == NULL)
        return NULL;
    PyObject *tsd = PyThreadState_GetDict(); /* borrowed */
    if (tsd != NULL && PyDict_SetItem(tsd, s_memo_key, memo) == 0) {
        Py_DECREF(memo); /* the dict holds it for the thread's life */
        return memo;
    }
    PyErr_Clear(); /* only the memo is lost */
    *hold = memo;
    return memo;
}

/* d[reason] = d.get(reason, 0) + 1 */
static int count_reason(PyObject *d, PyObject *reason)
{
    PyObject *old = PyDict_GetItemWithError(d, reason); /* borrowed */
    if (old == NULL && PyErr_Occurred())
        return -1;
    PyObject *n = old == NULL ? PyLong_FromLong(1) : PyNumber_Add(old, small_one);
    if (n == NULL)
        return -1;
    int rc = PyDict_SetItem(d, reason, n);
    Py_DECREF(n);
    return rc;
}

/* mirrors AboveCache.func_counters. Borrowed reference. */
static PyObject *func_counters(PyObject *per_func, PyObject *func)
{
    PyObject *counters = PyDict_GetItemWithError(per_func, func);
    if (counters != NULL || PyErr_Occurred())
        return counters;
    counters = Py_BuildValue("[iii]", 0, 0, 0);
    if (counters == NULL)
        return NULL;
    if (PyDict_SetItem(per_func, func, counters) < 0) {
        Py_DECREF(counters);
        return NULL;
    }
    Py_DECREF(counters); /* per_func holds it */
    return counters;
}

static PyObject *call_disabled(PyObject *func, PyObject *types, PyObject *args, PyObject *kwargs)
{
    PyObject *argv[4] = {func, types, args, kwargs};
    return PyObject_Vectorcall(c_disabled, argv, 4, NULL);
}

/* mirrors _native.function._step_aside */
static PyObject *step_aside(PyObject *memo, PyObject *func, PyObject *types, PyObject *args,
                            PyObject *kwargs, PyObject *reason)
{
    if (count_reason(PyTuple_GET_ITEM(memo, M_STEPPED), reason) < 0)
        return NULL;
    return call_disabled(func, types, args, kwargs);
}

/* ---------------------------------------------------------------------------------------------- */
/* Key: mirrors _native.function.build_key / _entry.                                              */
/* ---------------------------------------------------------------------------------------------- */

/* a.name() as a truth value: 1, 0, or -1 on error. */
static int call_flag(PyObject *a, PyObject *name)
{
    PyObject *argv[1] = {a};
    PyObject *r = PyObject_VectorcallMethod(name, argv, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (r == NULL)
        return -1;
    int v = PyObject_IsTrue(r);
    Py_DECREF(r);
    return v;
}

/* Append one argument's entry. Returns 0, -1 on error, or 1 with *reason set (a new reference to a
 * str: step aside). */
static int entry(PyObject *a, PyObject *key, PyObject *scalars, int grad, PyObject **reason)
{
    PyTypeObject *t = Py_TYPE(a);
    if ((PyObject *)t == c_fast_type || (PyObject *)t == c_autograd_type) {
        /* Block: FastDTensor (either role) -> (its type, spec, requires_grad, flags); autograd
         * needed -> step aside. */
        PyObject *rg = PyObject_GetAttr(a, s_requires_grad);
        if (rg == NULL)
            return -1;
        int requires_grad = PyObject_IsTrue(rg);
        if (requires_grad < 0) {
            Py_DECREF(rg);
            return -1;
        }
        if (grad && requires_grad) {
            Py_DECREF(rg);
            *reason = PyUnicode_FromString("autograd needed");
            return *reason == NULL ? -1 : 1;
        }
        PyObject *spec = PyObject_GetAttr(a, s_spec);
        int rc = spec == NULL || PyList_Append(key, (PyObject *)t) < 0 ||
                         PyList_Append(key, spec) < 0 || PyList_Append(key, rg) < 0
                     ? -1
                     : 0;
        Py_XDECREF(spec);
        Py_DECREF(rg);
        if (rc < 0)
            return -1;
        /* flags = is_inference() | is_conj() << 1 | is_neg() << 2 (the twin's NOTE says why) */
        int inf = call_flag(a, s_is_inference);
        int conj = inf < 0 ? -1 : call_flag(a, s_is_conj);
        int neg = conj < 0 ? -1 : call_flag(a, s_is_neg);
        if (neg < 0)
            return -1;
        PyObject *flags = PyLong_FromLong(inf | conj << 1 | neg << 2);
        if (flags == NULL)
            return -1;
        rc = PyList_Append(key, flags);
        Py_DECREF(flags);
        return rc;
    }
    int never_tensor = t == &PyLong_Type || t == &PyFloat_Type || t == &PyBool_Type ||
                       t == &PyComplex_Type || t == &PyUnicode_Type || a == Py_None;
    if (!never_tensor) {
        /* Block: another tensor -> "foreign tensor". */
        int is_tensor = PyObject_IsInstance(a, c_tensor_type);
        if (is_tensor < 0)
            return -1;
        if (is_tensor) {
            *reason = PyUnicode_FromString("foreign tensor");
            return *reason == NULL ? -1 : 1;
        }
        if (t == &PyList_Type || t == &PyTuple_Type) {
            /* Block: list/tuple -> (type, len, elements...). */
            PyObject *n = PyLong_FromSsize_t(Py_SIZE(a));
            if (n == NULL || PyList_Append(key, (PyObject *)t) < 0 || PyList_Append(key, n) < 0) {
                Py_XDECREF(n);
                return -1;
            }
            Py_DECREF(n);
            for (Py_ssize_t i = 0; i < Py_SIZE(a); i++) {
                /* NOTE: re-read each time: a list may change while Python code runs
                 * (isinstance). */
                if (i >= Py_SIZE(a))
                    break;
                PyObject *e = t == &PyList_Type ? PyList_GET_ITEM(a, i) : PyTuple_GET_ITEM(a, i);
                Py_INCREF(e);
                int rc = entry(e, key, scalars, grad, reason);
                Py_DECREF(e);
                if (rc != 0)
                    return rc;
            }
            return 0;
        }
        if (t == &PySlice_Type) {
            /* Block: slice -> (slice, start, stop, step entries). */
            PySliceObject *s = (PySliceObject *)a;
            PyObject *parts[3] = {s->start, s->stop, s->step};
            if (PyList_Append(key, (PyObject *)t) < 0)
                return -1;
            for (int i = 0; i < 3; i++) {
                int rc = entry(parts[i], key, scalars, grad, reason);
                if (rc != 0)
                    return rc;
            }
            return 0;
        }
    }
    /* Block: anything else -> (type, value); Python scalars' positions recorded. */
    if (PyList_Append(key, (PyObject *)t) < 0)
        return -1;
    if (t == &PyLong_Type || t == &PyFloat_Type || t == &PyBool_Type || t == &PyComplex_Type) {
        PyObject *pos = PyLong_FromSsize_t(PyList_GET_SIZE(key));
        if (pos == NULL || PyList_Append(scalars, pos) < 0) {
            Py_XDECREF(pos);
            return -1;
        }
        Py_DECREF(pos);
    }
    return PyList_Append(key, a);
}

/* mirrors _native.function.build_key: 0 with *key_out, *scalars_out set; 1 with *key_out a
 * reason str; -1.
 * The caller holds the DisableTorchFunctionSubclass guard. */
static int build_key_impl(PyObject *func, PyObject *args, PyObject *kwargs, int grad, int inference,
                          PyObject *default_dtype, PyObject *autocast, PyObject **key_out,
                          PyObject **scalars_out)
{
    *key_out = *scalars_out = NULL;
    PyObject *nargs = PyLong_FromSsize_t(PyTuple_GET_SIZE(args));
    PyObject *key = nargs ? PyList_New(6) : NULL;
    PyObject *scalars = key ? PyList_New(0) : NULL;
    PyObject *reason = NULL;
    if (scalars == NULL) {
        Py_XDECREF(nargs);
        Py_XDECREF(key);
        return -1;
    }
    PyList_SET_ITEM(key, 0, Py_NewRef(func));
    PyList_SET_ITEM(key, 1, Py_NewRef(grad ? Py_True : Py_False));
    PyList_SET_ITEM(key, 2, Py_NewRef(inference ? Py_True : Py_False));
    PyList_SET_ITEM(key, 3, Py_NewRef(default_dtype));
    PyList_SET_ITEM(key, 4, Py_NewRef(autocast));
    PyList_SET_ITEM(key, 5, nargs);
    int rc = 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args) && rc == 0; i++)
        rc = entry(PyTuple_GET_ITEM(args, i), key, scalars, grad, &reason);
    if (rc == 0 && kwargs != NULL && PyDict_GET_SIZE(kwargs) > 0) {
        if (PyList_Append(key, c_kw_marker) < 0)
            rc = -1;
        PyObject *name, *value;
        Py_ssize_t pos = 0;
        /* NOTE: kwargs is a fresh dict torch built for this call; no Python code here can change it
         * except entry()'s isinstance on exotic objects, which we accept like the twin's
         * iteration. */
        while (rc == 0 && PyDict_Next(kwargs, &pos, &name, &value)) {
            Py_INCREF(name);
            Py_INCREF(value);
            if (PyList_Append(key, name) < 0)
                rc = -1;
            else
                rc = entry(value, key, scalars, grad, &reason);
            Py_DECREF(name);
            Py_DECREF(value);
        }
    }
    if (rc == 0) {
        *key_out = key;
        *scalars_out = scalars;
        return 0;
    }
    Py_DECREF(key);
    Py_DECREF(scalars);
    if (rc == 1) {
        *key_out = reason;
        return 1;
    }
    return -1;
}

/* is_compiling(): torch.compiler.is_compiling() is ``False if torch.jit.is_scripting() else
 * _is_compiling_flag``, and scripting never runs this C code, so the module flag is read directly
 * (the function, two Python frames, is called when the flag is missing). NOTE: tied to torch
 * 2.13-2.15's is_compiling; if it ever tests more than the flag, call it instead (the twin always
 * calls it). */
static int query_compiling(void)
{
    if (c_compiler_module == NULL) {
        PyObject *globals = PyObject_GetAttrString(c_is_compiling, "__globals__");
        if (globals != NULL && PyDict_Check(globals))
            c_compiler_module = Py_NewRef(globals);
        Py_XDECREF(globals);
        PyErr_Clear();
        if (c_compiler_module == NULL)
            c_compiler_module = Py_NewRef(Py_None);
    }
    if (c_compiler_module != Py_None) {
        /* borrowed */
        PyObject *flag = PyDict_GetItemWithError(c_compiler_module, s_compiling_flag);
        if (flag != NULL)
            return PyObject_IsTrue(flag);
        if (PyErr_Occurred())
            return -1;
    }
    return dtd_call_truth(c_is_compiling);
}

/* build_key(func, args, kwargs, grad, inference, default_dtype, autocast): mirrors
 * _function.build_key (for the differential tests; the hot path calls build_key_impl under the
 * guard). */
static PyObject *fn_build_key(PyObject *Py_UNUSED(module), PyObject *const *argv, Py_ssize_t nargs)
{
    if (nargs != 7 || !PyTuple_Check(argv[1]) || (argv[2] != Py_None && !PyDict_Check(argv[2]))) {
        PyErr_SetString(
            PyExc_TypeError,
            "build_key(func, args: tuple, kwargs: dict, grad, inference, default_dtype, autocast)");
        return NULL;
    }
    if (!configured())
        return NULL;
    int grad = PyObject_IsTrue(argv[3]), inference = PyObject_IsTrue(argv[4]);
    if (grad < 0 || inference < 0)
        return NULL;
    PyObject *guard = PyObject_CallNoArgs(c_disable_subclass);
    PyObject *exit_ = guard != NULL ? dtd_with_enter(guard) : NULL;
    Py_XDECREF(guard);
    if (exit_ == NULL)
        return NULL;
    PyObject *key, *scalars;
    PyObject *kwargs = argv[2] == Py_None ? NULL : argv[2];
    int rc = build_key_impl(argv[0], argv[1], kwargs, grad, inference, argv[5], argv[6], &key,
                            &scalars);
    int exited = dtd_with_exit(exit_);
    Py_DECREF(exit_);
    if (exited < 0) {
        Py_XDECREF(key);
        Py_XDECREF(scalars);
        return NULL;
    }
    if (rc < 0)
        return NULL;
    if (rc == 1)
        return Py_BuildValue("(N[])", key);
    return Py_BuildValue("(NN)", key, scalars);
}

/* ---------------------------------------------------------------------------------------------- */
/* Replay: mirrors _native.function._unwrap and _output.                                       */
/* ---------------------------------------------------------------------------------------------- */

/* mirrors _native.function._unwrap; chunks is the plan's tuple of (flat index, dim, offset,
 * length) or
 * None. New reference. */
static PyObject *unwrap(PyObject *a, PyObject *flat, PyObject *chunks)
{
    PyTypeObject *t = Py_TYPE(a);
    if ((PyObject *)t == c_fast_type || (PyObject *)t == c_autograd_type) {
        if (PyList_Append(flat, a) < 0)
            return NULL;
        PyObject *local = PyObject_GetAttr(a, s_local_tensor);
        if (local == NULL || chunks == Py_None)
            return local;
        Py_ssize_t index = PyList_GET_SIZE(flat) - 1;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(chunks); i++) {
            PyObject *chunk = PyTuple_GET_ITEM(chunks, i);
            if (!PyTuple_Check(chunk) || PyTuple_GET_SIZE(chunk) != 4) {
                Py_DECREF(local);
                PyErr_SetString(PyExc_TypeError, "malformed replay plan chunk");
                return NULL;
            }
            Py_ssize_t chunk_index = PyLong_AsSsize_t(PyTuple_GET_ITEM(chunk, 0));
            if (chunk_index == -1 && PyErr_Occurred()) {
                Py_DECREF(local);
                return NULL;
            }
            if (chunk_index == index) {
                /* a._local_tensor.narrow(*chunk).clone() */
                PyObject *out = dtd_local_chunk(local, PyTuple_GET_ITEM(chunk, 1),
                                                PyTuple_GET_ITEM(chunk, 2),
                                                PyTuple_GET_ITEM(chunk, 3));
                Py_DECREF(local);
                return out;
            }
        }
        return local;
    }
    if (t == &PyList_Type || t == &PyTuple_Type) {
        Py_ssize_t n = Py_SIZE(a);
        PyObject *out = PyList_New(n);
        if (out == NULL)
            return NULL;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *e = t == &PyList_Type ? PyList_GET_ITEM(a, i) : PyTuple_GET_ITEM(a, i);
            Py_INCREF(e);
            PyObject *u = unwrap(e, flat, chunks);
            Py_DECREF(e);
            if (u == NULL) {
                Py_DECREF(out);
                return NULL;
            }
            PyList_SET_ITEM(out, i, u);
        }
        if (t == &PyList_Type)
            return out;
        PyObject *tuple = PyList_AsTuple(out);
        Py_DECREF(out);
        return tuple;
    }
    return Py_NewRef(a);
}

/* op(out, *rest): one recorded view op applied to out. New reference. */
static PyObject *apply_view(PyObject *step, PyObject *out)
{
    if (!PyTuple_Check(step) || PyTuple_GET_SIZE(step) != 2 ||
        !PyTuple_Check(PyTuple_GET_ITEM(step, 1))) {
        PyErr_SetString(PyExc_TypeError, "malformed replay plan view step");
        return NULL;
    }
    PyObject *op = PyTuple_GET_ITEM(step, 0), *rest = PyTuple_GET_ITEM(step, 1);
    Py_ssize_t n = PyTuple_GET_SIZE(rest);
    PyObject *small[8], **argv = small;
    if (n + 1 > 8 && (argv = PyMem_Malloc((size_t)(n + 1) * sizeof(PyObject *))) == NULL)
        return PyErr_NoMemory();
    argv[0] = out;
    for (Py_ssize_t i = 0; i < n; i++)
        argv[i + 1] = PyTuple_GET_ITEM(rest, i);
    PyObject *r = PyObject_Vectorcall(op, argv, (size_t)(n + 1), NULL);
    if (argv != small)
        PyMem_Free(argv);
    return r;
}

/* mirrors _native.function._output, its OUT_VIEW block. New reference. */
static PyObject *output_view(PyObject *data, PyObject *result)
{
    if (!PyTuple_Check(data) || PyTuple_GET_SIZE(data) != 2 ||
        !PyTuple_Check(PyTuple_GET_ITEM(data, 1))) {
        PyErr_SetString(PyExc_TypeError, "malformed replay plan view entry");
        return NULL;
    }
    PyObject *spec = PyTuple_GET_ITEM(data, 0), *views = PyTuple_GET_ITEM(data, 1);
    PyObject *base = PyObject_GetAttr(result, s_base);
    if (base == NULL)
        return NULL;
    if (base == Py_None) {
        /* NOTE: see the twin: only a local whose layout disagrees with its spec leads here. */
        Py_DECREF(base);
        PyErr_SetString(PyExc_RuntimeError, "dtdispatch: a replayed view output has no base");
        return NULL;
    }
    /* out = new(fast_type, base, spec, requires_grad=False) */
    PyObject *argv[4] = {c_fast_type, base, spec, Py_False};
    PyObject *out = PyObject_Vectorcall(c_new, argv, 3, s_kwnames_rg);
    Py_DECREF(base);
    if (out == NULL)
        return NULL;
    /* with disable_subclass(): for op, rest in views: out = op(out, *rest) */
    PyObject *guard = PyObject_CallNoArgs(c_disable_subclass);
    PyObject *exit_ = guard != NULL ? dtd_with_enter(guard) : NULL;
    Py_XDECREF(guard);
    if (exit_ == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(views) && out != NULL; i++)
        Py_SETREF(out, apply_view(PyTuple_GET_ITEM(views, i), out));
    int exited = dtd_with_exit(exit_);
    Py_DECREF(exit_);
    if (exited < 0)
        Py_CLEAR(out);
    return out;
}

/* mirrors _native.function._output. New reference. */
static PyObject *output(PyObject *entry_, PyObject *result, PyObject *flat)
{
    if (!PyTuple_CheckExact(entry_) || PyTuple_GET_SIZE(entry_) != 2) {
        PyErr_SetString(PyExc_TypeError, "malformed replay plan output entry");
        return NULL;
    }
    long kind = PyLong_AsLong(PyTuple_GET_ITEM(entry_, 0));
    PyObject *data = PyTuple_GET_ITEM(entry_, 1);
    if (kind == -1 && PyErr_Occurred())
        return NULL;
    if (kind == OUT_NEW) {
        /* new(fast_type, result, spec, requires_grad=False) */
        PyObject *argv[4] = {c_fast_type, result, data, Py_False};
        return PyObject_Vectorcall(c_new, argv, 3, s_kwnames_rg);
    }
    if (kind == OUT_ARG) {
        Py_ssize_t index = PyLong_AsSsize_t(data);
        if (index == -1 && PyErr_Occurred())
            return NULL;
        if (index < 0 || index >= PyList_GET_SIZE(flat)) {
            PyErr_SetString(PyExc_IndexError, "replay plan argument index out of range");
            return NULL;
        }
        return Py_NewRef(PyList_GET_ITEM(flat, index));
    }
    if (kind == OUT_NONE)
        Py_RETURN_NONE;
    if (kind == OUT_VIEW)
        return output_view(data, result);
    /* OUT_SEQ: container([_output(e, r) for e, r in zip(entries, result, strict=True)]) */
    if (!PyTuple_Check(data) || PyTuple_GET_SIZE(data) != 2 ||
        !PyTuple_Check(PyTuple_GET_ITEM(data, 1))) {
        PyErr_SetString(PyExc_TypeError, "malformed replay plan sequence entry");
        return NULL;
    }
    PyObject *container = PyTuple_GET_ITEM(data, 0), *entries = PyTuple_GET_ITEM(data, 1);
    PyObject *seq = PySequence_Fast(result, "replayed output is not a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(entries);
    if (PySequence_Fast_GET_SIZE(seq) != n) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "zip() arguments have different lengths");
        return NULL;
    }
    PyObject *items = PyList_New(n);
    if (items == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = output(PyTuple_GET_ITEM(entries, i), PySequence_Fast_GET_ITEM(seq, i), flat);
        if (o == NULL) {
            Py_DECREF(seq);
            Py_DECREF(items);
            return NULL;
        }
        PyList_SET_ITEM(items, i, o);
    }
    Py_DECREF(seq);
    PyObject *out = PyObject_CallOneArg(container, items);
    Py_DECREF(items);
    return out;
}

/* func(*local_args, **local_kwargs), below ADInplaceOrView when ``below``. */
static PyObject *call_local(PyObject *func, PyObject *local_args, PyObject *local_kwargs, int below)
{
    if (!below)
        return PyObject_Call(func, local_args, local_kwargs);
    PyObject *guard = PyObject_CallNoArgs(c_below_autograd);
    PyObject *exit_ = guard != NULL ? dtd_with_enter(guard) : NULL;
    Py_XDECREF(guard);
    if (exit_ == NULL)
        return NULL;
    PyObject *result = PyObject_Call(func, local_args, local_kwargs);
    int exited = dtd_with_exit(exit_);
    Py_DECREF(exit_);
    if (exited < 0)
        Py_CLEAR(result);
    return result;
}

/* Block: custom handlers. 1 when one of ops ((op, hash) pairs: TorchFunctionPlan.ops) is in
 * op_dispatcher._custom_op_handlers now, 0 when none is, -1 on error. */
static int plan_ops_handled(PyObject *ops)
{
    if (!PyTuple_Check(ops)) {
        PyErr_SetString(PyExc_TypeError, "TorchFunctionPlan.ops must be a tuple");
        return -1;
    }
    PyObject *handlers = PyObject_GetAttr(c_op_dispatcher, s_custom_op_handlers);
    if (handlers == NULL)
        return -1;
    int found = 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(ops) && found == 0; i++) {
        PyObject *pair = PyTuple_GET_ITEM(ops, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "TorchFunctionPlan.ops must hold (op, hash) pairs");
            found = -1;
            break;
        }
        PyObject *op = PyTuple_GET_ITEM(pair, 0);
        if (PyDict_CheckExact(handlers)) {
            Py_hash_t h = PyLong_AsSsize_t(PyTuple_GET_ITEM(pair, 1));
            if (h == -1 && PyErr_Occurred()) {
                found = -1;
                break;
            }
            if (dtd_dict_get_known_hash(handlers, op, h) != NULL)
                found = 1;
            else if (PyErr_Occurred())
                found = -1;
        }
        else {
            found = PySequence_Contains(handlers, op);
        }
    }
    Py_DECREF(handlers);
    return found;
}

/* Block: replay on the locals (mirrors the twin's "replay on the locals" and "wrap outputs"). The
 * caller has checked that plan is a 5-tuple and, for a plan with chunks, that no
 * explicit-redistribution context is active. */
static PyObject *replay(PyObject *plan, PyObject *func, PyObject *args, PyObject *kwargs)
{
    PyObject *flat = PyList_New(0), *local_args = NULL, *local_kwargs = NULL, *result = NULL,
             *out = NULL;
    PyObject *below_obj = NULL, *bumps = NULL, *out_entry = NULL;
    PyObject *chunks = PyTuple_GET_ITEM(plan, 3);
    if (flat == NULL)
        return NULL;
    if (chunks != Py_None && !PyTuple_Check(chunks)) {
        Py_DECREF(flat);
        PyErr_SetString(PyExc_TypeError, "TorchFunctionPlan.chunks must be a tuple or None");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if ((local_args = PyTuple_New(n)) == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *u = unwrap(PyTuple_GET_ITEM(args, i), flat, chunks);
        if (u == NULL)
            goto done;
        PyTuple_SET_ITEM(local_args, i, u);
    }
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) > 0) {
        if ((local_kwargs = PyDict_New()) == NULL)
            goto done;
        PyObject *name, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Next(kwargs, &pos, &name, &value)) {
            PyObject *u = unwrap(value, flat, chunks);
            if (u == NULL)
                goto done;
            int rc = PyDict_SetItem(local_kwargs, name, u);
            Py_DECREF(u);
            if (rc < 0)
                goto done;
        }
    }
    out_entry = Py_NewRef(PyTuple_GET_ITEM(plan, 0));
    bumps = Py_NewRef(PyTuple_GET_ITEM(plan, 1));
    below_obj = Py_NewRef(PyTuple_GET_ITEM(plan, 2));
    int below = PyObject_IsTrue(below_obj);
    if (below < 0 || (result = call_local(func, local_args, local_kwargs, below)) == NULL)
        goto done;
    /* The wrappers' counters move as stock's do: increment_version((flat[index],)) delta times. */
    if (!PyTuple_Check(bumps)) {
        PyErr_SetString(PyExc_TypeError, "TorchFunctionPlan.bumps must be a tuple");
        goto done;
    }
    for (Py_ssize_t b = 0; b < PyTuple_GET_SIZE(bumps); b++) {
        Py_ssize_t index, delta;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(bumps, b), "nn", &index, &delta))
            goto done;
        if (index < 0 || index >= PyList_GET_SIZE(flat)) {
            PyErr_SetString(PyExc_IndexError, "replay plan argument index out of range");
            goto done;
        }
        PyObject *bumped = PyTuple_Pack(1, PyList_GET_ITEM(flat, index));
        if (bumped == NULL)
            goto done;
        for (Py_ssize_t k = 0; k < delta; k++) {
            PyObject *r = PyObject_CallOneArg(c_increment_version, bumped);
            if (r == NULL) {
                Py_DECREF(bumped);
                goto done;
            }
            Py_DECREF(r);
        }
        Py_DECREF(bumped);
    }
    out = output(out_entry, result, flat);
done:
    Py_DECREF(flat);
    Py_XDECREF(local_args);
    Py_XDECREF(local_kwargs);
    Py_XDECREF(result);
    Py_XDECREF(below_obj);
    Py_XDECREF(bumps);
    Py_XDECREF(out_entry);
    return out;
}

/* ---------------------------------------------------------------------------------------------- */
/* torch_function: mirrors _native.function.torch_function block by block.                        */
/* ---------------------------------------------------------------------------------------------- */

/* One call's arguments as the twin's signature binds them: args a tuple, kwargs a dict. */
typedef struct {
    PyObject *func, *types, *args, *kwargs;
    PyObject *own_args, *own_kwargs; /* made here (released by the caller), or NULL */
} TfCall;

/* mirrors torch_function's signature (cls, func, types, args=(), kwargs=None) and its ``if kwargs
 * is None: kwargs = {}``. 0, or -1 with an error (the caller releases call->own_* either way). */
static int bind_call(PyObject *const *argv, Py_ssize_t nargs, PyObject *kwnames, TfCall *call)
{
    PyObject *args, *kwargs;
    call->own_args = call->own_kwargs = NULL;
    if (nargs < 3 || nargs > 5) {
        PyErr_Format(PyExc_TypeError,
                     "torch_function() takes 3 to 5 positional arguments (%zd given)", nargs);
        return -1;
    }
    args = nargs > 3 ? argv[3] : NULL;
    kwargs = nargs > 4 ? argv[4] : NULL;
    for (Py_ssize_t i = 0; kwnames != NULL && i < PyTuple_GET_SIZE(kwnames); i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i), *value = argv[nargs + i];
        int is_args = PyUnicode_Compare(name, s_args) == 0;
        int is_kwargs = PyUnicode_Compare(name, s_kwargs) == 0;
        if ((!is_args && !is_kwargs) || (is_args && nargs > 3) || (is_kwargs && nargs > 4)) {
            PyErr_Format(PyExc_TypeError,
                         "torch_function() got an unexpected or repeated keyword argument %R",
                         name);
            return -1;
        }
        if (is_args)
            args = value;
        else
            kwargs = value;
    }
    if (kwargs == Py_None)
        kwargs = NULL;
    if (!configured())
        return -1;
    call->func = argv[1];
    call->types = argv[2];
    if (args == NULL)
        args = call->own_args = PyTuple_New(0);
    else if (!PyTuple_Check(args))
        args = call->own_args = PySequence_Tuple(args);
    if (args == NULL)
        return -1;
    call->args = args;
    if (kwargs == NULL) {
        if ((kwargs = call->own_kwargs = PyDict_New()) == NULL)
            return -1;
    }
    else if (!PyDict_Check(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "torch_function() kwargs must be a dict");
        return -1;
    }
    call->kwargs = kwargs;
    return 0;
}

/* mirrors torch_function's "Block: step aside under compile tracing or an active mode": 1 when
 * the call must step aside, 0, or -1 with an error. */
static int mode_or_compiling(void)
{
    int compiling = query_compiling();
    if (compiling != 0)
        return compiling;
    int tf_mode = dtd_call_truth(c_tf_mode);
    if (tf_mode != 0)
        return tf_mode;
    return dtd_call_truth(c_dispatch_modes);
}

/* mirrors torch_function's "Block: key": the ambient state, then build_key under the
 * DisableTorchFunctionSubclass guard (this thread's, from the memo). 0 with *key (a tuple) and
 * *scalars; 1 with *key a reason str (step aside); -1 with an error. New references. */
static int call_key(PyObject *memo, TfCall *call, PyObject **key, PyObject **scalars)
{
    *key = *scalars = NULL;
    int grad = dtd_call_truth(c_grad_enabled);
    int inference = grad >= 0 ? dtd_call_truth(c_inference) : 0;
    if (grad < 0 || inference < 0)
        return -1;
    /* mirrors _native.function.ambient: (default dtype, autocast state or None) */
    PyObject *default_dtype = PyObject_CallNoArgs(c_default_dtype), *autocast = NULL;
    if (default_dtype == NULL)
        return -1;
    int any_autocast = dtd_call_truth(c_any_autocast);
    if (any_autocast < 0 ||
        (autocast = any_autocast ? PyObject_CallNoArgs(c_autocast_state) : Py_NewRef(Py_None)) ==
            NULL) {
        Py_DECREF(default_dtype);
        return -1;
    }
    PyObject *entered = PyObject_CallNoArgs(PyTuple_GET_ITEM(memo, M_ENTER));
    if (entered == NULL) {
        Py_DECREF(default_dtype);
        Py_DECREF(autocast);
        return -1;
    }
    Py_DECREF(entered);
    PyObject *key_list;
    int krc = build_key_impl(call->func, call->args, call->kwargs, grad, inference, default_dtype,
                             autocast, &key_list, scalars);
    Py_DECREF(default_dtype);
    Py_DECREF(autocast);
    if (dtd_with_exit(PyTuple_GET_ITEM(memo, M_EXIT)) < 0) {
        Py_XDECREF(key_list);
        Py_CLEAR(*scalars);
        return -1;
    }
    if (krc != 0) {
        *key = krc == 1 ? key_list : NULL;
        return krc;
    }
    /* key = tuple(key_list) */
    *key = PyList_AsTuple(key_list);
    Py_DECREF(key_list);
    if (*key == NULL) {
        Py_CLEAR(*scalars);
        return -1;
    }
    return 0;
}

/* mirrors torch_function's "Block: negative entry" (also the negative entry for the call's
 * structure found in "Block: miss"): counted by reason, then stock behaviour. */
static PyObject *negative_entry(PyObject *memo, TfCall *call, PyObject *counters,
                                PyObject *reason)
{
    if (dtd_bump(counters, 2) < 0 || count_reason(PyTuple_GET_ITEM(memo, M_NEGATIVE), reason) < 0)
        return NULL;
    return call_disabled(call->func, call->types, call->args, call->kwargs);
}

/* mirrors torch_function's "Block: miss": a negative entry for the call's structure (scalars by
 * type) first, else above.miss observes the call and writes its plan. */
static PyObject *miss(PyObject *memo, TfCall *call, PyObject *key, PyObject *scalars,
                      PyObject *counters)
{
    PyObject *entries = PyTuple_GET_ITEM(memo, M_ENTRIES);
    PyObject *structure = NULL, *result = NULL;
    if (PyList_GET_SIZE(scalars) > 0) {
        /* structure = [structure_marker, *key]; structure[position + 1] = value_marker */
        Py_ssize_t k = PyTuple_GET_SIZE(key);
        if ((structure = PyList_New(k + 1)) == NULL)
            return NULL;
        PyList_SET_ITEM(structure, 0, Py_NewRef(c_structure_marker));
        for (Py_ssize_t i = 0; i < k; i++)
            PyList_SET_ITEM(structure, i + 1, Py_NewRef(PyTuple_GET_ITEM(key, i)));
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(scalars); i++) {
            Py_ssize_t position = PyLong_AsSsize_t(PyList_GET_ITEM(scalars, i));
            if (position < 0 || position >= k) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_IndexError, "scalar position out of range");
                Py_DECREF(structure);
                return NULL;
            }
            PyObject *old = PyList_GET_ITEM(structure, position + 1);
            PyList_SET_ITEM(structure, position + 1, Py_NewRef(c_value_marker));
            Py_DECREF(old);
        }
        /* negative = cache.entries.get(tuple(structure)) */
        PyObject *structure_key = PyList_AsTuple(structure);
        if (structure_key == NULL) {
            Py_DECREF(structure);
            return NULL;
        }
        PyObject *negative = PyDict_GetItemWithError(entries, structure_key); /* borrowed */
        Py_DECREF(structure_key);
        if (negative == NULL && PyErr_Occurred()) {
            Py_DECREF(structure);
            return NULL;
        }
        if (negative != NULL) {
            Py_DECREF(structure);
            return negative_entry(memo, call, counters, negative);
        }
    }
    /* counters[1] += 1; return c["miss"](cache, func, types, args, kwargs, key, structure) */
    if (dtd_bump(counters, 1) == 0) {
        PyObject *miss_argv[7] = {PyTuple_GET_ITEM(memo, M_CACHE), call->func, call->types,
                                  call->args, call->kwargs, key,
                                  structure != NULL ? structure : Py_None};
        result = PyObject_Vectorcall(c_miss, miss_argv, 7, NULL);
    }
    Py_XDECREF(structure);
    return result;
}

/* mirrors torch_function's "Block: custom handlers" and the explicit-redistribution check of
 * "Block: replay on the locals", then replays (``replay``) a hit on a replay plan. */
static PyObject *hit(PyObject *memo, TfCall *call, PyObject *plan, PyObject *counters)
{
    /* TorchFunctionPlan is a NamedTuple (out, bumps, below, chunks, ops). */
    if (!PyTuple_Check(plan) || PyTuple_GET_SIZE(plan) != 5) {
        PyErr_SetString(PyExc_TypeError, "a replay plan must be an _above.TorchFunctionPlan");
        return NULL;
    }
    /* Custom handlers are read live: see the twin. */
    int handled = plan_ops_handled(PyTuple_GET_ITEM(plan, 4));
    if (handled != 0)
        return handled > 0 ? step_aside(memo, call->func, call->types, call->args, call->kwargs,
                                        s_custom_handler)
                           : NULL;
    if (dtd_bump(counters, 0) < 0)
        return NULL;
    if (PyTuple_GET_ITEM(plan, 3) != Py_None) {
        /* Under ExplicitRedistributionContext every implicit redistribution must be observed (and
         * may raise): the dispatch path handles it. */
        int explicit_ = dtd_explicit_active(c_explicit_local);
        if (explicit_ != 0)
            return explicit_ > 0 ? step_aside(memo, call->func, call->types, call->args,
                                              call->kwargs, s_explicit)
                                 : NULL;
    }
    return replay(plan, call->func, call->args, call->kwargs);
}

/* mirrors torch_function: the blocks in the twin's order (pass-through, step aside, key, lookup;
 * then miss, negative entry or a hit). */
static PyObject *fn_torch_function(PyObject *Py_UNUSED(module), PyObject *const *argv,
                                   Py_ssize_t nargsf, PyObject *kwnames)
{
    TfCall call;
    PyObject *result = NULL, *hold = NULL, *key = NULL, *scalars = NULL;
    if (bind_call(argv, PyVectorcall_NARGS(nargsf), kwnames, &call) < 0)
        goto out;
    /* Block: pass-through. */
    int pass = PyDict_Contains(c_passthrough, call.func);
    if (pass != 0) {
        if (pass > 0)
            result = call_disabled(call.func, call.types, call.args, call.kwargs);
        goto out;
    }
    /* Block: step aside under compile tracing or an active mode. */
    PyObject *memo = thread_memo(&hold);
    if (memo == NULL)
        goto out;
    int modes = mode_or_compiling();
    if (modes != 0) {
        if (modes > 0)
            result = step_aside(memo, call.func, call.types, call.args, call.kwargs,
                                s_mode_or_compiling);
        goto out;
    }
    /* Block: step aside for a view function. */
    int view = PySet_Contains(c_view_functions, call.func);
    if (view != 0) {
        if (view > 0)
            result = step_aside(memo, call.func, call.types, call.args, call.kwargs,
                                s_view_function);
        goto out;
    }
    /* Block: key. */
    int krc = call_key(memo, &call, &key, &scalars);
    if (krc != 0) {
        if (krc > 0)
            result = step_aside(memo, call.func, call.types, call.args, call.kwargs, key);
        goto out;
    }
    /* Block: lookup (an unhashable key: the twin's TypeError from entries.get). */
    PyObject *entries = PyTuple_GET_ITEM(memo, M_ENTRIES);
    Py_hash_t kh = PyObject_Hash(key);
    PyObject *plan = kh == -1 ? NULL : dtd_dict_get_known_hash(entries, key, kh); /* borrowed */
    if (plan == NULL && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            result = step_aside(memo, call.func, call.types, call.args, call.kwargs,
                                s_unhashable);
        }
        goto out;
    }
    PyObject *counters = func_counters(PyTuple_GET_ITEM(memo, M_PER_FUNC), call.func);
    if (counters == NULL)
        goto out;
    if (plan == NULL) {
        result = miss(memo, &call, key, scalars, counters);
        goto out;
    }
    Py_INCREF(plan);
    if (dtd_move_to_end(entries, key, kh) == 0) {
        if (PyUnicode_CheckExact(plan))
            result = negative_entry(memo, &call, counters, plan);
        else
            result = hit(memo, &call, plan, counters);
    }
    Py_DECREF(plan);
out:
    Py_XDECREF(key);
    Py_XDECREF(scalars);
    Py_XDECREF(hold);
    Py_XDECREF(call.own_args);
    Py_XDECREF(call.own_kwargs);
    return result;
}

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)fn_configure, METH_O,
     "configure(config: dict) -> None\n\n"
     "Hand over what the hot path needs (see _native.function.configure)."},
    {"build_key", (PyCFunction)(void (*)(void))fn_build_key, METH_FASTCALL,
     "build_key(func, args, kwargs, grad, inference, default_dtype, autocast)"
     " -> (key list | reason, scalar positions)"},
    {"torch_function", (PyCFunction)(void (*)(void))fn_torch_function,
     METH_FASTCALL | METH_KEYWORDS,
     "FastDTensor.__torch_function__ (installed as a classmethod): "
     "see _native.function.torch_function."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef function_module = {
    PyModuleDef_HEAD_INIT, "dtdispatch._native._function",
    "The C hot path above dispatch; its Python twin is dtdispatch._native.function.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__function(void)
{
    INTERN(s_requires_grad, "requires_grad");
    INTERN(s_spec, "_spec");
    INTERN(s_custom_op_handlers, "_custom_op_handlers");
    INTERN(s_custom_handler, "custom handler");
    INTERN(s_local_tensor, "_local_tensor");
    INTERN(s_entries, "entries");
    INTERN(s_per_func, "per_func");
    INTERN(s_negative, "negative");
    INTERN(s_stepped_aside, "stepped_aside");
    INTERN(s_memo_key, "dtdispatch._native._function.thread_cache");
    INTERN(s_mode_or_compiling, "mode or compiling");
    INTERN(s_view_function, "view function");
    INTERN(s_unhashable, "unhashable argument");
    INTERN(s_compiling_flag, "_is_compiling_flag");
    INTERN(s_explicit, "explicit redistribution context");
    INTERN(s_args, "args");
    INTERN(s_kwargs, "kwargs");
    INTERN(s_is_inference, "is_inference");
    INTERN(s_is_conj, "is_conj");
    INTERN(s_is_neg, "is_neg");
    INTERN(s_base, "_base");
    if ((s_kwnames_rg = Py_BuildValue("(s)", "requires_grad")) == NULL ||
        (small_one = PyLong_FromLong(1)) == NULL)
        return NULL;
    if (dtd_shared_init(function_module.m_name) < 0)
        return NULL;
    return PyModule_Create(&function_module);
}
