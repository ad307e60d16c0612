"""What the control API needs, as frozen values passed in: settings and the context."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable

from backhaul import pki
from backhaul.config import REFRESH_INTERVAL, EnrollLimits, ReleaseLimits
from backhaul.store import Store, open_store

DAY = 86400.0


@dataclasses.dataclass(frozen=True)
class ControlSettings:
    """Control-plane settings; every default lives here."""

    #: Lifetime of a connector certificate; connectors renew at two thirds of it.
    cert_validity: float = 90 * DAY
    #: Seconds between two config pulls of a connector.
    refresh_interval: int = REFRESH_INTERVAL
    #: Longest lifetime and most uses an enrollment token may be created with.
    token_max_ttl: int = 7 * 86400
    token_max_uses: int = 1000
    #: Inactive connectors unseen this long (no heartbeat, no tunnel) are removed at the next
    #: housekeeping run (`service run --remove-inactive-after`): Entra's connectors go after
    #: 10 days, long enough for a machine off over a long weekend and a holiday to come back
    #: as itself, short enough that a decommissioned one does not linger in the list.
    remove_inactive_after: float = 10 * DAY
    #: Seconds a connector stays "active" after its last tunnel went away (`service run
    #: --inactive-grace`). A connector redials at once after a dropped connection, a relay's
    #: GOAWAY (drain, key rotation) or a relay restart, with a backoff from 0.2 s doubling
    #: (config.Backoff): 30 s covers its first seven tries, so a redial is not a status flap,
    #: and is still short next to the keepalive's 20 s to notice a dead tunnel at all.
    inactive_grace: float = 30.0
    #: Seconds between two housekeeping runs (pruning); 0 disables them.
    housekeeping_interval: float = 3600.0
    #: Ports the relay itself listens on: apps may not be published there.
    reserved_ports: frozenset[int] = frozenset()
    #: Largest request body the API reads.
    max_body: int = 64 * 1024
    #: CPU percentage above which `connector list` flags a connector.
    cpu_warning: float = 70.0
    #: Refused enrollments per client address (see config.EnrollLimits).
    enroll: EnrollLimits = EnrollLimits()
    #: Longest time a renewed connector's previous certificate is still accepted once the
    #: connector has used its new one (see ``replaced_cert_grace``). The connector's other
    #: worker processes pick the new certificate up at their next heartbeat (every 30 s by
    #: default) and a tunnel dial or control call under way with the old one takes up to
    #: 30 s more: five minutes covers several such rounds, and is short next to the up
    #: to 90 days the old certificate would otherwise stay good for.
    replaced_cert_grace_max: float = 300.0
    #: Signed releases the relay stores and serves (see config.ReleaseLimits).
    releases: ReleaseLimits = ReleaseLimits()

    @property
    def replaced_cert_grace(self) -> float:
        """Seconds the previous certificate stays good after the first use of the new one:
        ``replaced_cert_grace_max``, or a tenth of the certificate lifetime when that is
        shorter (short-lived certificates, as in tests, renew more often than every 5 min)."""
        return min(self.replaced_cert_grace_max, self.cert_validity / 10)


@dataclasses.dataclass(frozen=True)
class ControlContext:
    """Everything a control API instance uses. ``worker`` is the relay worker index;
    worker 0 also runs housekeeping."""

    data_dir: Path
    store: Store
    ca: pki.CertificateAuthority
    settings: ControlSettings = ControlSettings()
    worker: int = 0
    clock: Callable[[], float] = time.time

    @classmethod
    def load(
        cls,
        data_dir: str | os.PathLike,
        *,
        worker: int = 0,
        settings: ControlSettings | None = None,
        store: Store | None = None,
        clock: Callable[[], float] = time.time,
    ) -> "ControlContext":
        """The context of an initialized data dir; opens its store unless one is given."""
        data_dir = Path(data_dir)
        ca = pki.load_ca(data_dir)
        return cls(
            data_dir=data_dir,
            store=store if store is not None else open_store(data_dir, clock=clock),
            ca=ca,
            settings=settings or ControlSettings(),
            worker=worker,
            clock=clock,
        )
