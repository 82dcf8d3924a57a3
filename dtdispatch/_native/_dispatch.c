/*
 * dtdispatch._native._dispatch: the C hot path of dtdispatch (ARCHITECTURE "Layers", "Native
 * part").
 *
 * The specification is Python: dtdispatch/_native/dispatch.py (``configure``, ``dispatch``,
 * ``_wrap``) and dtdispatch/cache.py (``build_key`` and its helpers, ``ThreadCache.op_counters``).
 * Every block below names the Python block it mirrors; change both together. CPython C API only: no
 * torch headers, no libtorch, so it builds in seconds and does not depend on the torch version.
 * Everything torch-specific (types, op sets, the schema registry, marker objects, output kinds) is
 * taken from Python at ``configure`` time (or on first use); no op name appears here.
 *
 * Behaviour contract: for every input each function returns what its twin returns (keys ==, same
 * hash) and raises where its twin raises. The C only adds shortcuts whose answer is provably the
 * twin's:
 *   - ``isinstance`` answered from the type's MRO when the object's ``__class__`` cannot differ
 *     from its type (``is_instance``); otherwise the real ``PyObject_IsInstance``.
 *   - ``obj.attr`` for ``__slots__`` attributes (DispatchPlan, ThreadCache, DTensor) read from the
 *     slot
 *     when the object's type resolves the name to the very member descriptor seen at load
 *     (``slot_get``); otherwise (or when the slot is empty) the real ``PyObject_GetAttr``.
 *   - ``hash(op)`` (OpOverload.__hash__ is a Python function, ~0.25 us a call) computed once per op
 *     object (``op_hash``) and reused through the known-hash dict API; frozensets of ops are
 *     mirrored as dicts.
 *   - the key's hash computed once per call with CPython's tuple-hash algorithm (self-checked at
 *     load) and used for the lookup and for ``move_to_end`` (``key_hash``, ``HashedKey``).
 *   - ``OpOverload.__call__`` (``return self._op(*args, **kwargs)``) skipped by calling ``_op``
 *     directly, only when the op's type really resolves ``__call__`` to that function.
 *   - this thread's ThreadCache remembered in the thread-state dict (``get_thread_cache``).
 * Where the C meets something its fast code does not model (a list subclass with its own
 * ``__iter__``, a kwargs object that is not a dict, an exception from a Python-level call while
 * building a key ...), it hands the whole ``build_key`` to the Python twin (cache.build_key), so
 * the result, or the exception, is by construction the twin's.
 *
 * Threading: all module state below is written by ``configure`` / ``load_cache_names`` and read by
 * the hot path, always with the GIL held (free-threaded builds are not supported: see setup.py /
 * the module guard). Per-thread data (the plan cache and its counters) lives in the ThreadCache
 * object that dtdispatch.cache.thread_cache() returns for the calling thread: each ThreadCache is
 * only touched by its own thread, under the GIL.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "_pycompat.h"
#include <stdint.h>
#include <string.h>
#if PY_VERSION_HEX < 0x030C0000
#include <structmember.h> /* T_OBJECT_EX */
#define DTD_T_OBJECT_EX T_OBJECT_EX
#else
#define DTD_T_OBJECT_EX Py_T_OBJECT_EX
#endif

#ifdef Py_GIL_DISABLED
#error "dtdispatch._native._dispatch relies on the GIL (module state and ThreadCache are unlocked)"
#endif

/* ---------------------------------------------------------------------------------------------- */
/* Module state. Protected by the GIL; written by configure / load_cache_names only.              */
/* ---------------------------------------------------------------------------------------------- */

/* mirrors _native.dispatch._config: what configure() receives from _dispatcher.install()
 * (NULL: never given;
 * the use site raises the twin's KeyError). */
static PyObject *cfg_slow_path;      /* c["slow_path"] */
static PyObject *cfg_op_dispatcher;  /* c["op_dispatcher"]: _custom_op_handlers read per call */
static PyObject *cfg_dtensor_type;   /* c["dtensor_type"] */
static PyObject *cfg_tensor_type;    /* c["tensor_type"] */
static PyObject *cfg_fast_type;      /* c["fast_type"] */
static PyObject *cfg_autograd_type;  /* c["autograd_type"] */
static PyObject *cfg_grad_enabled;   /* c["grad_enabled"] */
static PyObject *cfg_graph_task_id;  /* c["graph_task_id"] */
static PyObject *cfg_new;            /* c["new"]: torch.Tensor._dtensor__new__ */
static PyObject *cfg_thread_cache;   /* c["thread_cache"] */
static PyObject *cfg_unsafe_set;     /* c["unsafe_set"]: torch._functionalize_unsafe_set */
static PyObject *cfg_explicit_local; /* c["explicit_local"]: ExplicitRedistributionContext._local */
/* c["torch_function_mode_enabled"]: torch._C._is_torch_function_mode_enabled */
static PyObject *cfg_tf_mode_enabled;
static int dtensor_check_is_plain;   /* type(dtensor_type) keeps type.__instancecheck__ */
static int tensor_cfg_check_is_plain;

/* From dtdispatch.cache (what cache.build_key uses), loaded once by load_cache_names(). */
static int cache_loaded;
static PyObject *cache_dict;           /* cache.__dict__: _VALUE_FREE_OPS is read per call */
static PyObject *tensor_type;          /* torch.Tensor (cache.py's ``torch.Tensor``) */
static PyObject *key_dtensor_type;     /* DTensor as cache.py imports it */
static PyObject *kwarg_separator;      /* cache.KWARGS_MARKER, compared/stored by identity */
static PyObject *list_marker;          /* cache._LIST */
static PyObject *scalar_tensor_marker; /* cache._SCALAR_TENSOR */
static PyObject *unkeyed_marker;       /* cache._UNKEYED */
static PyObject *default_schema_info;  /* cache._DEFAULT_SCHEMA_INFO */
static PyObject *schema_dict;          /* cache._propagator.op_to_schema_info */
/* cache._compat.single_dim_schema_infos ({} where torch has none) */
static PyObject *schema_dict_single;
static PyObject *py_build_key;         /* cache.build_key: the twin, for what C does not model */
static PyObject *thread_cache_type;    /* cache.ThreadCache: op_counters inlined for exactly it */
static PyObject *value_free_src;       /* the _VALUE_FREE_OPS object value_free_dict mirrors */
static PyObject *value_free_dict;      /* value_free_src as a dict, or NULL: not a frozenset */
static PyObject *kind_inplace, *kind_out, *kind_view; /* cache.INPLACE / OUT / VIEW */
static PyObject *opoverload_type;      /* torch._ops.OpOverload (hash memo, __call__ shortcut) */
static PyObject *opoverload_call;      /* OpOverload.__call__ (the function object), or NULL */
static PyObject *spec_type;            /* DTensorSpec */
/* DTensorSpec.__hash__ (``return self._hash`` once computed), or NULL */
static PyObject *spec_hash_fn;
static PyObject *meta_type;            /* TensorMeta (a NamedTuple) */
static PyObject *meta_shape_descr;     /* TensorMeta.shape: the getter of field meta_shape_index */
static Py_ssize_t meta_shape_index;
static int tensor_check_is_plain;      /* type(torch.Tensor) keeps type.__instancecheck__ */
static int key_dtensor_check_is_plain; /* type(DTensor) keeps type.__instancecheck__ */
static int own_tuple_hash_ok;          /* key_hash reproduces tuple.__hash__ (checked at load) */

/* Looked up once at module init. */
static PyObject *odict_type;           /* collections.OrderedDict: its .get is dict's */
static PyObject *object_class_descr;   /* object.__dict__["__class__"] */
static PyObject *small_one, *small_zero, *empty_tuple;

/* Interned attribute / method names. */
static PyObject *s_local_tensor, *s_spec, *s_tensor_meta, *s_shape, *s_entries, *s_fast, *s_reason,
    *s_op_call, *s_output_spec, *s_requires_grad, *s_per_op, *s_op, *s_numel, *s_ndim, *s_stride,
    *s_dtype, *s_get, *s_op_counters, *s_static_argnum, *s_static_kwargkey, *s_class,
    *s_call_dunder, *s_hash_dunder, *s_hash_attr, *s_value_free_ops, *s_chunks, *s_needs_pytree,
    *s_rewritten_args, *s_kind, *s_out_names, *s_alias_pairs, *s_local_call, *s_tc_key,
    *s_custom_handler, *s_no_key, *s_miss, *s_custom_op_handlers, *s_explicit_reason;

/* ---------------------------------------------------------------------------------------------- */
/* Small helpers                                                                                  */
/* ---------------------------------------------------------------------------------------------- */

/* True when obj.__class__ is type(obj) for every instance of tp: attribute lookup is the generic
 * one and the __class__ found on the type is object's descriptor. Then object.__instancecheck__'s
 * __class__ fallback can never change an MRO-based answer. (_PyType_Lookup uses the type attribute
 * cache: a few ns.) */
static int honest_class(PyTypeObject *tp)
{
    return tp->tp_getattro == PyObject_GenericGetAttr &&
           _PyType_Lookup(tp, s_class) == object_class_descr;
}

/* isinstance(obj, cls), exactly. ``plain`` says cls's metaclass keeps type.__instancecheck__. */
static int is_instance(PyObject *obj, PyObject *cls, int plain)
{
    if (plain) {
        if (PyObject_TypeCheck(obj, (PyTypeObject *)cls))
            return 1;
        if (honest_class(Py_TYPE(obj)))
            return 0;
    }
    return PyObject_IsInstance(obj, cls);
}

/* isinstance(obj, builtin) for an exact builtin type (list / tuple): no metaclass to consult. */
static int is_instance_builtin(PyObject *obj, PyTypeObject *builtin)
{
    if (PyObject_TypeCheck(obj, builtin))
        return 1;
    if (honest_class(Py_TYPE(obj)))
        return 0;
    return PyObject_IsInstance(obj, (PyObject *)builtin);
}

/* type(cls).__instancecheck__ is type.__instancecheck__ (then is_instance may use the MRO). */
static int plain_instancecheck(PyObject *cls)
{
    if (cls == NULL || !PyType_Check(cls))
        return 0;
    PyObject *ic = PyObject_GetAttrString((PyObject *)Py_TYPE(cls), "__instancecheck__");
    PyObject *tic = PyObject_GetAttrString((PyObject *)&PyType_Type, "__instancecheck__");
    int plain = ic != NULL && tic != NULL && PyObject_RichCompareBool(ic, tic, Py_EQ) == 1;
    Py_XDECREF(ic);
    Py_XDECREF(tic);
    PyErr_Clear();
    return plain;
}

/* obj.name for a __slots__ attribute. ``descr`` is the member descriptor found on the owning class
 * at load; when obj's type resolves ``name`` to that very descriptor with the generic getattr, the
 * value is the slot (what the descriptor's __get__ returns). Empty slot, other type:
 * PyObject_GetAttr (its AttributeError, its __getattr__). New reference. */
typedef struct {
    PyObject *descr;
    Py_ssize_t offset;
} SlotAttr;

static SlotAttr sa_local_tensor, sa_spec, sa_entries, sa_per_op, sa_fast, sa_reason, sa_chunks,
    sa_needs_pytree, sa_rewritten_args, sa_op_call, sa_kind, sa_output_spec, sa_out_names,
    sa_alias_pairs, sa_local_call;

static void slot_init(SlotAttr *a, PyObject *owner, PyObject *name)
{
    Py_CLEAR(a->descr);
    if (owner == NULL || !PyType_Check(owner))
        return;
    PyObject *d = _PyType_Lookup((PyTypeObject *)owner, name);
    if (d != NULL && Py_IS_TYPE(d, &PyMemberDescr_Type)) {
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type == DTD_T_OBJECT_EX) {
            a->descr = Py_NewRef(d);
            a->offset = m->offset;
        }
    }
}

