"""Settings of every part, as frozen dataclasses passed in; defaults live here and only here."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from backhaul.protocol.constants import INITIAL_STREAM_WINDOW, INITIAL_TUNNEL_WINDOW

#: How often a connector pulls its config when nothing wakes it sooner (seconds); the control API sends it.
REFRESH_INTERVAL = 120
#: Default lifetime of a release manifest (days): a connector refuses it afterwards, so a relay
#: (or anyone) replaying a withdrawn release has a quarter of a year at most.
RELEASE_EXPIRES_DAYS = 90.0


def _require_positive(limits, what: str, switches: tuple[str, ...] = ()) -> None:
    """ValueError naming the first field of ``limits`` that is not positive (a switch: not 0 or 1)."""
    for field in dataclasses.fields(limits):
        value = getattr(limits, field.name)
        if field.name in switches:
            if value not in (0, 1):
                raise ValueError(f"{what} {field.name} is a switch: 0 (off) or 1 (on)")
        elif value <= 0:
            raise ValueError(f"{what} {field.name} must be positive")


def _replace_from(limits, assignments: list[str], flag: str):
    """``limits`` with ``NAME=VALUE`` assignments of a command-line ``flag`` applied (ints stay ints)."""
    types = {field.name: field.type for field in dataclasses.fields(limits)}
    changes: dict[str, float | int] = {}
    for item in assignments:
        name, sep, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in types:
            raise ValueError(f"{flag} {item!r}: expected NAME=VALUE with NAME one of {', '.join(types)}")
        try:
            changes[name] = float(raw) if types[name] in (float, "float") else int(raw)
        except ValueError:
            raise ValueError(f"{flag} {item!r}: {raw!r} is not a number") from None
    return dataclasses.replace(limits, **changes)


@dataclasses.dataclass(frozen=True)
class FlowControl:
    """Windows and buffer limits of one tunnel; the flow-control defaults in one place.

    A receiver never buffers more than ``stream_window`` bytes for one stream nor more
    than ``tunnel_window`` bytes for all streams of one tunnel; a sender never has more
    than that in flight. ``stream_window`` is large enough that one stream is not held
    back by the multiplexer on a fast path (it must cover bandwidth x event-loop delay).
    """

    stream_window: int = 4 * 1024 * 1024
    tunnel_window: int = 64 * 1024 * 1024
    #: Credit is returned once this fraction of a window has been consumed, so WINDOW
    #: frames are batched instead of one per DATA frame.
    window_update_ratio: float = 0.25
    #: Largest DATA payload this side sends; at most constants.MAX_PAYLOAD.
    max_frame_payload: int = 256 * 1024
    #: Streams one tunnel may hold open at once; OPENs beyond get REFUSED_STREAM.
    max_streams: int = 32768
    #: Socket read size for user and target sockets (BufferedProtocol buffer).
    read_size: int = 256 * 1024
    #: Transport write-buffer limits; above ``write_high`` the producer is paused.
    write_high: int = 1024 * 1024
    write_low: int = 256 * 1024
    #: Write-buffer limits of a tunnel's TLS transport; above ``tunnel_write_high`` every
    #: socket feeding the tunnel stops being read, so the tunnel buffers far less than its window.
    tunnel_write_high: int = 4 * 1024 * 1024
    tunnel_write_low: int = 1024 * 1024
    #: Seconds a closing tunnel may take to hand its last bytes (the GOAWAY) to the peer; then
    #: the connection is aborted. A graceful close waits for the write buffer to drain, so a
    #: peer that never reads would otherwise keep the connection and its buffer for ever.
    tunnel_close_timeout: float = 5.0
    #: After a flood (FloodLimits) reading stops at once and the connection is aborted this
    #: soon, instead of a TLS close, which reads (and decrypts, and discards) what the flooding
    #: peer keeps sending until its close_notify. The GOAWAY has left by then; a peer that is
    #: not reading may lose it to the reset, and learns the reason from the closed tunnel.
    flood_close_timeout: float = 0.5

    def __post_init__(self) -> None:
        # Windows only grow on the wire, so nothing below the protocol's initial windows works.
        if self.stream_window < INITIAL_STREAM_WINDOW or self.tunnel_window < INITIAL_TUNNEL_WINDOW:
            raise ValueError("stream_window must be >= 256 KiB and tunnel_window >= 1 MiB (protocol.md)")
        if not 0 < self.window_update_ratio <= 1 or not 1 <= self.max_frame_payload <= 256 * 1024:
            raise ValueError("window_update_ratio must be in (0, 1] and max_frame_payload in 1..256 KiB")
        if self.write_low > self.write_high or self.tunnel_write_low > self.tunnel_write_high:
            raise ValueError("write_low must not exceed write_high (for sockets and for tunnels)")
        if self.tunnel_close_timeout <= 0 or self.flood_close_timeout <= 0:
            raise ValueError("tunnel_close_timeout and flood_close_timeout must be above 0 seconds")


@dataclasses.dataclass(frozen=True)
class FloodLimits:
    """How much work that brings nothing one end of a tunnel may make the other do (mux.Session).

    A connector certificate is not a licence to exhaust the relay, nor is a relay's
    certificate one to exhaust a connector: both ends apply the same limits (docs/protocol.md,
    "Flood limits"). HTTP/2 servers learnt this from the ping, reset and settings floods
    (CVE-2019-9512, -9514, -9515) and rapid reset (CVE-2023-44487); the values here sit near
    Envoy's, nghttp2's and Go's defences.

    Each ``*_burst``/``*_rate`` pair is a token bucket: ``burst`` frames at once, refilled at
    ``rate`` per second, and some buckets also earn tokens from useful work, so a legitimate
    burst is absorbed and only a sustained flood empties them. A frame beyond its bucket ends
    the tunnel with GOAWAY ENHANCE_YOUR_CALM. DATA is not limited here: the windows bound it.
    """

    #: PINGs: each costs a PONG. Our keepalive sends one after Keepalive.interval (10 s) of
    #: silence, so ten a second is a hundred times what a peer of ours sends (ping flood).
    ping_burst: int = 100
    ping_rate: float = 10.0
    #: CONTROL messages: each is a JSON decode and a callback into the relay or connector. Ours:
    #: one hello per tunnel, health reports on a change (about 12 KiB of entries each, so a few
    #: messages even for thousands of apps), one config_changed per change.
    control_burst: int = 1000
    control_rate: float = 100.0
    #: Unwanted streams: OPENs refused without work (by the session, or by the owner with
    #: PROTOCOL_ERROR, REFUSED_STREAM, UNKNOWN_APP or TARGET_NOT_ALLOWED: the relay refuses every
    #: OPEN from a connector), each costing an OPEN_FAIL, and streams the peer opened and reset
    #: before they were accepted (rapid reset, each costing a target connect started for
    #: nothing). Every accepted stream earns a token back, so tens of thousands of streams a
    #: second with some refusals never trip it; a pure flood does after burst + rate x seconds.
    #: Refusals after real work (the target refused or timed out) are not counted. nghttp2's
    #: stream-reset limit is 1000 at once and 33 a second; ours earns from accepted streams too.
    unwanted_stream_burst: int = 1000
    unwanted_stream_rate: float = 100.0
    #: Idle frames, which bring no work: RST, FIN, OPEN_OK or OPEN_FAIL for a stream already
    #: closed, empty DATA without END (Envoy allows one in a row; we never send one), a PONG
    #: nobody asked for, a GOAWAY after the first two (a drain, then the close), a DATAGRAM for
    #: a flow that is not open (a few cross a flow's RST; DATAGRAMs are not flow-controlled,
    #: so a flood of them would otherwise cost a decode and a table lookup each). A close may
    #: legitimately cross a frame or two in flight, so each stream opened (either way) earns
    #: ``idle_frames_per_stream`` tokens.
    idle_frame_burst: int = 10_000
    idle_frame_rate: float = 1_000.0
    idle_frames_per_stream: int = 4
    #: WINDOW frames received: at most ``window_frames_base`` plus ``window_frames_per_frame``
    #: per frame this side sent and per stream the peer opened. A receiver credits a stream
    #: back once per ``FlowControl.window_update_ratio`` of its window, far under one WINDOW per
    #: DATA frame; Envoy allows 10 per DATA frame sent (window-update flood).
    window_frames_base: int = 1000
    window_frames_per_frame: int = 10
    #: Bytes of replies (PONG, OPEN_FAIL, RST) the peer may provoke while this side's write
    #: buffer is above FlowControl.tunnel_write_high; beyond them this side stops reading the
    #: tunnel until the buffer drains below tunnel_write_low, so a peer that sends and never
    #: reads is held by TCP backpressure instead of growing our buffer (nghttp2 allows 1000
    #: queued PONGs, about 20 KiB). Only replies count, never DATA or WINDOW: those are bounded
    #: by the windows, and counting them could make two ends doing bulk DATA both ways stop
    #: reading each other at once.
    reply_bytes_while_blocked: int = 64 * 1024

    def __post_init__(self) -> None:
        _require_positive(self, "flood limit")


@dataclasses.dataclass(frozen=True)
class Keepalive:
    """Dead-peer detection on a tunnel."""

    #: A PING is sent after this many seconds without receiving anything.
    interval: float = 10.0
    #: The tunnel is dead when nothing at all arrives for this long after a PING.
    timeout: float = 20.0


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Reconnect schedule of a connector: exponential with full jitter, forever."""

    initial: float = 0.2
    maximum: float = 30.0
    factor: float = 2.0


