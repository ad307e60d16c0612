"""The OpenSSL API that an ``ssl.SSLContext`` wraps, for the few settings the ssl module lacks.

Python's ``ssl`` module exposes most of OpenSSL's server configuration but not all of it.
What it lacks is reached here through ctypes, against the libssl that the ``_ssl``
extension module is linked with, on the ``SSL_CTX *`` that an ``ssl.SSLContext`` holds:
CPython's ``PySSLContext`` struct starts with ``PyObject_HEAD`` and then that pointer
(``Modules/_ssl.c``, unchanged since 3.7). Before anything is changed through the
pointer, it is checked against what the context reports through the ssl module itself
(verify mode and options), so a different layout is detected and nothing is touched.

Every function here returns False when the symbols, the layout or the library are not
what this module expects; the caller logs that once and carries on with the ssl
module's behaviour. Nothing here runs per packet or per byte: a callback installed
here runs once per TLS handshake.

- ``refuse_unknown_alpn(ctx, protocols)``: the ssl module's server-side ALPN selection
  (``SSL_select_next_proto``) answers a client whose offered protocols are all unknown
  with no protocol and no alert, so the connection looks like one that offered none.
  RFC 7301 section 3.2 says a server SHOULD then fail the handshake with the
  ``no_application_protocol`` alert; the callback installed here does that. (asyncio's
  and uvloop's TLS protocols close the socket on a failed handshake without sending
  what OpenSSL wrote for the peer, the alert included: ``on_refused`` is told, with the
  connection's ``ssl.SSLObject``, so that its owner can send the alert itself.)
- ``set_ciphersuites(ctx, suites)``: the TLS 1.3 cipher suites and their order
  (``SSL_CTX_set_ciphersuites``), which ``SSLContext.set_ciphers`` does not reach.
- ``enable_ktls(ctx)``: OpenSSL 3's ``SSL_OP_ENABLE_KTLS``, which the ssl module names only
  from Python 3.12 (kernel TLS; it applies only where OpenSSL owns the socket, see
  backhaul.tls_kernel).
"""

from __future__ import annotations

import ctypes
import logging
import ssl
from typing import Callable

log = logging.getLogger("backhaul.tls")

# openssl/tls1.h
SSL_TLSEXT_ERR_OK = 0
SSL_TLSEXT_ERR_ALERT_FATAL = 2
SSL_TLSEXT_ERR_NOACK = 3

#: int (*)(SSL *ssl, const unsigned char **out, unsigned char *outlen,
#:         const unsigned char *in, unsigned int inlen, void *arg)
_ALPN_SELECT_CB = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.POINTER(ctypes.c_ubyte),
    ctypes.c_void_p,
    ctypes.c_uint,
    ctypes.c_void_p,
)

# The attribute of an SSLContext that keeps its callback alive as long as the context:
# OpenSSL holds only a C pointer to it.
_KEEP = "_backhaul_alpn_select_cb"


def _libssl() -> ctypes.CDLL | None:
    """The libssl the ssl module uses: the _ssl extension's own link (or the process's)."""
    try:
        import _ssl

        path = getattr(_ssl, "__file__", None)
        return ctypes.CDLL(path) if path else ctypes.CDLL(None)
    except OSError:
        return None


def ssl_ctx_pointer(ctx: ssl.SSLContext, lib: ctypes.CDLL | None = None) -> int | None:
    """The ``SSL_CTX *`` of ``ctx``, or None when it cannot be found and checked safely."""
    lib = lib if lib is not None else _libssl()
    if lib is None:
        return None
    try:
        get_verify_mode = lib.SSL_CTX_get_verify_mode
        get_options = lib.SSL_CTX_get_options  # a function since OpenSSL 3.0 (a macro before)
    except AttributeError:
        return None
    get_verify_mode.argtypes = [ctypes.c_void_p]
    get_verify_mode.restype = ctypes.c_int
    get_options.argtypes = [ctypes.c_void_p]
    get_options.restype = ctypes.c_uint64
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer:
        return None
    # CERT_NONE / CERT_OPTIONAL / CERT_REQUIRED are SSL_VERIFY_NONE / PEER / PEER|FAIL_IF_NO_PEER_CERT.
    wanted_mode = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}[ctx.verify_mode]
    if get_verify_mode(pointer) != wanted_mode or get_options(pointer) != int(ctx.options):
        return None
    return pointer


def _ctx_function(ctx: ssl.SSLContext, name: str, argtypes: list, restype) -> tuple | None:
    """(libssl, the ``SSL_CTX *`` of ``ctx``, libssl's function ``name`` with its C types),
    or None when any of them cannot be reached as this module expects."""
    lib = _libssl()
    pointer = ssl_ctx_pointer(ctx, lib)
    if pointer is None:
        return None
    function = getattr(lib, name, None)  # a CDLL raises AttributeError for a missing symbol
    if function is None:
        return None
    function.argtypes = argtypes
    function.restype = restype
    return lib, pointer, function


def _parse_protocols(wire: bytes) -> dict[bytes, int] | None:
    """The client's ALPN list (length-prefixed names) as name -> offset of the name in
    ``wire``, or None when it is malformed."""
    names: dict[bytes, int] = {}
    i = 0
    while i < len(wire):
        n = wire[i]
        if n == 0 or i + 1 + n > len(wire):
            return None
        names.setdefault(wire[i + 1 : i + 1 + n], i + 1)
        i += 1 + n
    return names