static inline PyObject *slot_get(PyObject *obj, const SlotAttr *a, PyObject *name)
{
    PyTypeObject *tp = Py_TYPE(obj);
    if (a->descr != NULL && tp->tp_getattro == PyObject_GenericGetAttr &&
        _PyType_Lookup(tp, name) == a->descr) {
        PyObject *v = *(PyObject **)((char *)obj + a->offset);
        if (v != NULL)
            return Py_NewRef(v);
    }
    return PyObject_GetAttr(obj, name);
}

#define GET_SLOT(obj, field) slot_get((obj), &sa_##field, s_##field)

/* hash(op), computed once per OpOverload object. OpOverload.__hash__ is ``hash(self._op)``, a
 * builtin that never changes, so the value is stable; the memo holds a strong reference so a slot's
 * pointer is never reused by another object. Direct-mapped by address; a collision just recomputes.
 * Other types of ``op`` (only seen when build_key is called directly) are hashed every time. */
#define OP_MEMO_SIZE 512
static struct {
    PyObject *op;
    Py_hash_t hash;
} op_memo[OP_MEMO_SIZE];

static Py_hash_t op_hash(PyObject *op)
{
    if (opoverload_type == NULL || (PyObject *)Py_TYPE(op) != opoverload_type)
        return PyObject_Hash(op);
    size_t slot = ((uintptr_t)op >> 4) & (OP_MEMO_SIZE - 1);
    if (op_memo[slot].op == op)
        return op_memo[slot].hash;
    Py_hash_t h = PyObject_Hash(op);
    if (h == -1)
        return -1;
    Py_INCREF(op);
    Py_XSETREF(op_memo[slot].op, op);
    op_memo[slot].hash = h;
    return h;
}

/* A frozenset of ops mirrored as {op: None} so membership can use the precomputed hash. */
static PyObject *frozenset_as_dict(PyObject *set)
{
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
#if DTD_KNOWN_HASH
    Py_ssize_t pos = 0;
    PyObject *item;
    Py_hash_t h;
    while (_PySet_NextEntry(set, &pos, &item, &h)) {
        if (_PyDict_SetItem_KnownHash(d, item, Py_None, h) < 0) {
            Py_DECREF(d);
            return NULL;
        }
    }
#else
    PyObject *it = PyObject_GetIter(set), *item;
    if (it == NULL) {
        Py_DECREF(d);
        return NULL;
    }
    while ((item = PyIter_Next(it)) != NULL) {
        int rc = PyDict_SetItem(d, item, Py_None);
        Py_DECREF(item);
        if (rc < 0)
            break;
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) {
        Py_DECREF(d);
        return NULL;
    }
#endif
    return d;
}

/* ``op in container`` where ``as_dict`` is container mirrored as a dict (or NULL: generic
 * containment). */
static int contains_op(PyObject *container, PyObject *as_dict, PyObject *op, Py_hash_t h)
{
    if (as_dict != NULL) {
        if (dtd_dict_get_known_hash(as_dict, op, h) != NULL)
            return 1;
        return PyErr_Occurred() ? -1 : 0;
    }
    return PySequence_Contains(container, op);
}

/* A list/tuple whose len() and iteration are the builtin ones, so PySequence_Fast_ITEMS sees
 * exactly what ``for e in seq`` / ``len(seq)`` see (exact list/tuple, torch.Size, structseq,
 * namedtuples ...). */
static int plain_sequence(PyObject *o)
{
    PyTypeObject *tp = Py_TYPE(o);
    if (tp == &PyList_Type || tp == &PyTuple_Type)
        return 1;
    PyTypeObject *base = PyList_Check(o) ? &PyList_Type : PyTuple_Check(o) ? &PyTuple_Type : NULL;
    if (base == NULL)
        return 0;
    return tp->tp_iter == base->tp_iter && tp->tp_as_sequence != NULL &&
           tp->tp_as_sequence->sq_length == base->tp_as_sequence->sq_length &&
           (tp->tp_as_mapping == NULL || tp->tp_as_mapping->mp_length == NULL ||
            tp->tp_as_mapping->mp_length == base->tp_as_mapping->mp_length);
}

/* Argument parsing with Python-function semantics (positional or keyword, defaults for the
 * tail). */
static int parse_args(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                      const char *const *names, Py_ssize_t nnames, Py_ssize_t nrequired,
                      PyObject **out)
{
    if (nargs > nnames) {
        PyErr_Format(PyExc_TypeError,
                     "%s() takes from %zd to %zd positional arguments but %zd were given", fname,
                     nrequired, nnames, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nnames; i++)
        out[i] = i < nargs ? args[i] : NULL;
    if (kwnames != NULL) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t k = 0; k < nkw; k++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, k);
            Py_ssize_t i;
            for (i = 0; i < nnames; i++)
                if (PyUnicode_CompareWithASCIIString(name, names[i]) == 0)
                    break;
            if (i == nnames) {
                PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", fname,
                             name);
                return -1;
            }
            if (out[i] != NULL) {
                PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fname,
                             names[i]);
                return -1;
            }
            out[i] = args[nargs + k];
        }
    }
    for (Py_ssize_t i = 0; i < nrequired; i++) {
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument: '%s'", fname, names[i]);
            return -1;
        }
    }
    return 0;
}

/* A growable array of owned references: the key under construction, or the unwrapped locals. */
typedef struct {
    PyObject **items;
    Py_ssize_t len, cap;
    PyObject *inline_items[32];
} ObjBuf;

static void buf_init(ObjBuf *b)
{
    b->items = b->inline_items;
    b->len = 0;
    b->cap = (Py_ssize_t)(sizeof(b->inline_items) / sizeof(b->inline_items[0]));
}

/* Steals ``o`` (also on failure); a NULL ``o`` is a failure already reported. */
static int buf_push(ObjBuf *b, PyObject *o)
{
    if (o == NULL)
        return -1;
    if (b->len == b->cap) {
        Py_ssize_t cap = b->cap * 2;
        PyObject **items = PyMem_Malloc((size_t)cap * sizeof(PyObject *));
        if (items == NULL) {
            Py_DECREF(o);
            PyErr_NoMemory();
            return -1;
        }
        memcpy(items, b->items, (size_t)b->len * sizeof(PyObject *));
        if (b->items != b->inline_items)
            PyMem_Free(b->items);
        b->items = items;
        b->cap = cap;
    }
    b->items[b->len++] = o;
    return 0;
}

static void buf_clear(ObjBuf *b)
{
    for (Py_ssize_t i = 0; i < b->len; i++)
        Py_DECREF(b->items[i]);
    if (b->items != b->inline_items)
        PyMem_Free(b->items);
    buf_init(b);
}

/* ``items[start:]`` moved into a new tuple (the buffer keeps items[:start]). */
static PyObject *buf_to_tuple(ObjBuf *b, Py_ssize_t start)
{
    PyObject *t = PyTuple_New(b->len - start);
    if (t == NULL)
        return NULL;
    for (Py_ssize_t i = start; i < b->len; i++)
        PyTuple_SET_ITEM(t, i - start, b->items[i]);
    b->len = start;
    return t;
}

/* ---------------------------------------------------------------------------------------------- */
/* The key's hash: CPython's tuple hash (xxHash-style lanes), with cheap lanes for the two        */
/* Python-level __hash__ methods a key holds: the op (memoized, op_hash) and DTensorSpec (its     */
/* cached ``_hash``).                                                                             */
/* ---------------------------------------------------------------------------------------------- */

#if SIZEOF_PY_UHASH_T > 4
#define XXPRIME_1 ((Py_uhash_t)11400714785074694791ULL)
#define XXPRIME_2 ((Py_uhash_t)14029467366897019727ULL)
#define XXPRIME_5 ((Py_uhash_t)2870177450012600261ULL)
#define XXROTATE(x) ((x << 31) | (x >> 33))
#else
#define XXPRIME_1 ((Py_uhash_t)2654435761UL)
#define XXPRIME_2 ((Py_uhash_t)2246822519UL)
#define XXPRIME_5 ((Py_uhash_t)374761393UL)
#define XXROTATE(x) ((x << 13) | (x >> 19))
#endif

/* hash(item), exactly. DTensorSpec.__hash__ is ``if self._hash is None: self._hash = ...; return
 * self._hash``: when the cached value is an int, hash(spec) is that int as slot_tp_hash converts
 * it. */
static Py_hash_t item_hash(PyObject *item)
{
    PyTypeObject *tp = Py_TYPE(item);
    if ((PyObject *)tp == opoverload_type)
        return op_hash(item);
    if ((PyObject *)tp == spec_type && spec_hash_fn != NULL &&
        _PyType_Lookup(tp, s_hash_dunder) == spec_hash_fn) {
        PyObject *cached = PyObject_GetAttr(item, s_hash_attr);
        if (cached == NULL) {
            PyErr_Clear();
        } else if (PyLong_Check(cached)) {
            Py_hash_t h = PyLong_AsSsize_t(cached);
            if (h == -1 && PyErr_Occurred()) {
                PyErr_Clear();
                h = PyLong_Type.tp_hash(cached);
            }
            Py_DECREF(cached);
            return h == -1 ? -2 : h;
        } else {
            Py_DECREF(cached);
        }
    }
    return PyObject_Hash(item);
}

static Py_hash_t tuple_hash_of(PyObject *const *items, Py_ssize_t len,
                               Py_hash_t (*lane_hash)(PyObject *))
{
    Py_uhash_t acc = XXPRIME_5;
    for (Py_ssize_t i = 0; i < len; i++) {
        Py_uhash_t lane = (Py_uhash_t)lane_hash(items[i]);
        if (lane == (Py_uhash_t)-1)
            return -1;
        acc += lane * XXPRIME_2;
        acc = XXROTATE(acc);
        acc *= XXPRIME_1;
    }
    acc += (Py_uhash_t)len ^ (XXPRIME_5 ^ 3527539UL);
    if (acc == (Py_uhash_t)-1)
        return 1546275796;
    return (Py_hash_t)acc;
}

/* hash(key) for a key tuple. */
static Py_hash_t key_hash(PyObject *key)
{
    if (!own_tuple_hash_ok)
        return PyObject_Hash(key);
    return tuple_hash_of(&PyTuple_GET_ITEM(key, 0), PyTuple_GET_SIZE(key), item_hash);
}