@dataclasses.dataclass(frozen=True)
class ListenLimits:
    """Limits of the relay's listen port (tunnels + control API) and the descriptor reserve
    every listener of a worker shares (``service run --listen-limit NAME=VALUE``).

    Counts are per relay worker: each worker accepts on its own SO_REUSEPORT socket.
    """

    #: Seconds from accept to the end of the TLS handshake. A connector's handshake is one
    #: round trip plus a signature; 10 s covers a slow link and bounds a silent client.
    handshake_timeout: float = 10.0
    #: TLS handshakes in progress at once (on the listen port; the HTTPS edge counts its own
    #: under the same cap); beyond, new connections are closed at accept.
    #: The handshake is the CPU cost of a connection (~1 ms of signing each): 1024 queued is
    #: about a second of one core, a bound on what a flood adds to the handshakes let in,
    #: and above a relay restart's reconnect wave of several hundred connectors.
    max_handshakes: int = 1024
    #: Connections from one client address (handshakes, tunnels and control calls alike);
    #: beyond, new ones are closed at accept. A connector holds about (tunnels x its
    #: workers) / relay workers tunnels on a worker (16 with 4 tunnels and 4 workers each
    #: side) plus a few control calls, and whole sites of connectors sit behind one NAT
    #: address: 512 leaves room for 30 such connectors while one address alone cannot
    #: take more than a small part of a worker's descriptors.
    max_per_address: int = 512
    #: And at most this share of the worker's connection budget (below): where the open-file
    #: limit is low, one address must still not take every descriptor there is.
    address_share: float = 0.25
    #: Seconds a control API connection may stay silent before its first request; between
    #: requests, aiohttp's keep-alive timeout (this + 1 s) closes it. Connectors call
    #: every 30 s (heartbeat) and aiohttp clients drop pooled connections after 15 s.
    idle_timeout: float = 60.0
    #: Seconds from the first byte of a control request's head to its end (slowloris): a
    #: head is a few hundred bytes sent at once; then 408 (first request) and closed.
    header_timeout: float = 10.0
    #: Seconds from the end of a request's head to the end of its body: control bodies
    #: are CSRs and app definitions, a few KiB (aiohttp refuses more than 1 MiB).
    body_timeout: float = 30.0
    #: Descriptors of a worker outside its connection budget: at (open-file limit -
    #: this - listeners and files open) connections, new ones on every listener are closed
    #: at accept, so the store, log files, the metrics snapshot and outbound calls (OIDC
    #: issuer) still get a descriptor and established connections keep working.
    fd_reserve: int = 64
    #: Seconds between two log lines about refused connections of one kind (each line
    #: says how many): a flood costs a few lines, not one per connection.
    refusal_log_interval: float = 10.0

    def __post_init__(self) -> None:
        _require_positive(self, "listen limit")
        if self.address_share > 1:
            raise ValueError("listen limit address_share must be at most 1 (a share of the budget)")

    def replace_from(self, assignments: list[str]) -> "ListenLimits":
        """A copy with ``NAME=VALUE`` assignments (``--listen-limit``) applied; ValueError says what is wrong."""
        return _replace_from(self, assignments, "--listen-limit")


