"""libmodsecurity3 (ModSecurity v3) through ctypes, over its C API (modsecurity/modsecurity.h,
rules_set.h, transaction.h, intervention.h).

ctypes rather than a compiled binding: the maintained Python bindings no longer build, and the
C API is small and stable. Foreign calls release the GIL, so the engine can also run in worker
threads. Strings the library allocates for an intervention (url, log) are freed with free(), as
the C API requires: the process's free(), the one the library's malloc pairs with (a preloaded
allocator, origin/allocator.py, replaces both).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable
from typing import Any

LIB_CANDIDATES = ("libmodsecurity.so.3", "libmodsecurity.so")


class _Intervention(ctypes.Structure):
    # modsecurity/intervention.h: ModSecurityIntervention_t
    _fields_ = [
        ("status", ctypes.c_int),
        ("pause", ctypes.c_int),
        ("url", ctypes.c_void_p),
        ("log", ctypes.c_void_p),
        ("disruptive", ctypes.c_int),
    ]


LOG_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)


class ModSecurityError(Exception):
    pass


def _load() -> ctypes.CDLL:
    errors = []
    for name in LIB_CANDIDATES:
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            errors.append(str(exc))
    found = ctypes.util.find_library("modsecurity")
    if found:
        return ctypes.CDLL(found)
    raise ModSecurityError(
        "libmodsecurity3 is not installed (Debian: apt-get install libmodsecurity3 "
        "modsecurity-crs): " + "; ".join(errors)
    )


class _Lib:
    """Function prototypes, declared once."""

    def __init__(self) -> None:
        lib = _load()
        # the process's free() as the library's malloc resolved it: a preloaded allocator
        # (origin.allocator, LD_PRELOAD) replaces both, and libc.so.6's own free() would then
        # be handed a pointer it never allocated (the worker crashed on the first block)
        self.free = ctypes.CDLL(None).free
        self.free.argtypes = [ctypes.c_void_p]
        self.free.restype = None
        p, c, i, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t

        def fn(name: str, restype: object, *argtypes: object) -> Callable[..., Any]:
            f = getattr(lib, name)
            f.restype = restype
            f.argtypes = list(argtypes)
            return f  # type: ignore[no-any-return]

        self.msc_init = fn("msc_init", p)
        self.msc_who_am_i = fn("msc_who_am_i", c, p)
        self.msc_set_connector_info = fn("msc_set_connector_info", None, p, c)
        self.msc_set_log_cb = fn("msc_set_log_cb", None, p, LOG_CB)
        self.msc_cleanup = fn("msc_cleanup", None, p)
        self.msc_create_rules_set = fn("msc_create_rules_set", p)
        self.msc_rules_add_file = fn("msc_rules_add_file", i, p, c, ctypes.POINTER(c))
        self.msc_rules_add = fn("msc_rules_add", i, p, c, ctypes.POINTER(c))
        self.msc_rules_cleanup = fn("msc_rules_cleanup", i, p)
        self.msc_new_transaction_with_id = fn("msc_new_transaction_with_id", p, p, p, c, p)
        self.msc_process_connection = fn("msc_process_connection", i, p, c, i, c, i)
        self.msc_process_uri = fn("msc_process_uri", i, p, c, c, c)
        self.msc_add_n_request_header = fn("msc_add_n_request_header", i, p, c, sz, c, sz)
        self.msc_process_request_headers = fn("msc_process_request_headers", i, p)
        self.msc_append_request_body = fn("msc_append_request_body", i, p, c, sz)
        self.msc_process_request_body = fn("msc_process_request_body", i, p)
        self.msc_add_n_response_header = fn("msc_add_n_response_header", i, p, c, sz, c, sz)
        self.msc_process_response_headers = fn("msc_process_response_headers", i, p, i, c)
        self.msc_intervention = fn("msc_intervention", i, p, ctypes.POINTER(_Intervention))
        self.msc_process_logging = fn("msc_process_logging", i, p)
        self.msc_transaction_cleanup = fn("msc_transaction_cleanup", None, p)


_LIB: _Lib | None = None
_LIB_LOCK = threading.Lock()


def lib() -> _Lib:
    global _LIB
    with _LIB_LOCK:
        if _LIB is None:
            _LIB = _Lib()
        return _LIB