/* The load-time check that tuple_hash_of is CPython's tuple hash. */
static int check_tuple_hash(void)
{
    PyObject *sample = Py_BuildValue("(Oidns(is)O)", Py_None, 7, 0.5, (Py_ssize_t)-1, "dtdispatch",
                                     3, "x", (PyObject *)&PyFloat_Type);
    if (sample == NULL)
        return -1;
    Py_hash_t expected = PyObject_Hash(sample);
    Py_hash_t ours =
        tuple_hash_of(&PyTuple_GET_ITEM(sample, 0), PyTuple_GET_SIZE(sample), PyObject_Hash);
    Py_DECREF(sample);
    if (expected == -1 || ours == -1)
        return -1;
    own_tuple_hash_ok = expected == ours;
    return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* Names from dtdispatch.cache                                                                    */
/* ---------------------------------------------------------------------------------------------- */

/* Import dtdispatch.cache once and take what cache.build_key, the DispatchPlan and ThreadCache
 * use. Called
 * by configure, and lazily by build_key / dispatch when they run before configure. */
static int load_cache_names(void)
{
    if (cache_loaded)
        return 0;
    PyObject *mod = PyImport_ImportModule("dtdispatch.cache");
    if (mod == NULL)
        return -1;
    PyObject *torch = NULL, *propagator = NULL, *compat = NULL, *plan_type = NULL, *fields = NULL,
             *shape_name = NULL;
    int rc = -1;
#define TAKE(var, obj, name)                                                                       \
    do {                                                                                           \
        Py_XSETREF(var, PyObject_GetAttrString(obj, name));                                        \
        if (var == NULL)                                                                           \
            goto done;                                                                             \
    } while (0)
    Py_XSETREF(cache_dict, Py_NewRef(PyModule_GetDict(mod)));
    TAKE(torch, mod, "torch");
    TAKE(tensor_type, torch, "Tensor");
    TAKE(key_dtensor_type, mod, "DTensor");
    TAKE(kwarg_separator, mod, "KWARGS_MARKER");
    TAKE(list_marker, mod, "_LIST");
    TAKE(scalar_tensor_marker, mod, "_SCALAR_TENSOR");
    TAKE(unkeyed_marker, mod, "_UNKEYED");
    TAKE(default_schema_info, mod, "_DEFAULT_SCHEMA_INFO");
    TAKE(py_build_key, mod, "build_key");
    TAKE(thread_cache_type, mod, "ThreadCache");
    TAKE(opoverload_type, mod, "OpOverload");
    TAKE(spec_type, mod, "DTensorSpec");
    TAKE(kind_inplace, mod, "INPLACE");
    TAKE(kind_out, mod, "OUT");
    TAKE(kind_view, mod, "VIEW");
    TAKE(plan_type, mod, "DispatchPlan");
    TAKE(propagator, mod, "_propagator");
    TAKE(schema_dict, propagator, "op_to_schema_info");
    TAKE(compat, mod, "_compat");
    TAKE(schema_dict_single, compat, "single_dim_schema_infos");
#undef TAKE
    if (!PyType_Check(tensor_type) || !PyType_Check(key_dtensor_type) ||
        !PyType_Check(opoverload_type) || !PyType_Check(spec_type) || !PyType_Check(plan_type) ||
        !PyType_Check(thread_cache_type) || !PyDict_CheckExact(schema_dict) ||
        !PyDict_CheckExact(schema_dict_single)) {
        PyErr_SetString(PyExc_TypeError,
                        "dtdispatch._native._dispatch: dtdispatch.cache does not have the "
                        "expected types");
        goto done;
    }
    tensor_check_is_plain = plain_instancecheck(tensor_type);
    key_dtensor_check_is_plain = plain_instancecheck(key_dtensor_type);
    /* OpOverload.__call__ and DTensorSpec.__hash__, for the shortcuts that stand in for them. */
    Py_XSETREF(opoverload_call,
               Py_XNewRef(_PyType_Lookup((PyTypeObject *)opoverload_type, s_call_dunder)));
    Py_XSETREF(spec_hash_fn, Py_XNewRef(_PyType_Lookup((PyTypeObject *)spec_type, s_hash_dunder)));
    if (spec_hash_fn != NULL && !PyFunction_Check(spec_hash_fn))
        Py_CLEAR(spec_hash_fn);
    /* TensorMeta.shape: a NamedTuple field getter (meta.shape is meta[index]). */
    Py_CLEAR(meta_shape_descr);
    PyObject *meta_mod = PyImport_ImportModule("torch.distributed.tensor._dtensor_spec");
    if (meta_mod != NULL) {
        Py_XSETREF(meta_type, PyObject_GetAttrString(meta_mod, "TensorMeta"));
        Py_DECREF(meta_mod);
    }
    if (meta_type != NULL && PyType_Check(meta_type) &&
        PyType_IsSubtype((PyTypeObject *)meta_type, &PyTuple_Type) &&
        (fields = PyObject_GetAttrString(meta_type, "_fields")) != NULL && PyTuple_Check(fields) &&
        (shape_name = PyUnicode_FromString("shape")) != NULL) {
        Py_ssize_t index = PySequence_Index(fields, shape_name);
        PyObject *d = _PyType_Lookup((PyTypeObject *)meta_type, s_shape);
        if (index >= 0 && d != NULL &&
            strcmp(Py_TYPE(d)->tp_name, "_collections._tuplegetter") == 0) {
            meta_shape_descr = Py_NewRef(d);
            meta_shape_index = index;
        }
    }
    PyErr_Clear();
    /* __slots__ members read by slot_get. */
    slot_init(&sa_spec, key_dtensor_type, s_spec);
    slot_init(&sa_local_tensor, key_dtensor_type, s_local_tensor);
    slot_init(&sa_entries, thread_cache_type, s_entries);
    slot_init(&sa_per_op, thread_cache_type, s_per_op);
    slot_init(&sa_fast, plan_type, s_fast);
    slot_init(&sa_reason, plan_type, s_reason);
    slot_init(&sa_chunks, plan_type, s_chunks);
    slot_init(&sa_needs_pytree, plan_type, s_needs_pytree);
    slot_init(&sa_rewritten_args, plan_type, s_rewritten_args);
    slot_init(&sa_op_call, plan_type, s_op_call);
    slot_init(&sa_kind, plan_type, s_kind);
    slot_init(&sa_output_spec, plan_type, s_output_spec);
    slot_init(&sa_out_names, plan_type, s_out_names);
    slot_init(&sa_alias_pairs, plan_type, s_alias_pairs);
    slot_init(&sa_local_call, plan_type, s_local_call);
    if (check_tuple_hash() < 0)
        goto done;
    cache_loaded = 1;
    rc = 0;
done:
    Py_XDECREF(torch);
    Py_XDECREF(propagator);
    Py_XDECREF(compat);
    Py_XDECREF(plan_type);
    Py_XDECREF(fields);
    Py_XDECREF(shape_name);
    Py_DECREF(mod);
    return rc;
}

/* ---------------------------------------------------------------------------------------------- */
/* build_key: mirrors dtdispatch.cache.build_key                                                  */
/* ---------------------------------------------------------------------------------------------- */

enum { K_NOKEY = 0, K_OK = 1, K_ERR = -1, K_DELEGATE = -2 };

/* mirrors cache._tensor_entry (rules 2-3). On K_OK *entry is a new reference and *is_dtensor says
 * whether ``arg`` is a DTensor. */
static int tensor_entry(PyObject *arg, PyObject **entry, int *is_dtensor)
{
    *entry = NULL;
    int isdt = is_instance(arg, key_dtensor_type, key_dtensor_check_is_plain);
    if (isdt < 0)
        return K_ERR;
    *is_dtensor = isdt;
    if (isdt) {
        /* if isinstance(arg, DTensor): spec = arg._spec; meta = spec.tensor_meta */
        PyObject *spec = GET_SLOT(arg, spec);
        if (spec == NULL)
            return K_ERR;
        PyObject *meta = PyObject_GetAttr(spec, s_tensor_meta);
        if (meta == NULL) {
            Py_DECREF(spec);
            return K_ERR;
        }
        /* if meta is None or not all(type(s) is int for s in meta.shape): return None */
        if (meta == Py_None) {
            Py_DECREF(meta);
            Py_DECREF(spec);
            return K_NOKEY;
        }
        PyObject *shape;
        if ((PyObject *)Py_TYPE(meta) == meta_type && meta_shape_descr != NULL &&
            _PyType_Lookup(Py_TYPE(meta), s_shape) == meta_shape_descr &&
            PyTuple_GET_SIZE(meta) > meta_shape_index)
            /* the NamedTuple field getter */
            shape = Py_NewRef(PyTuple_GET_ITEM(meta, meta_shape_index));
        else
            shape = PyObject_GetAttr(meta, s_shape);
        Py_DECREF(meta);
        if (shape == NULL) {
            Py_DECREF(spec);
            return K_ERR;
        }
        int all_int = 1;
        if (plain_sequence(shape)) {
            Py_ssize_t n = PySequence_Fast_GET_SIZE(shape);
            PyObject **items = PySequence_Fast_ITEMS(shape);
            for (Py_ssize_t i = 0; i < n && all_int; i++)
                all_int = Py_IS_TYPE(items[i], &PyLong_Type);
        } else {
            PyObject *it = PyObject_GetIter(shape), *s;
            if (it == NULL) {
                Py_DECREF(shape);
                Py_DECREF(spec);
                return K_ERR;
            }
            while (all_int && (s = PyIter_Next(it)) != NULL) {
                all_int = Py_IS_TYPE(s, &PyLong_Type);
                Py_DECREF(s);
            }
            Py_DECREF(it);
            if (PyErr_Occurred()) {
                Py_DECREF(shape);
                Py_DECREF(spec);
                return K_ERR;
            }
        }
        Py_DECREF(shape);
        if (!all_int) {
            Py_DECREF(spec);
            return K_NOKEY;
        }
        *entry = spec; /* return spec */
        return K_OK;
    }
    /* if arg.numel() == 1 and arg.ndim == 0: return (_SCALAR_TENSOR, tuple(arg.shape),
     * arg.stride(), arg.dtype) */
    PyObject *numel =
        PyObject_VectorcallMethod(s_numel, &arg, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (numel == NULL)
        return K_ERR;
    int one = PyObject_RichCompareBool(numel, small_one, Py_EQ);
    Py_DECREF(numel);
    if (one <= 0)
        return one < 0 ? K_ERR : K_NOKEY;
    PyObject *ndim = PyObject_GetAttr(arg, s_ndim);
    if (ndim == NULL)
        return K_ERR;
    int zero = PyObject_RichCompareBool(ndim, small_zero, Py_EQ);
    Py_DECREF(ndim);
    if (zero <= 0)
        return zero < 0 ? K_ERR : K_NOKEY;
    PyObject *shape = PyObject_GetAttr(arg, s_shape), *shape_tuple = NULL, *stride = NULL,
             *dtype = NULL;
    if (shape == NULL)
        return K_ERR;
    shape_tuple = PySequence_Tuple(shape);
    Py_DECREF(shape);
    if (shape_tuple == NULL)
        return K_ERR;
    stride = PyObject_VectorcallMethod(s_stride, &arg, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (stride == NULL) {
        Py_DECREF(shape_tuple);
        return K_ERR;
    }
    dtype = PyObject_GetAttr(arg, s_dtype);
    if (dtype == NULL) {
        Py_DECREF(shape_tuple);
        Py_DECREF(stride);
        return K_ERR;
    }
    Py_INCREF(scalar_tensor_marker);
    *entry = PyTuple_Pack(4, scalar_tensor_marker, shape_tuple, stride, dtype);
    Py_DECREF(scalar_tensor_marker);
    Py_DECREF(shape_tuple);
    Py_DECREF(stride);
    Py_DECREF(dtype);
    /* Non-scalar plain tensor: ``return None`` above (K_NOKEY). */
    return *entry == NULL ? K_ERR : K_OK;
}

/* mirrors cache._value_entry. New reference, or NULL with an error. */
static PyObject *value_entry(PyObject *value, int keyed, int by_type)
{
    /* if value is None: return None */
    if (value == Py_None)
        Py_RETURN_NONE;
    PyTypeObject *tp = Py_TYPE(value);
    /* if not keyed and (by_type or _is_float_value(value)): return _UNKEYED */
    if (!keyed) {
        int floats = by_type || tp == &PyFloat_Type || tp == &PyComplex_Type;
        if (!floats && (tp == &PyList_Type || tp == &PyTuple_Type)) {
            /* mirrors cache._is_float_value for a list/tuple: non-empty, every element
             * float/complex */
            Py_ssize_t n = PySequence_Fast_GET_SIZE(value);
            PyObject **items = PySequence_Fast_ITEMS(value);
            floats = n > 0;
            for (Py_ssize_t i = 0; i < n && floats; i++)
                floats =
                    Py_IS_TYPE(items[i], &PyFloat_Type) || Py_IS_TYPE(items[i], &PyComplex_Type);
        }
        if (floats)
            return Py_NewRef(unkeyed_marker);
    }
    /* if by_type and type(value) in _SCALAR_TYPES: return type(value) */
    if (by_type &&
        (tp == &PyBool_Type || tp == &PyLong_Type || tp == &PyFloat_Type || tp == &PyComplex_Type))
        return Py_NewRef((PyObject *)tp);
    /* if isinstance(value, list): return tuple(value) */
    int is_list = is_instance_builtin(value, &PyList_Type);
    if (is_list < 0)
        return NULL;
    if (is_list)
        return PySequence_Tuple(value);
    /* return value */
    return Py_NewRef(value);
}

/* ``any(isinstance(e, torch.Tensor) for e in seq)`` for a plain_sequence. */
static int any_tensor(PyObject *seq)
{
    /* Bounds re-read and the element held each step, as a list iterator does: Python code (an
     * __instancecheck__) may run in between. */
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *e = Py_NewRef(PySequence_Fast_GET_ITEM(seq, i));
        int r = is_instance(e, tensor_type, tensor_check_is_plain);
        Py_DECREF(e);
        if (r != 0)
            return r;
    }
    return 0;
}

/* ``isinstance(x, (list, tuple)) and any(isinstance(e, torch.Tensor) for e in x)``: 1, 0, K_ERR, or
 * K_DELEGATE when x is a list/tuple whose iteration the C does not model. */
static int is_tensor_list(PyObject *x)
{
    int r = is_instance_builtin(x, &PyList_Type);
    if (r == 0)
        r = is_instance_builtin(x, &PyTuple_Type);
    if (r <= 0)
        return r < 0 ? K_ERR : 0;
    if (!plain_sequence(x))
        return K_DELEGATE;
    r = any_tensor(x);
    return r < 0 ? K_ERR : r;
}

/* The op's RuntimeSchemaInfo fields the key needs: mirrors cache.schema_info(op) (borrowed
 * info). */
static int schema_fields(PyObject *op, Py_hash_t h, Py_ssize_t *static_argnum, PyObject **info_out)
{
    /* info = _propagator.op_to_schema_info.get(op); if None:
     * _compat.single_dim_schema_infos.get(op) */
    PyObject *info = dtd_dict_get_known_hash(schema_dict, op, h);
    if (info == NULL && PyErr_Occurred())
        return K_ERR;
    if (info == NULL || info == Py_None) {
        info = dtd_dict_get_known_hash(schema_dict_single, op, h);
        if (info == NULL && PyErr_Occurred())
            return K_ERR;
    }
    /* return _DEFAULT_SCHEMA_INFO if info is None else info */
    if (info == NULL || info == Py_None)
        info = default_schema_info;
    PyObject *n = PyObject_GetAttr(info, s_static_argnum);
    if (n == NULL)
        return K_ERR;
    if (!PyLong_CheckExact(n)) {
        Py_DECREF(n);
        return K_DELEGATE;
    }
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(n, &overflow);
    Py_DECREF(n);
    if (v == -1 && PyErr_Occurred())
        return K_ERR;
    if (overflow > 0 || v > PY_SSIZE_T_MAX)
        *static_argnum = PY_SSIZE_T_MAX;
    else if (overflow < 0 || v < PY_SSIZE_T_MIN)
        *static_argnum = PY_SSIZE_T_MIN;
    else
        *static_argnum = (Py_ssize_t)v;
    *info_out = info;
    return K_OK;
}

/* by_type = op in _VALUE_FREE_OPS (the module global, read per call as the twin does). */
static int value_free(PyObject *op, Py_hash_t h)
{
    PyObject *ops = PyDict_GetItemWithError(cache_dict, s_value_free_ops);
    if (ops == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_NameError, "name '_VALUE_FREE_OPS' is not defined");
        return -1;
    }
    if (ops != value_free_src) {
        /* First call, or the global was replaced: mirror the new object (a dict only for a
         * frozenset). */
        Py_CLEAR(value_free_dict);
        Py_XSETREF(value_free_src, Py_NewRef(ops));
        if (PyFrozenSet_CheckExact(ops) && (value_free_dict = frozenset_as_dict(ops)) == NULL) {
            Py_CLEAR(value_free_src);
            return -1;
        }
    }
    return contains_op(value_free_src, value_free_dict, op, h);
}

/* mirrors cache.build_key for the inputs the C models; K_DELEGATE for the rest. On K_OK *key is a
 * new tuple. */
static int build_key_c(PyObject *op, Py_hash_t h, PyObject *args, PyObject *kwargs, PyObject **key)
{
    *key = NULL;
    if (!plain_sequence(args) || (kwargs != NULL && !PyDict_CheckExact(kwargs)))
        return K_DELEGATE;
    /* info = schema_info(op); static_argnum = info.static_argnum; by_type = op in
     * _VALUE_FREE_OPS */
    Py_ssize_t static_argnum;
    PyObject *info;
    int rc = schema_fields(op, h, &static_argnum, &info);
    if (rc != K_OK)
        return rc;
    Py_INCREF(info);
    int by_type = value_free(op, h);
    if (by_type < 0) {
        Py_DECREF(info);
        return K_ERR;
    }
    ObjBuf kb;
    buf_init(&kb);
    int has_dtensor = 0, is_dt;
    PyObject *entry, *arg = NULL, *element = NULL;
    /* Rule 1: key = [op, len(args)] */
    if (buf_push(&kb, Py_NewRef(op)) < 0 ||
        buf_push(&kb, PyLong_FromSsize_t(PySequence_Fast_GET_SIZE(args))) < 0)
        goto error;
    /* for index, arg in enumerate(args): (args / a list argument may be a live list: bounds are
     * re-read and the element held each step, as Python's iterators do, since Python code can run
     * in between) */
    for (Py_ssize_t index = 0; index < PySequence_Fast_GET_SIZE(args); index++) {
        Py_XSETREF(arg, Py_NewRef(PySequence_Fast_GET_ITEM(args, index)));
        /* if isinstance(arg, torch.Tensor): entry = _tensor_entry(arg) ... */
        int r = is_instance(arg, tensor_type, tensor_check_is_plain);
        if (r < 0)
            goto error;
        if (r) {
            rc = tensor_entry(arg, &entry, &is_dt);
            if (rc != K_OK)
                goto fail;
            has_dtensor |= is_dt;
            if (buf_push(&kb, entry) < 0)
                goto error;
            continue;
        }
        /* elif isinstance(arg, (list, tuple)) and any(isinstance(e, torch.Tensor) for e in arg):
         * rule 4 */
        r = is_tensor_list(arg);
        if (r < 0) {
            rc = r;
            goto fail;
        }
        if (r) {
            /* key.append(_LIST); key.append(len(arg)) */
            if (buf_push(&kb, Py_NewRef(list_marker)) < 0 ||
                buf_push(&kb, PyLong_FromSsize_t(PySequence_Fast_GET_SIZE(arg))) < 0)
                goto error;
            /* for element in arg: */
            for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(arg); j++) {
                Py_XSETREF(element, Py_NewRef(PySequence_Fast_GET_ITEM(arg, j)));
                int t = is_instance(element, tensor_type, tensor_check_is_plain);
                if (t < 0)
                    goto error;
                if (t) {
                    rc = tensor_entry(element, &entry, &is_dt);
                    if (rc != K_OK)
                        goto fail;
                    has_dtensor |= is_dt;
                } else {
                    /* key.append(_value_entry(element, index >= static_argnum, by_type)) */
                    entry = value_entry(element, index >= static_argnum, by_type);
                }
                if (buf_push(&kb, entry) < 0)
                    goto error;
            }
            continue;
        }
        /* else: rule 5 */
        if (buf_push(&kb, value_entry(arg, index >= static_argnum, by_type)) < 0)
            goto error;
    }
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) > 0) {
        /* Rule 6: static_kwargs = info.static_kwargkey or (); the separator only appears when an
         * entry follows (separated). */
        PyObject *static_kwargs = PyObject_GetAttr(info, s_static_kwargkey);
        if (static_kwargs == NULL)
            goto error;
        int truthy = PyObject_IsTrue(static_kwargs);
        if (truthy <= 0) {
            Py_DECREF(static_kwargs);
            if (truthy < 0)
                goto error;
            static_kwargs = NULL; /* () */
        }
        int separated = 0;
        Py_ssize_t pos = 0;
        PyObject *name, *value;
        /* for name, value in kwargs.items(): */
        while (PyDict_Next(kwargs, &pos, &name, &value)) {
            Py_INCREF(name);
            Py_INCREF(value);
            entry = NULL;
            rc = K_OK;
            int r = is_instance(value, tensor_type, tensor_check_is_plain);
            if (r > 0) {
                /* if isinstance(value, torch.Tensor): entry = _tensor_entry(value) (None: return
                 * None) */
                rc = tensor_entry(value, &entry, &is_dt);
                if (rc == K_OK)
                    has_dtensor |= is_dt;
            } else if (r == 0) {
                /* elif name in static_kwargs: entry = _value_entry(value, True, by_type) */
                int in_static =
                    static_kwargs != NULL ? PySequence_Contains(static_kwargs, name) : 0;
                if (in_static > 0) {
                    if ((entry = value_entry(value, 1, by_type)) == NULL)
                        r = -1;
                } else if (in_static < 0) {
                    r = -1;
                } else {
                    /* elif isinstance(value, (list, tuple)) and any(tensor ...): return None
                     * else: continue (entry stays NULL) */
                    int tl = is_tensor_list(value);
                    rc = tl == 1 ? K_NOKEY : tl == 0 ? K_OK : tl;
                }
            }
            PyObject *pair = NULL;
            if (r >= 0 && rc == K_OK && entry != NULL) {
                /* if not separated: key.append(KWARGS_MARKER); separated = True */
                if (!separated) {
                    if (buf_push(&kb, Py_NewRef(kwarg_separator)) < 0)
                        r = -1;
                    separated = 1;
                }
                /* key.append((name, entry)) */
                if (r >= 0 && (pair = PyTuple_Pack(2, name, entry)) == NULL)
                    r = -1;
            }
            Py_XDECREF(entry);
            Py_DECREF(name);
            Py_DECREF(value);
            if (r >= 0 && rc == K_OK && pair != NULL && buf_push(&kb, pair) < 0)
                r = -1;
            if (r < 0 || rc != K_OK) {
                Py_XDECREF(static_kwargs);
                if (r < 0)
                    goto error;
                goto fail;
            }
        }
        Py_XDECREF(static_kwargs);
    }
    Py_DECREF(info);
    Py_XDECREF(arg);
    Py_XDECREF(element);
    /* Rule 7: return tuple(key) if has_dtensor else None */
    if (!has_dtensor) {
        buf_clear(&kb);
        return K_NOKEY;
    }
    *key = buf_to_tuple(&kb, 0);
    buf_clear(&kb);
    return *key == NULL ? K_ERR : K_OK;