@dataclasses.dataclass(frozen=True)
class UdpLimits:
    """Flow tables and queues of UDP apps, on the relay (per app and worker) and the connector (per worker).

    A flow is one user address talking to one app; it lives on one tunnel stream and
    ends after ``idle_timeout`` seconds without a datagram either way. The connector
    waits ``connector_idle_timeout`` (longer), so the relay, which sees the user,
    normally ends a flow first and the connector's timer only cleans up after a relay
    that went away.
    """

    max_flows: int = 4096
    idle_timeout: float = 60.0
    connector_idle_timeout: float = 90.0
    #: Bytes of datagrams held for one flow while its tunnel stream or target socket opens.
    pending_bytes: int = 128 * 1024
    #: A UDP socket whose write buffer is above this drops datagrams instead of queueing them.
    socket_write_high: int = 256 * 1024

    def __post_init__(self) -> None:
        if self.max_flows < 1 or self.pending_bytes < 1 or self.socket_write_high < 1:
            raise ValueError("max_flows, pending_bytes and socket_write_high must be at least 1")
        if self.idle_timeout <= 0 or self.connector_idle_timeout <= 0:
            raise ValueError("idle_timeout and connector_idle_timeout must be above 0 seconds")


@dataclasses.dataclass(frozen=True)
class LogFiles:
    """The connector's log files (admin log, session log): where, and how big they may grow.

    Each log is at most ``backups + 1`` files of about ``max_bytes``.
    """

    #: None: no files, JSON lines on stderr only.
    directory: Path | None = None
    max_bytes: int = 10 * 1024 * 1024
    backups: int = 5

    def __post_init__(self) -> None:
        if self.max_bytes < 1024 or self.backups < 1:
            raise ValueError("log files need max_bytes >= 1024 and backups >= 1")


def default_workers() -> int:
    """One worker process per core."""
    return max(1, len(os.sched_getaffinity(0)))


@dataclasses.dataclass(frozen=True)
class HealthChecks:
    """How a connector checks that it can reach each app's origin (connector/health.py)."""

    #: Seconds between two rounds of checks, each wait jittered by +-``jitter`` of it.
    interval: float = 10.0
    jitter: float = 0.1
    #: Seconds one check may take: connect, TLS and the HTTP answer's head.
    timeout: float = 5.0
    #: Checks running at once.
    concurrency: int = 32
    #: Consecutive failed checks before an app counts as unreachable, and successful
    #: ones before it counts as reachable again.
    fall: int = 2
    rise: int = 1
    #: A stream whose target did not connect asks for a check of its app at once,
    #: at most once per this many seconds.
    recheck_gap: float = 1.0

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.timeout <= 0 or not 0 <= self.jitter < 1:
            raise ValueError("interval and timeout must be positive and jitter in [0, 1)")
        if self.concurrency < 1 or self.fall < 1 or self.rise < 1 or self.recheck_gap < 0:
            raise ValueError("concurrency, fall and rise must be at least 1, recheck_gap not negative")


