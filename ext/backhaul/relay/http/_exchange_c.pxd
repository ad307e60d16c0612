# Types of the compiled HTTP exchange machine. The source is _exchange_c.py, a symlink to
# src/backhaul/relay/http/_exchange_py.py; this augmenting .pxd makes ExchangeMachine a
# cdef class whose steps within a request are C calls (cpdef: its parts call them too).
# Nothing here changes behaviour. Fields the parts (router, link, messages, pacing) and
# the connection read or set are public.

cimport cython


@cython.final
cdef class ExchangeMachine:
    # HttpLimits.
    cdef public object limits
    # The edge as the machine reads it: routes, closing, gate.
    cdef public object site
    # "http" or "https"; the connection's id; the user's address, and with the port.
    cdef public str scheme
    cdef public str conn_id
    cdef public str client_ip
    cdef public str client
    # The connection's loop time (seconds, monotonic).
    cdef public object clock
    # The user's transport can half-close (not TLS).
    cdef public bint can_write_eof
    # Say DONE for each request (DEBUG logging).
    cdef public bint trace
    # The RequestReader and its events deque.
    cdef public object reader
    cdef public object events
    # The actions for the connection: flat kind, value pairs.
    cdef public list actions
    # The State (an enum member, compared with `is`).
    cdef public object state
    # The Exchange under way, or None.
    cdef public object ex
    # The parts: Router, BackendLink, Messages, Pacing.
    cdef public object router
    cdef public object link
    cdef public object messages
    cdef public object pacing
    # Requests completed (and the number of the next id).
    cdef public Py_ssize_t requests
    # The user half-closed; a 101 switched the connection to raw bytes.
    cdef public bint user_eof
    cdef public bint upgraded
    # The reader refused what follows the queued events (an HttpError), or None.
    cdef public object refusal
    # pump() is running (a pump it causes returns at once).
    cdef bint _pumping

    cpdef move(self, step)
    cpdef pump(self)
    cdef _refuse(self, error)
    cpdef continued(self, ex)
    cdef _request_end(self, ex)
    cpdef exchange_done(self)
    cpdef close(self)