error:
    rc = K_ERR;
fail:
    buf_clear(&kb);
    Py_DECREF(info);
    Py_XDECREF(arg);
    Py_XDECREF(element);
    return rc;
}

/* build_key(op, args, kwargs) as dispatch needs it: a new key tuple, Py_None (new ref) for "no
 * key", or NULL with the exception the twin raises. */
static PyObject *build_key_full(PyObject *op, Py_hash_t h, PyObject *args, PyObject *kwargs)
{
    PyObject *key;
    int rc = build_key_c(op, h, args, kwargs, &key);
    if (rc == K_OK)
        return key;
    if (rc == K_NOKEY)
        Py_RETURN_NONE;
    if (rc == K_ERR) {
        /* An exception from a Python-level call (or an attribute the C expected): let the twin
         * decide, so the result or the exception is exactly its own. BaseExceptions
         * (KeyboardInterrupt ...) propagate. */
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return NULL;
        PyErr_Clear();
    }
    PyObject *call_args[3] = {op, args, kwargs != NULL ? kwargs : Py_None};
    PyObject *owned_kwargs = NULL;
    if (kwargs == NULL) {
        if ((owned_kwargs = PyDict_New()) == NULL)
            return NULL;
        call_args[2] = owned_kwargs;
    }
    PyObject *res = PyObject_Vectorcall(py_build_key, call_args, 3, NULL);
    Py_XDECREF(owned_kwargs);
    return res;
}