@dataclasses.dataclass(frozen=True)
class OidcSettings:
    """Pre-authentication of ``--preauth oidc`` apps against one OpenID Connect issuer (docs/preauth.md)."""

    issuer: str
    client_id: str
    #: None for a public client (PKCE only).
    client_secret: str | None = dataclasses.field(default=None, repr=False)
    #: CA bundle (PEM) that the issuer's HTTPS certificate must chain to; None: the system's.
    ca_file: str | None = None
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    #: Signature algorithms accepted on the issuer's tokens; HMAC and "none" are never accepted.
    algorithms: tuple[str, ...] = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
    #: Clock skew tolerated on exp / nbf / iat, seconds.
    leeway: float = 30.0
    #: How long a browser session cookie stays valid, seconds.
    session_lifetime: float = 8 * 3600.0
    #: How long a started login may take before its callback is refused, seconds.
    login_lifetime: float = 600.0
    #: Lifetime of the x-backhaul-identity token the backend gets, seconds.
    identity_lifetime: float = 120.0
    #: Discovery document and JWKS are refetched after this long, seconds.
    metadata_ttl: float = 3600.0
    #: A token signed by an unknown key refetches the JWKS at most this often, seconds.
    jwks_refetch_interval: float = 30.0
    #: Timeout of one call to the issuer, seconds.
    http_timeout: float = 10.0
    #: Largest discovery document, JWKS or token response read from the issuer, bytes.
    max_document: int = 512 * 1024
    #: Keys kept from one JWKS; the rest are ignored.
    max_keys: int = 32
    #: Longest token accepted in an Authorization header or a cookie, bytes.
    max_token: int = 8 * 1024
    #: Signed identity tokens kept for reuse (one per user and app host).
    identity_cache: int = 4096
    #: Bearer tokens kept as verified (until they expire, or their key leaves the JWKS).
    verified_cache: int = 4096

    def __post_init__(self) -> None:
        if not self.issuer.startswith("https://"):
            raise ValueError("the OpenID Connect issuer must be an https:// URL")
        if not self.client_id:
            raise ValueError("the OpenID Connect client id must not be empty")
        if "openid" not in self.scopes:
            raise ValueError("the scopes must include openid")
        if not self.algorithms or any(a == "none" or a.startswith("HS") for a in self.algorithms):
            raise ValueError("algorithms must be asymmetric signature algorithms (never none or HS*)")


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    """Every limit of the relay's HTTP edge (``service run --http-limit NAME=VALUE``).

    Bodies are streamed and never limited in size; what a client or a backend can make
    the edge hold is: one request head, one response head, and one socket read of
    pipelined requests waiting for the response before them.
    """

    #: Longest request-target (the URL in the request line); beyond it: 414.
    max_request_line: int = 8 * 1024
    #: Bytes of all header lines of a request (trailers included); beyond it: 431.
    max_header_bytes: int = 32 * 1024
    #: Header lines of a request (trailers included); beyond it: 431.
    max_headers: int = 100
    #: Same two limits for a backend's response head; beyond them the user gets 502.
    max_response_header_bytes: int = 64 * 1024
    max_response_headers: int = 200
    #: Seconds a client has to send a whole request head once it started one (slowloris); then 408.
    header_timeout: float = 15.0
    #: Seconds an idle keep-alive connection waits for the next request.
    keepalive_timeout: float = 60.0
    #: Seconds the backend has to start its response once the request is sent (or to answer
    #: an ``Expect: 100-continue`` with its 100); then 504.
    response_timeout: float = 60.0
    #: Seconds a request body may go without a byte while the edge is reading it; then 408
    #: (or, once a response has started, the connection is aborted). Half nginx's 60 s
    #: client_body_timeout: that clock also runs while nginx's own upstream holds it back,
    #: this one stops whenever the edge itself stopped reading (the tunnel pushes back), so
    #: it needs no margin for a slow backend, and a client silent for 30 s mid-upload is
    #: gone or hostile. A stalled body holds a tunnel stream and a backend connection.
    body_timeout: float = 30.0
    #: Once ``body_rate_grace`` seconds of reading have passed, a body must average at least
    #: this many bytes a second (Apache mod_reqtimeout's ``body=20,MinRate=500``); then 408.
    #: Trickling a byte now and then under ``body_timeout`` would hold a stream for hours;
    #: 500 B/s is far below any real link (2G EDGE does 20 KB/s). Time the edge was not
    #: reading (backpressure) does not count.
    body_min_rate: int = 500
    body_rate_grace: float = 20.0
    #: Concurrent connections from one client address; more are refused with 429.
    max_connections_per_client: int = 256
    #: Concurrent user connections of one relay worker; more are refused with 503.
    max_connections: int = 20_000
    #: Whether request headers with "_" in their name reach backends (1) or are dropped (0,
    #: nginx's ``underscores_in_headers off``). CGI and WSGI servers fold "_" and "-" alike,
    #: so ``X_Backhaul_User`` would reach them as the identity header. Even when kept, a
    #: name that reads as one the edge sets (``x-backhaul-*``, ``X-Forwarded-*``,
    #: ``X-Request-Id``, framing and hop-by-hop headers) with "_" as "-" is dropped.
    underscore_headers: int = 0

    #: Fields that are switches (0 off, 1 on) rather than positive limits.
    _SWITCHES = ("underscore_headers",)

    def __post_init__(self) -> None:
        _require_positive(self, "http limit", switches=self._SWITCHES)

    def replace_from(self, assignments: list[str]) -> "HttpLimits":
        """A copy with ``NAME=VALUE`` assignments (``--http-limit``) applied; ValueError says what is wrong."""
        return _replace_from(self, assignments, "--http-limit")


@dataclasses.dataclass(frozen=True)
class EnrollLimits:
    """Refused enrollments per client address, on each relay worker's control API.

    A token bucket per address: every refused enrollment token costs one, a successful
    enrollment nothing, so a fleet enrolling from behind one NAT address is never slowed.
    Enrollment tokens are 256-bit random, so guessing one is hopeless anyway; the bucket
    bounds the store lookups and log lines one address can cause. Beyond it: 429 with
    Retry-After. Each relay worker is a process with its own table (the kernel spreads
    connections over workers), so one address gets at most ``workers`` times the budget.
    """

    #: Refusals an address may collect at once: a few typos, a script retrying a stale token.
    burst: int = 20
    #: Refusals refilled per second after that: one every 6 s, a person retrying by hand.
    refill_per_second: float = 1 / 6
    #: Addresses tracked at once, least recently seen dropped first (about 280 bytes each
    #: with the address string: 1.1 MiB per worker when full). A dropped address starts
    #: again with a full bucket, so many addresses buy an attacker burst-sized batches,
    #: never an unbounded table.
    max_addresses: int = 4096
    #: Seconds between two log lines about one address being refused with 429, so a flood
    #: is logged once per address and period, not once per request.
    log_interval: float = 60.0

    def __post_init__(self) -> None:
        if self.burst < 1 or self.refill_per_second <= 0 or self.max_addresses < 1 or self.log_interval <= 0:
            raise ValueError("enroll limits must be positive (burst and max_addresses at least 1)")


