"""What the HTTP exchange machine (relay/http/exchange.py) asks of its connection.

The machine appends ``kind, value`` pairs to its ``actions`` list (flat: no tuple per
action); the connection (relay/http/connection.py) carries them out in order. The value
each kind carries is said beside it. The timer is not among them: the machine's
``pacing`` says what it waits for and when it was armed anew (relay/http/pacing.py).
"""

WRITE = 0  # bytes: to the user
SEND = 1  # bytes: to the stream
# (2: the timer is not an action: Pacing.due says when it is armed anew)
PAUSE = 3  # None: stop reading the user's socket
RESUME = 4  # None: read it again
OPEN = 5  # Exchange: open a new stream for it (relay.opening); then BackendLink.open_failed, or its events
REOPEN = 6  # Exchange: offer the same stream to another connector (the last one refused it)
END_STREAM = 7  # None: let the stream go with its FIN (counted out as NO_ERROR)
RESET_STREAM = 8  # reason: let the stream go with a reset (counted out as CANCEL unless it has a code)
FORGET_STREAM = 9  # error code: let go of a stream the tunnel ended; it ended with that code
HALF_CLOSE = 10  # None: FIN on the stream, which stays (the upgraded user half-closed)
WRITE_EOF = 11  # None: half-close the user's side (the upgraded backend did)
GATE = 12  # (Exchange, RequestHead): ask the gate; answer with Router.gate_answered / gate_failed
CLOSE = 13  # None: close the user's connection after what was written
ABORT = 14  # reason: drop the user's connection now
COUNT = 15  # name: one more of that event (RelayMetrics.count)
LOG = 16  # (level, message, extra, exc_info): one log line
DONE = 17  # Exchange: one request is complete
