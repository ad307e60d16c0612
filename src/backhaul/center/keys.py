"""What the admin center keeps on the control API's aiohttp app, one key each."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from aiohttp import web

from backhaul.center import adminlog, oidc
from backhaul.center.samples import ByteSamples
from backhaul.config import AdminCenterSettings
from backhaul.control.ratelimit import AddressLimiter

SETTINGS = web.AppKey("backhaul_center_settings", AdminCenterSettings)
SIGN_IN_LIMITER = web.AppKey("backhaul_center_sign_in_limiter", AddressLimiter)
SAMPLES = web.AppKey("backhaul_center_samples", ByteSamples)
RECORDS = web.AppKey("backhaul_center_records", adminlog.RecordRing)
OIDC = web.AppKey("backhaul_center_oidc", oidc.AdminOidc)
#: bytes per connector id from the relay's own counters (blocking; absent: the store's)
TRAFFIC = web.AppKey("backhaul_center_traffic", Callable)
#: the relay's admin log dir (service run --log-dir; absent: this worker's records only)
LOG_DIR = web.AppKey("backhaul_center_log_dir", Path)