@dataclasses.dataclass(frozen=True)
class ReleaseLimits:
    """Bounds on the signed releases the relay stores and serves (``admin release publish``).

    A release is the backhaul wheel and the wheels it depends on, about 15 files and 30 MB.
    Only an admin can upload, but a mistaken or stolen admin token must not fill the relay's
    disk, and the relay reads nothing from an upload beyond what the signed manifest says.
    """

    #: Bytes of a signed manifest: ~150 bytes per file, so 64 files fit in 12 KiB; 32 KiB
    #: keeps the whole upload request (base64 manifest, signature, public key) inside
    #: ControlSettings.max_body.
    max_manifest: int = 32 * 1024
    #: Files of one release: a backhaul wheelhouse has about 15 (backhaul and its dependencies).
    max_files: int = 64
    #: Bytes of one file: the largest wheel of the wheelhouse (cryptography, uvloop) is 4-5 MB.
    max_file_size: int = 64 * 1024 * 1024
    #: Bytes of one release, all files together: twice a wheelhouse with room for growth.
    max_release_size: int = 128 * 1024 * 1024
    #: Releases holding files at once (uploading or published): the current one, the next,
    #: and a few to go back to. Revoking one frees its files. At most
    #: max_stored x max_release_size (1 GiB) of the store is release files.
    max_stored: int = 8
    #: Release records, revoked ones included (a revoked record holds no files, ~1 KiB, and
    #: is what stops the same version being uploaded again).
    max_records: int = 1000
    #: Bytes per stored chunk of a file (one SQLite BLOB row): an upload or a download holds
    #: at most one chunk in memory, and one write transaction stays short.
    chunk_size: int = 1024 * 1024

    def __post_init__(self) -> None:
        _require_positive(self, "release limit")


@dataclasses.dataclass(frozen=True)
class UpdaterLimits:
    """How the updater (backhaul.updater) checks, installs and judges a new connector release.

    The relay is not trusted to choose code (a pinned key signs it), nor to size what the
    updater downloads and keeps: every count and size here bounds what a hostile or broken
    relay, or a release that misbehaves, can make the connector host do.
    """

    #: Seconds between two checks for a release (the contract's default: hourly).
    check_interval: float = 3600.0
    #: Each wait is check_interval x (1 +- jitter), uniformly: a fleet started at the same
    #: minute spreads its checks instead of asking (and restarting) at once (cloudflared #1645).
    jitter: float = 0.2
    #: Files one release may list: a wheelhouse of backhaul's dependencies is about 15.
    max_files: int = 200
    #: Bytes one release may total: the wheelhouse is about 30 MB; a manifest (or a relay
    #: serving more bytes than it lists) cannot make the updater fill the disk beyond this.
    max_release_bytes: int = 512 * 1024 * 1024
    #: Free space needed before installing: the release's size times this (the wheels, the
    #: unpacked venv, which is two to three times the wheels, and room to spare). A full disk
    #: is refused before anything is touched, not discovered half-way through pip.
    disk_factor: float = 4.0
    #: Seconds one file's download may take in all, and may stall without a byte: a slow
    #: link gets long enough (cloudflared #249), a stalled one does not hold the lease for ever.
    download_timeout: float = 1800.0
    download_stall: float = 60.0
    #: Seconds the venv creation, the pip install and each self-test command may take.
    install_timeout: float = 600.0
    selftest_timeout: float = 60.0
    #: Versions kept installed: the current one and the previous (for a rollback); older
    #: ones are pruned, so the install root does not grow with every release.
    keep_versions: int = 2
    #: Entries kept in the state file's history (oldest dropped first).
    max_history: int = 100
    #: After the switch, seconds the new connector has to be ready (tunnels up, config applied).
    ready_deadline: float = 60.0
    #: Then seconds it must stay ready, read every status_interval (Teleport: 6 readings 2 s apart).
    stable_period: float = 12.0
    status_interval: float = 2.0
    #: Exits of the new connector tolerated during the gate: more is a crash loop.
    max_crashes: int = 2
    #: While the relay cannot be reached by the old code either (the updater's own /v1/health
    #: call), the gate's deadline is paused, not spent: the relay's outage is not the new
    #: version's fault (Teleport PR #49175). At most this long; then the new version is kept
    #: unjudged (neither healthy nor failed), and said so.
    relay_outage_wait: float = 600.0
    #: Seconds an old connector may take to exit after SIGTERM (its drain deadline, default
    #: 30 s, plus the supervisor's 10 s margin and some); then it is killed.
    stop_timeout: float = 50.0

    def __post_init__(self) -> None:
        if self.check_interval <= 0 or not 0 <= self.jitter < 1:
            raise ValueError("check_interval must be above 0 and jitter in [0, 1)")
        if self.max_files < 1 or self.max_release_bytes < 1 or self.disk_factor < 1 or self.keep_versions < 2:
            raise ValueError("max_files and max_release_bytes must be positive, disk_factor >= 1, keep_versions >= 2")
        if min(self.ready_deadline, self.stable_period, self.status_interval, self.stop_timeout) <= 0 or self.max_crashes < 0:
            raise ValueError("the health gate's times must be above 0 and max_crashes not negative")