static PyObject *sp_build_key(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames)
{
    static const char *const names[] = {"op", "args", "kwargs"};
    PyObject *a[3];
    if (parse_args("build_key", args, nargs, kwnames, names, 3, 3, a) < 0)
        return NULL;
    if (load_cache_names() < 0)
        return NULL;
    Py_hash_t h = op_hash(a[0]);
    if (h == -1) {
        /* cache.build_key would raise the same TypeError on first use of op as a dict key. */
        PyObject *call_args[3] = {a[0], a[1], a[2]};
        PyErr_Clear();
        return PyObject_Vectorcall(py_build_key, call_args, 3, NULL);
    }
    return build_key_full(a[0], h, a[1], a[2]);
}

/* ---------------------------------------------------------------------------------------------- */
/* configure: mirrors _native.dispatch.configure (``_config.update(config)``)                     */
/* ---------------------------------------------------------------------------------------------- */

static void take_config(PyObject *config, const char *name, PyObject **slot)
{
    PyObject *v = PyDict_GetItemString(config, name);
    if (v != NULL)
        Py_XSETREF(*slot, Py_NewRef(v));
}

static PyObject *sp_configure(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames)
{
    static const char *const names[] = {"config"};
    PyObject *arg;
    if (parse_args("configure", args, nargs, kwnames, names, 1, 1, &arg) < 0)
        return NULL;
    if (load_cache_names() < 0)
        return NULL;
    /* dict.update accepts a mapping or pairs: dict(config) reads it the same way. */
    PyObject *config = PyObject_CallOneArg((PyObject *)&PyDict_Type, arg);
    if (config == NULL)
        return NULL;
    take_config(config, "op_dispatcher", &cfg_op_dispatcher);
    take_config(config, "slow_path", &cfg_slow_path);
    take_config(config, "dtensor_type", &cfg_dtensor_type);
    take_config(config, "tensor_type", &cfg_tensor_type);
    take_config(config, "fast_type", &cfg_fast_type);
    take_config(config, "autograd_type", &cfg_autograd_type);
    take_config(config, "grad_enabled", &cfg_grad_enabled);
    take_config(config, "graph_task_id", &cfg_graph_task_id);
    take_config(config, "new", &cfg_new);
    take_config(config, "thread_cache", &cfg_thread_cache);
    take_config(config, "unsafe_set", &cfg_unsafe_set);
    take_config(config, "explicit_local", &cfg_explicit_local);
    take_config(config, "torch_function_mode_enabled", &cfg_tf_mode_enabled);
    Py_DECREF(config);
    dtensor_check_is_plain = plain_instancecheck(cfg_dtensor_type);
    tensor_cfg_check_is_plain = plain_instancecheck(cfg_tensor_type);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------- */
/* dispatch helpers                                                                               */
/* ---------------------------------------------------------------------------------------------- */

/* c[name]: the configured object (borrowed), or NULL with the twin's KeyError. */
static PyObject *cfg(PyObject *value, const char *name)
{
    if (value == NULL) {
        PyObject *k = PyUnicode_FromString(name);
        if (k != NULL) {
            PyErr_SetObject(PyExc_KeyError, k);
            Py_DECREF(k);
        }
    }
    return value;
}

/* c["slow_path"](func, args, kwargs, reason, key, plan). *kwargs NULL means the twin's ``kwargs =
 * {}``, made here when first needed. */
static PyObject *call_slow_path(PyObject *func, PyObject *args, PyObject **kwargs, PyObject *reason,
                                PyObject *key, PyObject *plan)
{
    if (cfg(cfg_slow_path, "slow_path") == NULL)
        return NULL;
    if (*kwargs == NULL && (*kwargs = PyDict_New()) == NULL)
        return NULL;
    PyObject *call_args[6] = {func, args, *kwargs, reason, key, plan};
    return PyObject_Vectorcall(cfg_slow_path, call_args, 6, NULL);
}

/* cache = thread_cache(). The ThreadCache is remembered in this thread's thread-state dict (freed
 * with the thread), tagged with the thread_cache callable it came from, so a re-configure is never
 * served a stale object. thread_cache() returns the same object for the life of the thread
 * (cache.registry keeps it in a threading.local, set once and never replaced). New reference. */
static PyObject *get_thread_cache(void)
{
    if (cfg(cfg_thread_cache, "thread_cache") == NULL)
        return NULL;
    PyObject *memo = dtd_thread_memo_get(s_tc_key, cfg_thread_cache, 2);
    if (memo != NULL)
        return Py_NewRef(PyTuple_GET_ITEM(memo, 1));
    if (PyErr_Occurred())
        return NULL;
    PyObject *cache = PyObject_Vectorcall(cfg_thread_cache, NULL, 0, NULL);
    PyObject *tsd = PyThreadState_GetDict(); /* borrowed; NULL (no error) when unavailable */
    if (cache != NULL && tsd != NULL) {
        PyObject *memo = PyTuple_Pack(2, cfg_thread_cache, cache);
        if (memo == NULL || PyDict_SetItem(tsd, s_tc_key, memo) < 0)
            PyErr_Clear(); /* only the memo is lost */
        Py_XDECREF(memo);
    }
    return cache;
}

/* counters = cache.op_counters(func): mirrors ThreadCache.op_counters, inlined for ThreadCache
 * itself (a subclass's method is called). New reference. */
static PyObject *op_counters(PyObject *cache, PyObject *op, Py_hash_t h)
{
    if ((PyObject *)Py_TYPE(cache) != thread_cache_type)
        return PyObject_VectorcallMethod(s_op_counters, (PyObject *[]){cache, op},
                                         2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    /* counters = self.per_op.get(op) */
    PyObject *per_op = GET_SLOT(cache, per_op);
    if (per_op == NULL)
        return NULL;
    PyObject *counters;
    if (PyDict_CheckExact(per_op)) {
        counters = dtd_dict_get_known_hash(per_op, op, h);
        if (counters == NULL && PyErr_Occurred()) {
            Py_DECREF(per_op);
            return NULL;
        }
        Py_XINCREF(counters);
    } else {
        counters = PyObject_VectorcallMethod(s_get, (PyObject *[]){per_op, op},
                                             2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        if (counters == NULL) {
            Py_DECREF(per_op);
            return NULL;
        }
    }
    if (counters == NULL || counters == Py_None) {
        /* if counters is None: counters = self.per_op[op] = [0, 0, 0] */
        Py_XDECREF(counters);
        counters = Py_BuildValue("[iii]", 0, 0, 0);
        int rc = -1;
        if (counters != NULL) {
#if DTD_KNOWN_HASH
            rc = PyDict_CheckExact(per_op) ? _PyDict_SetItem_KnownHash(per_op, op, counters, h)
                                           : PyObject_SetItem(per_op, op, counters);
#else
            rc = PyObject_SetItem(per_op, op, counters);
#endif
        }
        if (rc < 0)
            Py_CLEAR(counters);
    }
    Py_DECREF(per_op);
    return counters;
}

/* ``a._local_tensor if isinstance(a, dtensor_type) else a``. New reference. */
static PyObject *unwrap_one(PyObject *a, PyObject *dtensor_type)
{
    int isdt = is_instance(a, dtensor_type, dtensor_check_is_plain);
    if (isdt < 0)
        return NULL;
    return isdt ? GET_SLOT(a, local_tensor) : Py_NewRef(a);
}

/* mirrors _native.dispatch._wrap (torch's OpDispatcher.wrap with FastDTensor outputs). New
 * reference. */
static PyObject *wrap(PyObject *result, PyObject *spec, PyObject *fast_type, PyObject *new_fn,
                      PyObject *tensor_t)
{
    /* if isinstance(result, tensor_type): ... */
    int is_tensor = is_instance(result, tensor_t, tensor_cfg_check_is_plain);
    if (is_tensor < 0)
        return NULL;
    if (is_tensor) {
        /* if spec is None: return result */
        if (spec == Py_None)
            return Py_NewRef(result);
        /* return new(fast_type, result, spec, result.requires_grad) (by position: no kwargs dict
         * per call) */
        PyObject *rg = PyObject_GetAttr(result, s_requires_grad);
        if (rg == NULL)
            return NULL;
        PyObject *call_args[5] = {NULL, fast_type, result, spec, rg};
        PyObject *out =
            PyObject_Vectorcall(new_fn, call_args + 1, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(rg);
        return out;
    }
    /* if isinstance(result, (tuple, list)): zip with spec, rebuilt as tuple or list */
    int is_tuple = is_instance_builtin(result, &PyTuple_Type);
    if (is_tuple < 0)
        return NULL;
    int is_list = is_tuple ? 0 : is_instance_builtin(result, &PyList_Type);
    if (is_list < 0)
        return NULL;
    if (!is_tuple && !is_list)
        return Py_NewRef(result); /* return result */
    if (Py_EnterRecursiveCall(" in dtdispatch wrap"))
        return NULL;
    PyObject *wrapped = PyList_New(0), *rit = NULL, *sit = NULL, *r = NULL, *s = NULL;
    if (wrapped == NULL || (rit = PyObject_GetIter(result)) == NULL ||
        (sit = PyObject_GetIter(spec)) == NULL)
        goto error;
    /* wrapped = [_wrap(r, s, ...) for r, s in zip(result, spec)] */
    for (;;) {
        if ((r = PyIter_Next(rit)) == NULL)
            break;
        if ((s = PyIter_Next(sit)) == NULL) {
            Py_CLEAR(r);
            break;
        }
        PyObject *w = wrap(r, s, fast_type, new_fn, tensor_t);
        Py_CLEAR(r);
        Py_CLEAR(s);
        if (w == NULL)
            goto error;
        int rc = PyList_Append(wrapped, w);
        Py_DECREF(w);
        if (rc < 0)
            goto error;
    }
    if (PyErr_Occurred())
        goto error;
    Py_DECREF(rit);
    Py_DECREF(sit);
    Py_LeaveRecursiveCall();
    /* return tuple(wrapped) if isinstance(result, tuple) else wrapped */
    if (is_tuple) {
        PyObject *t = PyList_AsTuple(wrapped);
        Py_DECREF(wrapped);
        return t;
    }
    return wrapped;
error:
    Py_XDECREF(wrapped);
    Py_XDECREF(rit);
    Py_XDECREF(sit);
    Py_LeaveRecursiveCall();
    return NULL;
}

/* plan.op_call(*local) / plan.op_call(*local, **local_kwargs). OpOverload.__call__ is ``return
 * self._op(*args, **kwargs)``: when the op's type resolves __call__ to exactly that function, call
 * self._op directly (one Python frame less). ``local`` has a writable slot at local[-1]. */
static PyObject *call_op(PyObject *op_call, PyObject **local, Py_ssize_t n, PyObject *local_kwargs)
{
    PyObject *callee = op_call, *inner = NULL, *res;
    if (opoverload_call != NULL &&
        _PyType_Lookup(Py_TYPE(op_call), s_call_dunder) == opoverload_call) {
        if ((inner = PyObject_GetAttr(op_call, s_op)) == NULL)
            return NULL;
        callee = inner;
    }
    if (local_kwargs == NULL) {
        res = PyObject_Vectorcall(callee, local, (size_t)n | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    } else {
        PyObject *t = PyTuple_New(n);
        if (t == NULL) {
            Py_XDECREF(inner);
            return NULL;
        }
        for (Py_ssize_t i = 0; i < n; i++)
            PyTuple_SET_ITEM(t, i, Py_NewRef(local[i]));
        res = PyObject_Call(callee, t, local_kwargs);
        Py_DECREF(t);
    }
    Py_XDECREF(inner);
    return res;
}

/* ``kind == constant`` (plan.kind against cache.INPLACE / OUT / VIEW). */
static int kind_is(PyObject *kind, PyObject *constant)
{
    if (kind == constant) /* small ints are shared: the usual answer */
        return 1;
    if (PyLong_CheckExact(kind) && PyLong_CheckExact(constant)) {
        int overflow_a, overflow_b;
        long a = PyLong_AsLongAndOverflow(kind, &overflow_a),
             b = PyLong_AsLongAndOverflow(constant, &overflow_b);
        if (!overflow_a && !overflow_b && !(a == -1 && PyErr_Occurred()) &&
            !(b == -1 && PyErr_Occurred()))
            return a == b;
        PyErr_Clear();
    }
    return PyObject_RichCompareBool(kind, constant, Py_EQ);
}

/* Python's ``seq[index]`` for a list being built (negative indexes count from the end). */
static int local_index(PyObject *index_obj, Py_ssize_t n, Py_ssize_t *out)
{
    Py_ssize_t i = PyNumber_AsSsize_t(index_obj, PyExc_IndexError);
    if (i == -1 && PyErr_Occurred())
        return -1;
    if (i < 0)
        i += n;
    if (i < 0 || i >= n) {
        PyErr_SetString(PyExc_IndexError, "list index out of range");
        return -1;
    }
    *out = i;
    return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* dispatch: mirrors _native.dispatch.dispatch, one function per block of the twin                */
/* ---------------------------------------------------------------------------------------------- */

/* One dispatch call: the twin's locals that its blocks share. The object fields are owned (NULL
 * until set) and released by sp_dispatch. */
typedef struct {
    PyObject *func, *types, *args; /* borrowed: the call's arguments (``cls`` is not read) */
    PyObject *kwargs;      /* NULL until the twin's ``kwargs = {}`` is needed (slow path, OUT) */
    Py_hash_t h;           /* hash(func) */
    PyObject *key, *plan, *chunks;
    ObjBuf local; /* the locals; items[0] a spare slot, so calls may use ARGUMENTS_OFFSET */
} DispatchCall;

/* c["slow_path"](func, args, kwargs, reason, key, plan) for this call. */
static PyObject *dc_slow_path(DispatchCall *dc, PyObject *reason, PyObject *key, PyObject *plan)
{
    return call_slow_path(dc->func, dc->args, &dc->kwargs, reason, key, plan);
}

/* mirrors dispatch's "Block: custom handlers": ``func in
 * c["op_dispatcher"]._custom_op_handlers`` (read live: see the twin). Sets dc->h (hash(func)) on
 * the way. 1, 0, or -1 with an error. */
static int custom_handled(DispatchCall *dc)
{
    if (cfg(cfg_op_dispatcher, "op_dispatcher") == NULL)
        return -1;
    if ((dc->h = op_hash(dc->func)) == -1)
        return -1; /* ``func in handlers`` raises the same TypeError */
    PyObject *handlers = PyObject_GetAttr(cfg_op_dispatcher, s_custom_op_handlers);
    if (handlers == NULL)
        return -1;
    int custom = contains_op(handlers, PyDict_CheckExact(handlers) ? handlers : NULL, dc->func,
                             dc->h);
    Py_DECREF(handlers);
    return custom;
}

/* mirrors dispatch's "Block: lookup", dc->key being a key tuple: the plan, counted, moved to the
 * end of the LRU, and the checks that send a hit to the slow path. 1: a fast plan (dc->plan and
 * dc->chunks set), go on; 0: the call is done, *result its result (NULL with an error). */
static int lookup(DispatchCall *dc, PyObject **result)
{
    PyObject *cache = NULL, *entries = NULL, *plan = NULL, *counters = NULL, *tmp = NULL;
    int go_on = 0;
    *result = NULL;
    /* cache = thread_cache(); plan = cache.entries.get(key); counters = cache.op_counters(func) */
    if ((cache = get_thread_cache()) == NULL || (entries = GET_SLOT(cache, entries)) == NULL)
        goto done;
    Py_hash_t kh = -1;
    if (((PyObject *)Py_TYPE(entries) == odict_type || PyDict_CheckExact(entries)) &&
        PyTuple_CheckExact(dc->key)) {
        /* OrderedDict.get is dict.get (odict does not override it): a dict lookup with the key's
         * hash. */
        if ((kh = key_hash(dc->key)) == -1)
            goto done;
        plan = dtd_dict_get_known_hash(entries, dc->key, kh);
        if (plan == NULL && PyErr_Occurred())
            goto done;
        Py_XINCREF(plan);
    } else {
        plan = PyObject_VectorcallMethod(s_get, (PyObject *[]){entries, dc->key},
                                         2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        if (plan == NULL)
            goto done;
    }
    if ((counters = op_counters(cache, dc->func, dc->h)) == NULL)
        goto done;
    if (plan == NULL || plan == Py_None) {
        /* if plan is None: counters[1] += 1; return c["slow_path"](..., "miss", key, None) */
        if (dtd_bump(counters, 1) == 0)
            *result = dc_slow_path(dc, s_miss, dc->key, Py_None);
        goto done;
    }
    /* cache.entries.move_to_end(key); counters[0] += 1 */
    if (dtd_move_to_end(entries, dc->key, kh) < 0 || dtd_bump(counters, 0) < 0)
        goto done;
    /* if not plan.fast: return c["slow_path"](func, args, kwargs, plan.reason, key, plan) */
    if ((tmp = GET_SLOT(plan, fast)) == NULL)
        goto done;
    int fast = PyObject_IsTrue(tmp);
    Py_CLEAR(tmp);
    if (fast < 0)
        goto done;
    if (!fast) {
        if ((tmp = GET_SLOT(plan, reason)) != NULL)
            *result = dc_slow_path(dc, tmp, dc->key, plan);
        goto done;
    }
    /* chunks = plan.chunks; under ExplicitRedistributionContext every implicit redistribution
     * must be observed: if chunks is not None and getattr(c["explicit_local"], "_active", None)
     * is not None: return c["slow_path"](..., "explicit redistribution context", key, plan) */
    PyObject *chunks = GET_SLOT(plan, chunks);
    if (chunks == NULL)
        goto done;
    if (chunks != Py_None) {
        int active = cfg(cfg_explicit_local, "explicit_local") == NULL
                         ? -1
                         : dtd_explicit_active(cfg_explicit_local);
        if (active != 0) {
            Py_DECREF(chunks);
            if (active > 0)
                *result = dc_slow_path(dc, s_explicit_reason, dc->key, plan);
            goto done;
        }
    }
    dc->plan = Py_NewRef(plan);
    dc->chunks = chunks;
    go_on = 1;
done:
    Py_XDECREF(cache);
    Py_XDECREF(entries);
    Py_XDECREF(plan);
    Py_XDECREF(counters);
    Py_XDECREF(tmp);
    return go_on;
}

/* mirrors dispatch's "Block: unwrap", its ``if plan.needs_pytree:`` branch (aten lists nest one
 * level): [type(a)(unwrap(e) for e in a) if type(a) is list or type(a) is tuple else unwrap(a)
 * for a in args], appended to local. 0, or -1 with an error. */
static int unwrap_nested(PyObject **items, Py_ssize_t nargs, PyObject *dtensor_type,
                         ObjBuf *local)
{
    for (Py_ssize_t i = 0; i < nargs; i++) {
        PyObject *arg = items[i], *value;
        if (PyList_CheckExact(arg) || PyTuple_CheckExact(arg)) {
            Py_ssize_t m = PySequence_Fast_GET_SIZE(arg);
            value = PyList_CheckExact(arg) ? PyList_New(m) : PyTuple_New(m);
            for (Py_ssize_t j = 0; value != NULL && j < m; j++) {
                /* (a list can only change under us if unwrap ran Python code; re-read its size) */
                if (j >= PySequence_Fast_GET_SIZE(arg)) {
                    Py_CLEAR(value);
                    PyErr_SetString(PyExc_RuntimeError, "list changed size during iteration");
                    break;
                }
                PyObject *e = unwrap_one(PySequence_Fast_GET_ITEM(arg, j), dtensor_type);
                if (e == NULL) {
                    Py_CLEAR(value);
                    break;
                }
                if (PyList_CheckExact(value))
                    PyList_SET_ITEM(value, j, e);
                else
                    PyTuple_SET_ITEM(value, j, e);
            }
        } else {
            value = unwrap_one(arg, dtensor_type);
        }
        if (buf_push(local, value) < 0)
            return -1;
    }
    return 0;
}

/* mirrors dispatch's "Block: unwrap", its sharded-views branch: non-tensor positions take the
 * plan's rewritten values (local shapes), and values the rewrite appended come last.
 * local = [a._local_tensor if isinstance(a, dtensor_type) else (a if isinstance(a, tensor_type)
 *          else rewritten[i]) for i, a in enumerate(args)]; local.extend(rewritten[len(args):])
 * 0, or -1 with an error. */
static int unwrap_rewritten(PyObject **items, Py_ssize_t nargs, PyObject *rewritten,
                            PyObject *dtensor_type, ObjBuf *local)
{
    PyObject *tensor_t = cfg(cfg_tensor_type, "tensor_type"), *tmp = NULL;
    int ok = tensor_t != NULL;
    for (Py_ssize_t i = 0; ok && i < nargs; i++) {
        PyObject *arg = items[i], *value = NULL;
        int isdt = is_instance(arg, dtensor_type, dtensor_check_is_plain);
        if (isdt > 0) {
            value = GET_SLOT(arg, local_tensor);
        } else if (isdt == 0) {
            int ist = is_instance(arg, tensor_t, tensor_cfg_check_is_plain);
            if (ist > 0)
                value = Py_NewRef(arg);
            else if (ist == 0 && PyTuple_CheckExact(rewritten))
                value = PySequence_GetItem(rewritten, i); /* rewritten[i] */
            else if (ist == 0 && (tmp = PyLong_FromSsize_t(i)) != NULL)
                value = PyObject_GetItem(rewritten, tmp);
            Py_CLEAR(tmp);
        }
        ok = buf_push(local, value) == 0;
    }
    if (ok) {
        PyObject *rest = PySequence_GetSlice(rewritten, nargs, PY_SSIZE_T_MAX);
        PyObject *rest_seq =
            rest != NULL ? PySequence_Fast(rest, "rewritten_args must be iterable") : NULL;
        ok = rest_seq != NULL;
        for (Py_ssize_t j = 0; ok && j < PySequence_Fast_GET_SIZE(rest_seq); j++)
            ok = buf_push(local, Py_NewRef(PySequence_Fast_GET_ITEM(rest_seq, j))) == 0;
        Py_XDECREF(rest);
        Py_XDECREF(rest_seq);
    }
    return ok ? 0 : -1;
}

/* mirrors dispatch's "Block: local chunks" (communication-free redistribution, Replicate ->
 * Shard: the plan's verified local chunk).
 * for index, dim, offset, length in chunks:
 *     if length is not None: local[index] = local[index].narrow(dim, offset, length).clone()
 * 0, or -1 with an error. */
static int apply_chunks(PyObject *chunks, ObjBuf *local)
{
    PyObject *chunk_seq = PySequence_Fast(chunks, "chunks must be iterable");
    if (chunk_seq == NULL)
        return -1;
    for (Py_ssize_t c = 0; c < PySequence_Fast_GET_SIZE(chunk_seq); c++) {
        PyObject *entry =
            PySequence_Fast(PySequence_Fast_GET_ITEM(chunk_seq, c), "cannot unpack chunk");
        Py_ssize_t index;
        PyObject *cloned = NULL;
        if (entry != NULL && PySequence_Fast_GET_SIZE(entry) != 4) {
            PyErr_Format(PyExc_ValueError, "%s values to unpack (expected 4, got %zd)",
                         PySequence_Fast_GET_SIZE(entry) > 4 ? "too many" : "not enough",
                         PySequence_Fast_GET_SIZE(entry));
            Py_CLEAR(entry);
        }
        if (entry != NULL && PySequence_Fast_GET_ITEM(entry, 3) == Py_None) {
            /* Length None: torch hands the local itself back; keep it. */
            Py_DECREF(entry);
            continue;
        }
        if (entry != NULL &&
            local_index(PySequence_Fast_GET_ITEM(entry, 0), local->len - 1, &index) == 0) {
            PyObject **e = PySequence_Fast_ITEMS(entry);
            cloned = dtd_local_chunk(local->items[1 + index], e[1], e[2], e[3]);
        }
        Py_XDECREF(entry);
        if (cloned == NULL) {
            Py_DECREF(chunk_seq);
            return -1;
        }
        Py_SETREF(local->items[1 + index], cloned);
    }
    Py_DECREF(chunk_seq);
    return 0;
}

/* mirrors dispatch's "Block: unwrap" (the plan is participating, not random, and communicates
 * nothing) and "Block: local chunks": dc->local filled. 0, or -1 with an error. */
static int unwrap_args(DispatchCall *dc, PyObject *dtensor_type)
{
    /* args as a tuple (torch passes one: no copy); a list given directly is snapshot, so nothing
     * below can see it change */
    PyObject *seq = PySequence_Tuple(dc->args), *tmp = NULL;
    int rc = -1;
    if (seq == NULL)
        return -1;
    Py_ssize_t nargs = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    /* local[-1]: a spare slot, so the op call may use PY_VECTORCALL_ARGUMENTS_OFFSET */
    if (buf_push(&dc->local, Py_NewRef(Py_None)) < 0 ||
        (tmp = GET_SLOT(dc->plan, needs_pytree)) == NULL)
        goto done;
    int needs_pytree = PyObject_IsTrue(tmp);
    Py_CLEAR(tmp);
    if (needs_pytree < 0)
        goto done;
    if (needs_pytree) {
        if (unwrap_nested(items, nargs, dtensor_type, &dc->local) < 0)
            goto done;
    } else {
        if ((tmp = GET_SLOT(dc->plan, rewritten_args)) == NULL)
            goto done;
        if (tmp == Py_None) {
            /* local = [a._local_tensor if isinstance(a, dtensor_type) else a for a in args] */
            for (Py_ssize_t i = 0; i < nargs; i++)
                if (buf_push(&dc->local, unwrap_one(items[i], dtensor_type)) < 0)
                    goto done;
        } else if (unwrap_rewritten(items, nargs, tmp, dtensor_type, &dc->local) < 0) {
            goto done;
        }
    }
    if (dc->chunks != Py_None && apply_chunks(dc->chunks, &dc->local) < 0)
        goto done;
    rc = 0;
done:
    Py_XDECREF(tmp);
    Py_DECREF(seq);
    return rc;
}

/* mirrors dispatch's "Block: local op", its ``if kwargs:`` part:
 * {k: (v._local_tensor if isinstance(v, dtensor_type) else v) for k, v in kwargs.items()}.
 * New reference. */
static PyObject *unwrap_kwargs(PyObject *kwargs, PyObject *dtensor_type)
{
    PyObject *pairs = PyDict_CheckExact(kwargs) ? PyDict_Items(kwargs) : PyMapping_Items(kwargs);
    PyObject *pairs_seq = pairs != NULL ? PySequence_Fast(pairs, "items() must be iterable") : NULL;
    PyObject *local_kwargs = NULL;
    Py_XDECREF(pairs);
    if (pairs_seq == NULL || (local_kwargs = PyDict_New()) == NULL) {
        Py_XDECREF(pairs_seq);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(pairs_seq); i++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(pairs_seq, i);
        PyObject *value = NULL;
        int rc = -1;
        if (PyTuple_CheckExact(pair) && PyTuple_GET_SIZE(pair) == 2 &&
            (value = unwrap_one(PyTuple_GET_ITEM(pair, 1), dtensor_type)) != NULL)
            rc = PyDict_SetItem(local_kwargs, PyTuple_GET_ITEM(pair, 0), value);
        else if (value == NULL && !PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "kwargs.items() must yield pairs");
        Py_XDECREF(value);
        if (rc < 0) {
            Py_DECREF(pairs_seq);
            Py_DECREF(local_kwargs);
            return NULL;
        }
    }
    Py_DECREF(pairs_seq);
    return local_kwargs;
}

/* mirrors dispatch's "Block: local op", its public-function condition: ``not
 * c["torch_function_mode_enabled"]() and _plain_tensors(local, c["tensor_type"])``. 1, 0, or -1
 * with an error. */
static int local_call_allowed(const ObjBuf *local)
{
    if (cfg(cfg_tf_mode_enabled, "torch_function_mode_enabled") == NULL ||
        cfg(cfg_tensor_type, "tensor_type") == NULL)
        return -1;
    int mode_on = dtd_call_truth(cfg_tf_mode_enabled);
    if (mode_on != 0)
        return mode_on < 0 ? -1 : 0;
    /* mirrors _native.dispatch._plain_tensors: all(type(v) is tensor_type or not isinstance(v,
     * tensor_type) for v in local) */
    for (Py_ssize_t i = 1; i < local->len; i++) {
        PyObject *a = local->items[i];
        if ((PyObject *)Py_TYPE(a) != cfg_tensor_type) {
            int ist = is_instance(a, cfg_tensor_type, tensor_cfg_check_is_plain);
            if (ist != 0)
                return ist < 0 ? -1 : 0;
        }
    }
    return 1;
}

/* mirrors dispatch's "Block: local op": plan.op_call(*local, **local_kwargs) with kwargs, else
 * plan.local_call(*local) where allowed, else plan.op_call(*local). New reference. */
static PyObject *local_op(DispatchCall *dc, PyObject *dtensor_type)
{
    PyObject *local_kwargs = NULL, *tmp = NULL, *result = NULL;
    int has_kwargs = dc->kwargs != NULL ? PyObject_IsTrue(dc->kwargs) : 0;
    if (has_kwargs < 0)
        return NULL;
    PyObject **local = dc->local.items + 1;
    Py_ssize_t n = dc->local.len - 1;
    if (has_kwargs) {
        if ((local_kwargs = unwrap_kwargs(dc->kwargs, dtensor_type)) == NULL)
            return NULL;
    } else {
        /* The public function verified when planned (DispatchPlan.local_call): it skips
         * OpOverload._op's second, schema-driven parse. NOTE: a torch function mode, or a local
         * tensor subclass's __torch_function__, would see it instead of the aten op (the key
         * holds neither), so then op_call stays. */
        if ((tmp = GET_SLOT(dc->plan, local_call)) == NULL)
            return NULL;
        if (tmp != Py_None) {
            int allowed = local_call_allowed(&dc->local);
            if (allowed < 0) {
                Py_DECREF(tmp);
                return NULL;
            }
            if (allowed) {
                result = PyObject_Vectorcall(tmp, local, (size_t)n | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                             NULL);
                Py_DECREF(tmp);
                return result;
            }
        }
        Py_CLEAR(tmp);
    }
    /* else: result = plan.op_call(*local) (or with **local_kwargs) */
    if ((tmp = GET_SLOT(dc->plan, op_call)) != NULL) {
        result = call_op(tmp, local, n, local_kwargs);
        Py_DECREF(tmp);
    }
    Py_XDECREF(local_kwargs);
    return result;
}

/* mirrors dispatch's "Block: out= outputs" (kind == OUT):
 * spec = plan.output_spec; specs = spec if isinstance(spec, tuple) else (spec,)
 * outs = [kwargs[name] for name in plan.out_names]
 * for out, out_spec in zip(outs, specs): out._spec = out_spec
 * return tuple(outs) if len(outs) > 1 else outs[0]
 * New reference. */
static PyObject *return_out(DispatchCall *dc)
{
    PyObject *spec = NULL, *specs = NULL, *out_names = NULL, *names_seq = NULL, *outs = NULL,
             *spec_it = NULL, *result = NULL;
    if ((spec = GET_SLOT(dc->plan, output_spec)) == NULL)
        return NULL;
    int spec_is_tuple = is_instance_builtin(spec, &PyTuple_Type);
    if (spec_is_tuple < 0) {
        Py_DECREF(spec);
        return NULL;
    }
    specs = spec_is_tuple ? Py_NewRef(spec) : PyTuple_Pack(1, spec);
    if (specs != NULL && (dc->kwargs != NULL || (dc->kwargs = PyDict_New()) != NULL) &&
        (out_names = GET_SLOT(dc->plan, out_names)) != NULL &&
        (names_seq = PySequence_Fast(out_names, "out_names must be iterable")) != NULL &&
        (outs = PyList_New(0)) != NULL) {
        int ok = 1;
        for (Py_ssize_t i = 0; ok && i < PySequence_Fast_GET_SIZE(names_seq); i++) {
            PyObject *out = PyObject_GetItem(dc->kwargs, PySequence_Fast_GET_ITEM(names_seq, i));
            ok = out != NULL && PyList_Append(outs, out) == 0;
            Py_XDECREF(out);
        }
        if (ok && (spec_it = PyObject_GetIter(specs)) != NULL) {
            for (Py_ssize_t i = 0; ok && i < PyList_GET_SIZE(outs); i++) {
                PyObject *out_spec = PyIter_Next(spec_it);
                if (out_spec == NULL)
                    break;
                ok = PyObject_SetAttr(PyList_GET_ITEM(outs, i), s_spec, out_spec) == 0;
                Py_DECREF(out_spec);
            }
            ok = ok && !PyErr_Occurred();
        } else {
            ok = 0;
        }
        if (ok)
            result = PyList_GET_SIZE(outs) > 1 ? PyList_AsTuple(outs)
                                               : PySequence_GetItem(outs, 0);
    }
    Py_DECREF(spec);
    Py_XDECREF(specs);
    Py_XDECREF(out_names);
    Py_XDECREF(names_seq);
    Py_XDECREF(outs);
    Py_XDECREF(spec_it);
    return result;
}

/* mirrors dispatch's "Block: view aliasing" (kind == VIEW: return_and_correct_aliasing's storage
 * fix, torch._functionalize_unsafe_set):
 * outs_tuple = wrapped if isinstance(wrapped, tuple) else (wrapped,)
 * for arg_index, return_index in plan.alias_pairs:
 *     ret = outs_tuple[return_index]
 *     for r in ret if isinstance(ret, list) else (ret,): unsafe_set(r, args[arg_index])
 * 0, or -1 with an error. */
static int view_aliasing(DispatchCall *dc, PyObject *wrapped)
{
    PyObject *outs_tuple = NULL, *pairs = NULL, *pairs_seq = NULL;
    int ok = 0;
    int w_tuple = is_instance_builtin(wrapped, &PyTuple_Type);
    if (w_tuple >= 0 &&
        (outs_tuple = w_tuple ? Py_NewRef(wrapped) : PyTuple_Pack(1, wrapped)) != NULL &&
        cfg(cfg_unsafe_set, "unsafe_set") != NULL &&
        (pairs = GET_SLOT(dc->plan, alias_pairs)) != NULL &&
        (pairs_seq = PySequence_Fast(pairs, "alias_pairs must be iterable")) != NULL) {
        ok = 1;
        for (Py_ssize_t i = 0; ok && i < PySequence_Fast_GET_SIZE(pairs_seq); i++) {
            PyObject *pair = PySequence_Fast(PySequence_Fast_GET_ITEM(pairs_seq, i),
                                             "cannot unpack alias pair");
            PyObject *ret = NULL, *targets = NULL, *source = NULL;
            ok = 0;
            if (pair != NULL && PySequence_Fast_GET_SIZE(pair) != 2)
                PyErr_Format(PyExc_ValueError, "%s values to unpack (expected 2, got %zd)",
                             PySequence_Fast_GET_SIZE(pair) > 2 ? "too many" : "not enough",
                             PySequence_Fast_GET_SIZE(pair));
            else if (pair != NULL &&
                     (ret = PyObject_GetItem(outs_tuple, PySequence_Fast_GET_ITEM(pair, 1))) !=
                         NULL) {
                int r_list = is_instance_builtin(ret, &PyList_Type);
                if (r_list >= 0 &&
                    (targets = r_list ? PySequence_Fast(ret, "") : PyTuple_Pack(1, ret)) != NULL) {
                    ok = 1;
                    for (Py_ssize_t j = 0; ok && j < PySequence_Fast_GET_SIZE(targets); j++) {
                        /* args[arg_index] is read per target, as the twin's expression is */
                        source = PyObject_GetItem(dc->args, PySequence_Fast_GET_ITEM(pair, 0));
                        PyObject *res =
                            source != NULL
                                ? PyObject_Vectorcall(
                                      cfg_unsafe_set,
                                      (PyObject *[]){PySequence_Fast_GET_ITEM(targets, j), source},
                                      2, NULL)
                                : NULL;
                        Py_CLEAR(source);
                        ok = res != NULL;
                        Py_XDECREF(res);
                    }
                }
            }
            Py_XDECREF(pair);
            Py_XDECREF(ret);
            Py_XDECREF(targets);
        }
    }
    Py_XDECREF(outs_tuple);
    Py_XDECREF(pairs);
    Py_XDECREF(pairs_seq);
    return ok ? 0 : -1;
}

/* mirrors dispatch._all_in_role: every DTensor type among ``types`` is ``cls``. 1, 0, or -1 on
 * error. */
static int all_in_role(PyObject *types, PyObject *cls)
{
    PyObject *seq = PySequence_Fast(types, "types must be a sequence");
    if (seq == NULL)
        return -1;
    int r = 1;
    for (Py_ssize_t i = 0; r == 1 && i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, i);
        if (t != cls) {
            int sub = PyObject_IsSubclass(t, cfg_dtensor_type);
            r = sub < 0 ? -1 : !sub;
        }
    }
    Py_DECREF(seq);
    return r;
}

/* fn() as a C long (-1 with an exception set on error). */
static long call_long(PyObject *fn)
{
    PyObject *r = PyObject_CallNoArgs(fn);
    if (r == NULL)
        return -1;
    long v = PyLong_AsLong(r);
    Py_DECREF(r);
    return v;
}

/* mirrors dispatch's "Block: role" (see the twin's NOTE): the outputs' type, borrowed, or NULL.
 * out_type = c["fast_type"]; autograd_type = c["autograd_type"]
 * if autograd_type in types:
 *     if kind == VIEW: out_type = autograd_type if type(args[0]) is autograd_type
 *     elif (c["grad_enabled"]() or c["graph_task_id"]() != -1
 *           or _all_in_role(types, autograd_type, dtensor_type)):
 *         out_type = autograd_type */
static PyObject *output_role(DispatchCall *dc, PyObject *kind)
{
    if (cfg(cfg_fast_type, "fast_type") == NULL || cfg(cfg_autograd_type, "autograd_type") == NULL)
        return NULL;
    PyObject *role = cfg_autograd_type;
    int in_types = PySequence_Contains(dc->types, role);
    if (in_types <= 0)
        return in_types < 0 ? NULL : cfg_fast_type;
    int autograd = kind_is(kind, kind_view);
    if (autograd > 0) {
        autograd = PyTuple_Check(dc->args) && PyTuple_GET_SIZE(dc->args) > 0 &&
                   (PyObject *)Py_TYPE(PyTuple_GET_ITEM(dc->args, 0)) == role;
    } else if (autograd == 0) {
        if (cfg(cfg_grad_enabled, "grad_enabled") == NULL ||
            cfg(cfg_graph_task_id, "graph_task_id") == NULL)
            return NULL;
        autograd = dtd_call_truth(cfg_grad_enabled);
        if (autograd == 0) {
            long task = call_long(cfg_graph_task_id);
            if (task == -1 && PyErr_Occurred())
                return NULL;
            autograd = task != -1;
        }
        if (autograd == 0)
            autograd = all_in_role(dc->types, role);
    }
    if (autograd < 0)
        return NULL;
    return autograd ? role : cfg_fast_type;
}

/* mirrors dispatch's "Block: return, by output kind" (torch's _dispatch_fast_path_python_tail
 * and wrap), with "Block: out= outputs" and "Block: view aliasing". New reference. */
static PyObject *return_by_kind(DispatchCall *dc, PyObject *local_result)
{
    PyObject *kind = GET_SLOT(dc->plan, kind), *spec = NULL, *result = NULL;
    if (kind == NULL)
        return NULL;
    int is_kind = kind_is(kind, kind_inplace);
    if (is_kind != 0) {
        /* The plan is fast only when placements do not change: return self, as torch does.
         * return args[0] if plan.output_spec is not None else None */
        if (is_kind > 0 && (spec = GET_SLOT(dc->plan, output_spec)) != NULL)
            result = spec != Py_None ? PySequence_GetItem(dc->args, 0) : Py_NewRef(Py_None);
        goto done;
    }
    if ((is_kind = kind_is(kind, kind_out)) != 0) {
        if (is_kind > 0)
            result = return_out(dc);
        goto done;
    }
    PyObject *out_type = output_role(dc, kind);
    if (out_type == NULL)
        goto done;
    /* wrapped = _wrap(result, plan.output_spec, out_type, c["new"], c["tensor_type"]) */
    if ((spec = GET_SLOT(dc->plan, output_spec)) == NULL || cfg(cfg_new, "new") == NULL ||
        cfg(cfg_tensor_type, "tensor_type") == NULL)
        goto done;
    result = wrap(local_result, spec, out_type, cfg_new, cfg_tensor_type);
    if (result != NULL && ((is_kind = kind_is(kind, kind_view)) < 0 ||
                           (is_kind > 0 && view_aliasing(dc, result) < 0)))
        Py_CLEAR(result);
done:
    Py_DECREF(kind);
    Py_XDECREF(spec);
    return result; /* return wrapped */
}

/* mirrors _native.dispatch.dispatch: the blocks in the twin's order. */
static PyObject *sp_dispatch(PyObject *Py_UNUSED(module), PyObject *const *argv,
                             Py_ssize_t nargsf, PyObject *kwnames)
{
    static const char *const names[] = {"cls", "func", "types", "args", "kwargs"};
    PyObject *a[5];
    if (parse_args("dispatch", argv, PyVectorcall_NARGS(nargsf), kwnames, names, 5, 3, a) < 0)
        return NULL;
    DispatchCall dc = {
        .func = a[1],
        .types = a[2],
        .args = a[3] != NULL ? a[3] : empty_tuple, /* args=() */
        /* if kwargs is None: kwargs = {} (made only when the object itself is needed) */
        .kwargs = (a[4] == NULL || a[4] == Py_None) ? NULL : Py_NewRef(a[4]),
    };
    PyObject *result = NULL, *local_result = NULL;
    buf_init(&dc.local);
    if (load_cache_names() < 0)
        goto done;
    /* Block: custom handlers. */
    int custom = custom_handled(&dc);
    if (custom != 0) {
        if (custom > 0)
            result = dc_slow_path(&dc, s_custom_handler, Py_None, Py_None);
        goto done;
    }
    /* Block: key. key = build_key(func, args, kwargs); if key is None: c["slow_path"](func, args,
     * kwargs, "no key", None, None) */
    if ((dc.key = build_key_full(dc.func, dc.h, dc.args, dc.kwargs)) == NULL)
        goto done;
    if (dc.key == Py_None) {
        result = dc_slow_path(&dc, s_no_key, Py_None, Py_None);
        goto done;
    }
    /* Block: lookup. */
    if (!lookup(&dc, &result))
        goto done;
    /* Block: unwrap, Block: local chunks. dtensor_type = c["dtensor_type"] */
    PyObject *dtensor_type = cfg(cfg_dtensor_type, "dtensor_type");
    if (dtensor_type == NULL || unwrap_args(&dc, dtensor_type) < 0)
        goto done;
    /* Block: local op. */
    if ((local_result = local_op(&dc, dtensor_type)) == NULL)
        goto done;
    /* Block: return, by output kind. */
    result = return_by_kind(&dc, local_result);
done:
    buf_clear(&dc.local);
    Py_XDECREF(dc.kwargs);
    Py_XDECREF(dc.key);
    Py_XDECREF(dc.plan);
    Py_XDECREF(dc.chunks);
    Py_XDECREF(local_result);
    return result;
}

/* ---------------------------------------------------------------------------------------------- */
/* Module                                                                                         */
/* ---------------------------------------------------------------------------------------------- */

static PyMethodDef speedups_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))sp_configure, METH_FASTCALL | METH_KEYWORDS,
     "configure(config: dict) -> None\n\n"
     "Hand over what the hot path needs (see _native.dispatch.configure)."},
    {"build_key", (PyCFunction)(void (*)(void))sp_build_key, METH_FASTCALL | METH_KEYWORDS,
     "build_key(op, args, kwargs) -> tuple | None\n\n"
     "The plan-cache key of one call (see cache.build_key)."},
    {"dispatch", (PyCFunction)(void (*)(void))sp_dispatch, METH_FASTCALL | METH_KEYWORDS,
     "dispatch(cls, func, types, args=(), kwargs=None)\n\n"
     "FastDTensor.__torch_dispatch__ (see _native.dispatch.dispatch)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    "dtdispatch._native._dispatch",
    "The C hot path of dtdispatch; its specification is "
    "dtdispatch._native.dispatch (the Python twin).",
    -1, /* process-global state (see the top of the file): single-phase init, no sub-interpreters */
    speedups_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__dispatch(void)
{
    INTERN(s_local_tensor, "_local_tensor");
    INTERN(s_spec, "_spec");
    INTERN(s_tensor_meta, "tensor_meta");
    INTERN(s_shape, "shape");
    INTERN(s_entries, "entries");
    INTERN(s_fast, "fast");
    INTERN(s_reason, "reason");
    INTERN(s_op_call, "op_call");
    INTERN(s_output_spec, "output_spec");
    INTERN(s_requires_grad, "requires_grad");
    INTERN(s_per_op, "per_op");
    INTERN(s_op, "_op");
    INTERN(s_numel, "numel");
    INTERN(s_ndim, "ndim");
    INTERN(s_stride, "stride");
    INTERN(s_dtype, "dtype");
    INTERN(s_get, "get");
    INTERN(s_op_counters, "op_counters");
    INTERN(s_static_argnum, "static_argnum");
    INTERN(s_static_kwargkey, "static_kwargkey");
    INTERN(s_class, "__class__");
    INTERN(s_call_dunder, "__call__");
    INTERN(s_hash_dunder, "__hash__");
    INTERN(s_hash_attr, "_hash");
    INTERN(s_value_free_ops, "_VALUE_FREE_OPS");
    INTERN(s_chunks, "chunks");
    INTERN(s_needs_pytree, "needs_pytree");
    INTERN(s_rewritten_args, "rewritten_args");
    INTERN(s_kind, "kind");
    INTERN(s_out_names, "out_names");
    INTERN(s_alias_pairs, "alias_pairs");
    INTERN(s_local_call, "local_call");
    INTERN(s_tc_key, "dtdispatch._native._dispatch.thread_cache");
    /* The twin's reason literals (slow_path compares them with ==). */
    INTERN(s_custom_handler, "custom handler");
    INTERN(s_no_key, "no key");
    INTERN(s_miss, "miss");
    INTERN(s_custom_op_handlers, "_custom_op_handlers");
    INTERN(s_explicit_reason, "explicit redistribution context");
    if ((small_one = PyLong_FromLong(1)) == NULL || (small_zero = PyLong_FromLong(0)) == NULL ||
        (empty_tuple = PyTuple_New(0)) == NULL)
        return NULL;
    object_class_descr = _PyType_Lookup(&PyBaseObject_Type, s_class);
    if (object_class_descr == NULL) {
        PyErr_SetString(PyExc_SystemError, "object.__class__ not found");
        return NULL;
    }
    Py_INCREF(object_class_descr);
    if (dtd_shared_init(speedups_module.m_name) < 0)
        return NULL;
    PyObject *collections = PyImport_ImportModule("collections");
    if (collections == NULL)
        return NULL;
    odict_type = PyObject_GetAttrString(collections, "OrderedDict");
    Py_DECREF(collections);
    if (odict_type == NULL)
        return NULL;
    return PyModule_Create(&speedups_module);
}