def _ssl_object_of(lib: ctypes.CDLL, ssl_pointer: int) -> ssl.SSLObject | None:
    """The ``ssl.SSLObject`` of an ``SSL *``: the _ssl module keeps its ``_ssl._SSLSocket``
    as the SSL's app data (ex_data 0), and that object's ``owner`` is the SSLObject."""
    import _ssl

    address = lib.SSL_get_ex_data(ssl_pointer, 0)
    if not address:
        return None
    socket_object = ctypes.cast(address, ctypes.py_object).value
    if not isinstance(socket_object, _ssl._SSLSocket):
        return None
    owner = socket_object.owner
    return owner if isinstance(owner, ssl.SSLObject) else None


def refuse_unknown_alpn(
    ctx: ssl.SSLContext, protocols: list[str], on_refused: Callable[[ssl.SSLObject], None] | None = None
) -> bool:
    """Make ``ctx`` (a server context) choose among ``protocols`` in that order of preference,
    and fail the handshake with ``no_application_protocol`` when a client offers ALPN but
    none of them. A client that offers no ALPN is not affected (OpenSSL calls the
    callback only when the extension is present). True when installed; False (ctx
    unchanged) when OpenSSL cannot be reached as this module expects.

    Call it after ``ctx.set_alpn_protocols`` (which installs the ssl module's own callback).
    """
    reached = _ctx_function(ctx, "SSL_CTX_set_alpn_select_cb", [ctypes.c_void_p, _ALPN_SELECT_CB, ctypes.c_void_p], None)
    if reached is None:
        return False
    lib, pointer, set_cb = reached
    if on_refused is not None:
        try:
            lib.SSL_get_ex_data.argtypes = [ctypes.c_void_p, ctypes.c_int]
            lib.SSL_get_ex_data.restype = ctypes.c_void_p
        except AttributeError:
            return False
    preferred = [p.encode("ascii") for p in protocols]

    def select(_ssl, out, outlen, inp, inlen, _arg):
        try:
            wire = ctypes.string_at(inp, inlen)
            offered = _parse_protocols(wire)
            if offered is None:
                return SSL_TLSEXT_ERR_ALERT_FATAL
            for name in preferred:
                offset = offered.get(name)
                if offset is not None:
                    # *out must point into memory that outlives the callback: the client's list.
                    out[0] = inp + offset
                    outlen[0] = len(name)
                    return SSL_TLSEXT_ERR_OK
            if on_refused is not None:
                ssl_object = _ssl_object_of(lib, _ssl)
                if ssl_object is not None:
                    on_refused(ssl_object)
            return SSL_TLSEXT_ERR_ALERT_FATAL
        except Exception:  # an exception must not cross into C; behave as the ssl module does
            log.exception("ALPN selection failed; the connection goes on without ALPN")
            return SSL_TLSEXT_ERR_NOACK

    callback = _ALPN_SELECT_CB(select)
    setattr(ctx, _KEEP, callback)
    set_cb(pointer, callback, None)
    return True


def set_ciphersuites(ctx: ssl.SSLContext, suites: str) -> bool:
    """Set the TLS 1.3 cipher suites of ``ctx`` to ``suites`` (OpenSSL's colon-separated
    names, in order of preference). The ssl module has no ``set_ciphersuites`` before
    Python 3.15 (``set_ciphers`` only reaches TLS 1.2 and below). True when set; False
    (ctx unchanged) when OpenSSL cannot be reached as this module expects; ValueError
    when OpenSSL refuses the list (no suite of it is known)."""
    reached = _ctx_function(ctx, "SSL_CTX_set_ciphersuites", [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int)
    if reached is None:
        return False
    lib, pointer, setter = reached
    if setter(pointer, suites.encode("ascii")) != 1:
        clear = getattr(lib, "ERR_clear_error", None)
        if clear is not None:
            clear()  # what OpenSSL queued about the refusal must not surface in a later ssl call
        raise ValueError(f"OpenSSL refuses the TLS 1.3 cipher suites {suites!r}")
    return True


#: openssl/ssl.h (OpenSSL 3.0): SSL_OP_ENABLE_KTLS
SSL_OP_ENABLE_KTLS = 1 << 3


def enable_ktls(ctx: ssl.SSLContext) -> bool:
    """Set ``SSL_OP_ENABLE_KTLS`` on ``ctx``: OpenSSL then hands the record layer to the
    kernel after the handshake, when the kernel and the suite allow and OpenSSL reads and
    writes the socket itself. True when set (through the ssl module on 3.12+, else
    ``SSL_CTX_set_options``); False when OpenSSL is older than 3.0 or cannot be reached."""
    option = getattr(ssl, "OP_ENABLE_KTLS", None)
    if option is not None:
        ctx.options |= option
        return True
    if ssl.OPENSSL_VERSION_INFO < (3, 0):
        return False
    reached = _ctx_function(ctx, "SSL_CTX_set_options", [ctypes.c_void_p, ctypes.c_uint64], ctypes.c_uint64)
    if reached is None:
        return False
    _, pointer, set_options = reached
    set_options(pointer, SSL_OP_ENABLE_KTLS)
    return bool(int(ctx.options) & SSL_OP_ENABLE_KTLS)