# -- rollout


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """The relay's side of automatic updates: one update lease per connector group, and the
    reports connectors send about each update step (docs/architecture.md, "Rollout").

    A lease lets one connector of a group update; the updater renews it while it works and
    gives it back with its last report. The store keeps leases, so they survive a relay
    restart; a holder that dies frees its group when its lease expires.
    """

    #: Seconds a lease lasts unless renewed. The updater renews every ``renew_every``, so a
    #: live holder keeps it through a slow download, pip install and health gate; a holder
    #: that died (host lost, updater killed) blocks its group's rollout for at most this long.
    #: Ten minutes: two missed renewals are survivable, and an admin waiting on a stuck
    #: group waits minutes, not an hour.
    lease_seconds: float = 600.0
    #: The newest reports kept per connector, shown by `rollout status`: two or three whole
    #: update attempts (downloaded, installed, switched, healthy or rolled_back). Older ones
    #: are dropped, so a connector that reports in a loop cannot grow the store (at most
    #: max_connectors x this rows; every step is also in the relay's log).
    reports_per_connector: int = 20
    #: Versions remembered per connector as failed or rolled back (the newest). The rollout of
    #: a failed version halts; this is what `rollout status` says failed where. Bounded for
    #: the same reason as the reports: a connector failing every release adds no more rows.
    failures_per_connector: int = 20
    #: Failures listed per group by `rollout status` (the newest; the count covers them all),
    #: so the answer stays small for a group of thousands of connectors.
    listed_failures: int = 100

    @property
    def renew_every(self) -> float:
        """How often a holder renews: a third of the lease, so two renewals may fail in a row."""
        return self.lease_seconds / 3

    def __post_init__(self) -> None:
        if self.lease_seconds <= 0:
            raise ValueError("rollout lease_seconds must be positive")
        if min(self.reports_per_connector, self.failures_per_connector, self.listed_failures) < 1:
            raise ValueError("rollout reports_per_connector, failures_per_connector and listed_failures must be at least 1")


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
    """Several relay nodes on one PostgreSQL store (docs/architecture.md, "Several nodes").

    Every node registers itself and heartbeats; what it holds (tunnels, the nodes list
    connectors get) counts only while its heartbeat is fresh, so a node that dies leaves no
    stale "active" state behind: freshness, not a flag somebody must clear.
    """

    #: Seconds between two heartbeats of a node (its row's last_seen).
    heartbeat_interval: float = 2.0
    #: A node whose last heartbeat is older than this is ``down``: its tunnels stop counting,
    #: peers stop forwarding to it, connectors are no longer told about it. Five heartbeats:
    #: a node busy for a few seconds is not flapped, and a dead one is ``down`` well within
    #: the 15 s the issue allows.
    node_fresh: float = 10.0
    #: Distinct nodes a connector holds tunnels to when the service has several (a node lost
    #: leaves the connector reachable through the others while it re-homes).
    connector_nodes: int = 2
    #: Nodes listed at most (the nodes table, the list connectors are sent): a bound on a
    #: table every node reads each second.
    max_nodes: int = 64
    #: Rows of the change log kept (the newest); a node that missed more catches up from the
    #: store's version, which is the truth, not from the log.
    change_log_rows: int = 1000
    #: Seconds a node on SIGTERM keeps its user ports (TCP/UDP apps, HTTP edge) open after it
    #: closed its listen port, when the service has other nodes. A load balancer that checks
    #: the listen port takes the node out meanwhile; only then do the user ports close, so no
    #: connection is reset in a closing port's accept queue after the balancer sent it there.
    #: Two seconds covers checks a few hundred milliseconds apart (`service run
    #: --drain-grace`: set it above your balancer's interval x fall count).
    drain_grace: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval < self.node_fresh:
            raise ValueError("cluster heartbeat_interval must be above 0 and below node_fresh")
        if min(self.connector_nodes, self.max_nodes, self.change_log_rows) < 1:
            raise ValueError("cluster connector_nodes, max_nodes and change_log_rows must be at least 1")
        if self.drain_grace < 0:
            raise ValueError("cluster drain_grace must not be negative")


@dataclasses.dataclass(frozen=True)
class Rehoming:
    """How a connector with tunnels to several relay nodes tells a node is gone and
    replaces it (connector/nodes.py, docs/architecture.md "Tunnels to several nodes")."""

    #: Failed dials in a row to a node holding no serving tunnel of the worker (since its
    #: last hello) after which it is replaced. Two: one refused dial right after a tunnel
    #: dropped may be a restart's blink; two (a fraction of a second apart, with the slots'
    #: backoff) means the node is not there, and a wrongly moved connector costs little.
    failed_dials: int = 2
    #: How long a node that was replaced is chosen only when no other will do, growing per
    #: loss in a row: it keeps a dead or draining node from being picked again at once,
    #: and lets a restarted one back in within minutes.
    avoid: Backoff = Backoff(initial=5.0, maximum=300.0, factor=2.0)
    #: Node addresses from the last list a control call (config, heartbeat, renewal) tries
    #: after the enrolled address fails; bounded because each may take a whole timeout.
    fallback_nodes: int = 3

    def __post_init__(self) -> None:
        if self.failed_dials < 1 or self.fallback_nodes < 0:
            raise ValueError("rehoming failed_dials must be at least 1 and fallback_nodes not negative")


