# Types of the compiled HTTP message readers. The source is _reader_c.py, a symlink to
# src/backhaul/relay/http/_reader_py.py; this augmenting .pxd turns its classes into cdef
# classes (httptools then calls their methods without a Python frame per callback).
# Nothing here changes behaviour.

cimport cython


@cython.final
@cython.freelist(16)
cdef class Request:
    # The method, e.g. "GET" (ASCII).
    cdef public str method
    # The request-target as sent (an absolute form is rewritten to origin form by heads.authority).
    cdef public bytes target
    # "1.1" or "1.0".
    cdef public str version
    # (name, value) pairs as sent, bytes.
    cdef public list headers
    # The names of `headers` lower-cased once, same order (translate reads these).
    cdef public list names
    # The Host header's value (or an absolute form's authority), or None.
    cdef public object host
    # llhttp's verdict on keep-alive (version and Connection).
    cdef public bint keep_alive
    # NO_BODY, LENGTH or CHUNKED.
    cdef public int framing
    # The Content-Length (at most 18 digits, so it fits).
    cdef public long long length
    # An Upgrade request (llhttp's should_upgrade).
    cdef public bint upgrade
    # Expect: 100-continue.
    cdef public bint expect_continue
    # Lower-cased tokens of the Connection headers.
    cdef public frozenset connection


@cython.final
@cython.freelist(16)
cdef class Response:
    # The status code.
    cdef public int status
    # The reason phrase as sent.
    cdef public bytes reason
    # "1.1" or "1.0".
    cdef public str version
    # (name, value) pairs as sent, bytes.
    cdef public list headers
    # The names of `headers` lower-cased once, same order.
    cdef public list names
    # llhttp's verdict on keep-alive.
    cdef public bint keep_alive
    # NO_BODY, LENGTH, CHUNKED or UNTIL_CLOSE.
    cdef public int framing
    # The Content-Length.
    cdef public long long length
    # Lower-cased tokens of the Connection headers.
    cdef public frozenset connection


cdef class _Reader:
    # The events deque the edge drains; read by the exchange, never replaced.
    cdef readonly object events
    # The httptools parser (refers back to this reader); None once closed.
    cdef object _parser
    # The head under way: its (name, value) pairs and their lower-cased names.
    cdef list _headers
    cdef list _names
    # Header bytes and lines of the head (or trailers) under way, against the limits.
    cdef Py_ssize_t _header_bytes
    cdef Py_ssize_t _header_count
    # A head has started and is not complete.
    cdef bint _in_head
    # Bytes fed since the head under way started (the head-size guard; readonly: a test reads it).
    cdef readonly Py_ssize_t _head_bytes
    # Refused or upgraded: no more input is taken.
    cdef bint _dead
    # The header limits (HttpLimits) and the status a refused head gets.
    cdef Py_ssize_t _max_bytes
    cdef Py_ssize_t _max_count
    cdef int _status
    # What the head's headers said so far: Connection tokens, Content-Length, framing.
    cdef frozenset _connection
    cdef long long _length
    cdef int _framing
    # The first refusal a header of the head earned (raised when the head is complete).
    cdef object _error

    cdef _begin(self)
    cdef _note(self, bytes lower, bytes value)
    cdef _parse(self, data, str what)
    cdef _feed(self, data, Py_ssize_t guard, str what)
    cdef _failed(self, exc, str what)


# (not @cython.final: Cython then refuses the _note override)
cdef class RequestReader(_Reader):
    # HttpLimits.
    cdef object _limits
    # The request-target under way (httptools may hand it over in pieces).
    cdef bytes _url
    # The last head announced a body that has not ended yet.
    cdef public bint mid_body
    # De-chunked body bytes read so far, and their count when the last head was complete.
    cdef public long long body_bytes
    cdef public long long body_start
    # The Host value, how many Host and Content-Length headers, Expect: 100-continue.
    cdef object _host
    cdef Py_ssize_t _hosts
    cdef Py_ssize_t _lengths
    cdef bint _expect

    cdef _note(self, bytes lower, bytes value)


cdef class ResponseReader(_Reader):
    # HttpLimits.
    cdef object _limits
    # The reason phrase under way.
    cdef bytes _reason
    # The next response answers HEAD / may be a 101.
    cdef bint _no_body
    cdef bint _upgrade_ok
    # The framing of the response under way (an UNTIL_CLOSE body ends at eof).
    cdef int _body_framing
    # A HEAD response is complete: the parser is replaced after this feed.
    cdef bint _skip
    # A body is under way.
    cdef bint _in_body

    cdef _note(self, bytes lower, bytes value)
