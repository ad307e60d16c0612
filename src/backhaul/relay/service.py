"""`backhaul service run`: the relay's supervisor and its worker processes."""

from __future__ import annotations

import argparse
import dataclasses
import functools
from pathlib import Path

from backhaul.config import default_workers
from backhaul.errors import ConfigError
from backhaul.relay.worker import RelaySettings, run_worker
from backhaul.supervisor import supervise
from backhaul.transport.sockets import parse_hostport


def _run(settings: RelaySettings, index: int) -> None:
    import dataclasses

    run_worker(dataclasses.replace(settings, worker=index))


def service_run(args: argparse.Namespace) -> int:
    """Run the relay until SIGTERM."""
    data_dir = Path(args.data_dir)
    if not (data_dir / "service.json").is_file():
        raise ConfigError(f"{data_dir} is not an initialized data dir; run `backhaul service init --data-dir {data_dir}`")
    parse_hostport(args.listen, "--listen")
    if args.http:
        parse_hostport(args.http, "--http")
    workers = args.workers or default_workers()
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    if args.cert_validity is not None and args.cert_validity < 10:
        raise ConfigError("--cert-validity must be at least 10 seconds")
    settings = RelaySettings(
        data_dir=data_dir, listen=args.listen, http=args.http, workers=workers, cert_validity=args.cert_validity
    )
    if not getattr(args, "metrics", None):
        return supervise(functools.partial(_run, settings), workers, "relay")
    from backhaul import metrics
    from backhaul.relay.metrics import SPECS
    from backhaul.reporter import prepare_run_dir

    with metrics.listen(args.metrics) as sock:
        run_dir = prepare_run_dir(data_dir, SPECS)
        settings = dataclasses.replace(settings, run_dir=run_dir, metrics_fd=sock.fileno())
        return supervise(functools.partial(_run, settings), workers, "relay")