@dataclasses.dataclass(frozen=True)
class PeeringLimits:
    """Relay-to-relay links of one relay worker (relay/peering.py, docs/architecture.md "Peer links").

    A worker dials at most one link per peer node (so at most ClusterSettings.max_nodes), on
    the first user stream that needs it; what it accepts is bounded here.
    """

    #: Seconds the TCP connect and TLS handshake of a link may take. Opens wait in the link
    #: meanwhile, so this is also the longest a user's first forwarded stream waits for it.
    dial_timeout: float = 5.0
    #: After a failed dial or a lost link, the node is not dialed again for this long, doubled
    #: at each failure in a row up to ``redial_maximum``: a dead node costs one failed dial per
    #: period, not one per user stream, and one back from a restart is found within seconds.
    redial_initial: float = 0.25
    redial_maximum: float = 10.0
    #: Links this worker accepts from other nodes at once. Every worker of every other node
    #: may dial one link to this node and the listen port spreads them over its workers, so
    #: 16 workers for each of ClusterSettings.max_nodes (64) nodes; beyond it a link is refused
    #: (and logged), as a misbehaving node dialing without end would be.
    max_accepted: int = 1024
    #: Seconds a user stream that finds no route at all (no local tunnel of its group, no
    #: node listed as holding one) waits for one before it is refused. When the node holding
    #: a group's tunnels dies, its connectors need two failed dials (Rehoming.failed_dials)
    #: and a new tunnel, and this node its next poll (once a second), to route again: about
    #: two seconds. The user's bytes wait unsent meanwhile, and each waiting stream is a
    #: connection the worker's admission budget already counts, so the wait adds no table.
    route_wait: float = 3.0
    #: Seconds between two looks for a route while a stream waits: one table lookup each.
    route_retry: float = 0.1

    def __post_init__(self) -> None:
        if self.dial_timeout <= 0 or not 0 < self.redial_initial <= self.redial_maximum:
            raise ValueError("peering dial_timeout must be positive and 0 < redial_initial <= redial_maximum")
        if self.max_accepted < 1:
            raise ValueError("peering max_accepted must be at least 1")
        if self.route_wait < 0 or self.route_retry <= 0:
            raise ValueError("peering route_wait must not be negative and route_retry must be positive")


@dataclasses.dataclass(frozen=True)
class MemoryTrim:
    """When a relay or connector worker gives memory back to the system (backhaul/memory.py).

    After a bulk run glibc keeps the freed heap: large buffers freed during the run raise
    its mmap threshold, so later ones come from the heap, and free() returns only a free
    top of the heap larger than the trim threshold. ``malloc_trim(0)`` hands every free
    page back; it is called once the process has gone quiet after a burst, never per frame.
    """

    #: Seconds between two looks at the process's CPU time (one getrusage() each): often
    #: enough to trim within a few seconds of a burst's end, rare enough to cost nothing.
    check_interval: float = 1.0
    #: A look that finds at least this share of one core used since the last marks a burst:
    #: a bulk stream keeps a core busy, while keepalives, heartbeats and config polls of an
    #: idle worker use well under 1%.
    busy_cpu: float = 0.2
    #: Below this share of a core the process counts as quiet (an idle worker's timers stay under it).
    quiet_cpu: float = 0.05
    #: Seconds of quiet after a burst before trimming: a pause between two requests of a
    #: busy app does not trim (the pages would be faulted back in at once), while the
    #: memory of a finished bulk run is back within a few seconds (tests/e2e/test_memory.py
    #: asks for 10 s).
    quiet_seconds: float = 2.0
    #: 0 turns trimming off (1: on).
    enabled: int = 1

    def __post_init__(self) -> None:
        _require_positive(self, "memory trim", switches=("enabled",))
        if self.quiet_cpu > self.busy_cpu:
            raise ValueError("memory trim quiet_cpu must not be above busy_cpu")


# -- TLS of the tunnels


#: TLS 1.3 suites OpenSSL knows (RFC 8446 appendix B.4); anything else in a setting is a typo.
TLS13_SUITES = frozenset(
    {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
     "TLS_AES_128_CCM_SHA256", "TLS_AES_128_CCM_8_SHA256"}
)
#: AES-GCM's full-size records per key (RFC 8446 section 5.5: 2^24.5) beyond which the
#: confidentiality margin of the AEAD limits paper is spent.
AES_GCM_RECORD_LIMIT = int(2**24.5)


@dataclasses.dataclass(frozen=True)
class TlsSettings:
    """TLS of the tunnels: suites, kernel TLS, key rotation (``service run --tls NAME=VALUE``,
    ``[tls]`` in a connector's settings file; docs/security.md "Tunnel TLS").
    """

    #: TLS 1.3 suites in the relay's order of preference, applied with server preference, so
    #: every tunnel uses AES-128-GCM whatever the client prefers (Python's clients put
    #: AES-256 first). Measured on a project machine (/work/shared/notes/tls-measurements.md):
    #: AES-128-GCM is 3-9% cheaper per byte than AES-256-GCM, ChaCha20 slower than both on
    #: CPUs with AES-NI; 128-bit keys are the security level of everything else here (P-256,
    #: the CA's ECDSA keys). ChaCha20 stays last for peers without AES instructions.
    ciphersuites: str = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
    #: Kernel TLS (0/1, off by default): ask OpenSSL to hand the record layer to the kernel.
    #: It can work only where the kernel lists the ``tls`` ULP and OpenSSL owns the socket;
    #: uvloop's TLS (a memory BIO, the default transport) never gives it the socket, so today
    #: this only makes each tunnel's "tunnel up" line say why kTLS is not in use
    #: (backhaul.tls_kernel).
    ktls: int = 0
    #: Records a tunnel may send (or receive) under one key before it is rotated: GOAWAY
    #: "key rotation", drained, and dialed again by the connector (transport/rotation.py).
    #: 2^23 is 2.8 times under AES-GCM's 2^24.5 (RFC 8446 section 5.5), where a rotated tunnel
    #: still draining is closed whatever it carries: the streams on it get the 15 million
    #: records between the two (7 minutes at 7 Gbit/s) to finish. The count is an upper bound
    #: (bytes / 16 KiB + frames) and the checks seconds apart add a few hundred thousand
    #: records at most (at 7 Gbit/s of full records, 2^23 take about 160 s).
    rotate_records: int = 2**23
    #: Seconds between two rotation checks on the connector (the relay checks at its store
    #: poll, once a second): a few seconds of records at line rate are a few hundred
    #: thousand, far under the margin above.
    rotate_check_interval: float = 5.0
    #: Seconds a rotated tunnel may take to finish its streams before it is closed (they are
    #: reset then), unless AES-GCM's limit closes it first. An hour lets long transfers
    #: finish on the old keys and still bounds how long a tunnel lingers.
    rotate_drain_timeout: float = 3600.0
    #: The connector's TLS transport for its direct dials: "uvloop" (its memory-BIO TLS, the
    #: default) or "aiofastnet" (optional package; transport/fasttls.py). uvloop stays the
    #: default until the other has run everything the project runs for long enough.
    transport: str = "uvloop"

    def __post_init__(self) -> None:
        suites = [s for s in self.ciphersuites.split(":") if s]
        unknown = [s for s in suites if s not in TLS13_SUITES]
        if not suites or unknown:
            raise ValueError(
                f"tls ciphersuites {self.ciphersuites!r}: expected TLS 1.3 suite names separated by ':' "
                f"from {', '.join(sorted(TLS13_SUITES))}" + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            )
        if self.ktls not in (0, 1):
            raise ValueError("tls ktls is a switch: 0 (off) or 1 (on)")
        if not 1 <= self.rotate_records <= AES_GCM_RECORD_LIMIT:
            raise ValueError(f"tls rotate_records must be from 1 to {AES_GCM_RECORD_LIMIT} (AES-GCM's limit per key)")
        if self.rotate_check_interval <= 0 or self.rotate_drain_timeout <= 0:
            raise ValueError("tls rotate_check_interval and rotate_drain_timeout must be above 0 seconds")
        if self.transport not in ("uvloop", "aiofastnet"):
            raise ValueError(f'tls transport {self.transport!r}: expected "uvloop" or "aiofastnet"')

    def replace_from(self, assignments: list[str]) -> "TlsSettings":
        """A copy with ``NAME=VALUE`` assignments (``--tls``) applied; ValueError says what is wrong."""
        text = {f.name for f in dataclasses.fields(self) if f.type in (str, "str")}
        strings = [a for a in assignments if a.partition("=")[0].strip().replace("-", "_") in text]
        numbers = [a for a in assignments if a not in strings]
        changed = _replace_from(self, numbers, "--tls")
        for item in strings:
            name, _, raw = item.partition("=")
            changed = dataclasses.replace(changed, **{name.strip().replace("-", "_"): raw.strip()})
        return changed


