"""libca through ctypes: the prototypes, callbacks and buffers the ``pyepics`` backend uses.

The library is the one pyepics ships (and locates); :func:`load` opens it with a ctypes handle
of its own. libca calls back on its own threads with an integer token as the user argument,
which :func:`register_handler` maps to a Python handler.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import itertools
import threading
from collections.abc import Callable
from typing import Any

from .base import log
from .values import (
    DBR_CHAR,
    DBR_DOUBLE,
    DBR_ENUM,
    DBR_FLOAT,
    DBR_LONG,
    DBR_SHORT,
    DBR_STRING,
    MAX_STRING_SIZE,
)

ECA_NORMAL = 1  # the status of a call (or a callback's answer) that succeeded
CA_OP_CONN_UP = 6  # connection_handler_args.op when the channel connects
_CHANNEL_CTYPES: dict[int, Any] = {
    DBR_SHORT: ctypes.c_int16,
    DBR_FLOAT: ctypes.c_float,
    DBR_ENUM: ctypes.c_uint16,
    DBR_CHAR: ctypes.c_uint8,
    DBR_LONG: ctypes.c_int32,
    DBR_DOUBLE: ctypes.c_double,
}


class EventArgs(ctypes.Structure):
    """``struct event_handler_args`` (db_access.h / cadef.h)."""

    _fields_ = [
        ("usr", ctypes.c_void_p),
        ("chid", ctypes.c_void_p),
        ("type", ctypes.c_long),
        ("count", ctypes.c_long),
        ("dbr", ctypes.c_void_p),
        ("status", ctypes.c_int),
    ]


class ConnectionArgs(ctypes.Structure):
    """``struct connection_handler_args``."""

    _fields_ = [("chid", ctypes.c_void_p), ("op", ctypes.c_long)]


EVENT_CALLBACK = ctypes.CFUNCTYPE(None, EventArgs)
CONNECTION_CALLBACK = ctypes.CFUNCTYPE(None, ConnectionArgs)

# libca gets an integer token as its user argument, never a Python object: a callback that
# arrives after its waiter gave up finds no handler and is dropped, with nothing dangling.
_handlers: dict[int, Callable[[Any], None]] = {}
_handlers_lock = threading.Lock()
_tokens = itertools.count(1)


def register_handler(handler: Callable[[Any], None]) -> int:
    """The token to pass libca as the user argument for callbacks to reach ``handler``."""
    token = next(_tokens)
    with _handlers_lock:
        _handlers[token] = handler
    return token


def unregister_handler(token: int) -> None:
    """Drop the handler: callbacks that still arrive with ``token`` are ignored."""
    with _handlers_lock:
        _handlers.pop(token, None)


def _dispatch(token: int | None, args: Any) -> None:
    with _handlers_lock:
        handler = _handlers.get(token or 0)
    if handler is None:
        return
    try:
        handler(args)
    except Exception:  # an exception must not cross back into libca
        log.exception("libca callback failed")


def _on_event(args: EventArgs) -> None:
    _dispatch(args.usr, args)


def _on_connection(args: ConnectionArgs) -> None:
    _dispatch(load().ca_puser(args.chid), args)


ON_EVENT = EVENT_CALLBACK(_on_event)
ON_CONNECTION = CONNECTION_CALLBACK(_on_connection)


@functools.cache
def load() -> Any:
    """libca as pyepics ships it, with the prototypes of the functions the backend calls.

    The library is opened through its own ctypes handle: pyepics's module state (its
    initial context, channel caches, atexit clean-up) is left untouched.
    """
    epics_ca = importlib.import_module("epics.ca")
    lib = ctypes.CDLL(str(epics_ca.find_libca()))
    prototypes: dict[str, tuple[Any, list[Any]]] = {
        "ca_context_create": (ctypes.c_int, [ctypes.c_int]),
        "ca_context_destroy": (None, []),
        "ca_create_channel": (
            ctypes.c_int,
            [ctypes.c_char_p, CONNECTION_CALLBACK, ctypes.c_void_p, ctypes.c_int,
             ctypes.POINTER(ctypes.c_void_p)],
        ),
        "ca_clear_channel": (ctypes.c_int, [ctypes.c_void_p]),
        "ca_puser": (ctypes.c_void_p, [ctypes.c_void_p]),
        "ca_field_type": (ctypes.c_short, [ctypes.c_void_p]),
        "ca_element_count": (ctypes.c_ulong, [ctypes.c_void_p]),
        "ca_write_access": (ctypes.c_uint, [ctypes.c_void_p]),
        "ca_array_get_callback": (
            ctypes.c_int,
            [ctypes.c_long, ctypes.c_ulong, ctypes.c_void_p, EVENT_CALLBACK, ctypes.c_void_p],
        ),
        "ca_array_put_callback": (
            ctypes.c_int,
            [ctypes.c_long, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_void_p, EVENT_CALLBACK,
             ctypes.c_void_p],
        ),
        "ca_create_subscription": (
            ctypes.c_int,
            [ctypes.c_long, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_long, EVENT_CALLBACK,
             ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)],
        ),
        "ca_clear_subscription": (ctypes.c_int, [ctypes.c_void_p]),
        "ca_flush_io": (ctypes.c_int, []),
        "ca_message": (ctypes.c_char_p, [ctypes.c_long]),
    }  # fmt: skip
    for name, (restype, argtypes) in prototypes.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    return lib


def message(status: int) -> str:
    """libca's text for a status code (``ca_message``)."""
    raw = load().ca_message(status)
    return raw.decode(errors="replace") if raw else f"CA status {status}"


def event_elements(args: EventArgs, dbr_type: int) -> list[Any]:
    """Copy the elements of ``dbr_type`` an event delivered out of libca's buffer (host byte order)."""
    address, count = args.dbr, int(args.count)
    if not address or count <= 0:
        return []
    if dbr_type == DBR_STRING:
        raw = ctypes.string_at(address, MAX_STRING_SIZE * count)
        return [raw[i * MAX_STRING_SIZE : (i + 1) * MAX_STRING_SIZE] for i in range(count)]
    array_type = _CHANNEL_CTYPES[dbr_type] * count
    return list(array_type.from_address(address))


def put_buffer(dbr_type: int, elements: list[Any]) -> Any:
    """A ctypes buffer holding ``elements`` of ``dbr_type``, as a put sends them."""
    if dbr_type == DBR_STRING:
        buffer = ctypes.create_string_buffer(MAX_STRING_SIZE * len(elements))
        for i, raw in enumerate(elements):
            ctypes.memmove(ctypes.addressof(buffer) + i * MAX_STRING_SIZE, raw, len(raw))
        return buffer
    return (_CHANNEL_CTYPES[dbr_type] * len(elements))(*elements)