# -- the admin center


@dataclasses.dataclass(frozen=True)
class AdminCenterSettings:
    """The admin center's web page at /admin/ (backhaul.center; docs/operations.md "The admin center").

    Sessions are signed cookies whose key is kept in the store, so every worker and every
    relay node accepts them; signing out records the session id until it would have
    expired anyway (a bounded list, see ``max_signed_out``).
    """

    #: Seconds a session lasts after sign-in. A working day: an operator signs in once in
    #: the morning; a stolen cookie is good for hours, not weeks (OIDC apps use the same).
    session_lifetime: float = 8 * 3600.0
    #: Sessions signed out before their expiry that the store remembers (about 40 bytes
    #: each in one row of the meta table, read on every admin-center request). When the
    #: list is full the session key is replaced, which ends every session: a flood of
    #: sign-outs costs re-signing in, never an unbounded row.
    max_signed_out: int = 1000
    #: Refused sign-ins per client address (an AddressLimiter, per worker): the admin token
    #: is 256-bit random so guessing is hopeless; the bucket bounds log lines and work.
    #: Five at once, then one a minute: a person mistyping, not a script.
    sign_in: EnrollLimits = EnrollLimits(burst=5, refill_per_second=1 / 60, max_addresses=4096, log_interval=60.0)
    #: Rows per page of a list (connectors, apps, tokens, log); a page asks for at most
    #: ``max_page_size`` with ?size=. 50 rows render in a few milliseconds; 200 is a screenful.
    page_size: int = 50
    max_page_size: int = 200
    #: Seconds between two re-fetches of a page's live part by its script.
    refresh_seconds: float = 5.0
    #: Byte-counter samples kept per worker for the charts: one per ``sample_interval``
    #: taken when a page is rendered (nothing is sampled while nobody looks), 60 of them
    #: (five minutes at 5 s). Per connector at most ``max_sampled_connectors`` series.
    samples: int = 60
    sample_interval: float = 5.0
    max_sampled_connectors: int = 2000
    #: The relay's own log records kept per worker for the admin log view (when there is
    #: no admin log file to read): the newest, ~1 KiB each, so about 2 MiB per worker.
    log_records: int = 2000
    #: Bytes read from the end of each admin log file for the log view (logs.read_admin_log):
    #: the newest few thousand lines, on every refresh of the page, never a whole 10 MiB file.
    log_tail_bytes: int = 1024 * 1024
    #: (claim, value) an OpenID Connect id_token must carry to sign in to the admin center
    #: (``service run --admin-oidc-claim groups=backhaul-admins``); None: admin token only.
    #: Never a default: who is an admin is the operator's decision, not ours.
    oidc_claim: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if min(self.session_lifetime, self.refresh_seconds, self.sample_interval) <= 0:
            raise ValueError("admin center session_lifetime, refresh_seconds and sample_interval must be positive")
        if min(self.max_signed_out, self.page_size, self.max_page_size, self.samples,
               self.max_sampled_connectors, self.log_records, self.log_tail_bytes) < 1:
            raise ValueError("admin center limits must be at least 1")
        if self.page_size > self.max_page_size:
            raise ValueError("admin center page_size must not exceed max_page_size")


@dataclasses.dataclass(frozen=True)
class ProgressLine:
    """The progress line of long operations on a terminal (backhaul.progress)."""

    #: Least seconds between two redraws: ten a second reads as smooth, and the redraw costs
    #: nothing next to the work it follows (an upload's chunk, a benchmark's run).
    redraw_interval: float = 0.1
