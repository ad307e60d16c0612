"""`backhaul connector doctor` passes on a healthy connector and names each planted problem."""

from __future__ import annotations

import datetime
import json
import shutil

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from backhaul import pki
from backhaul.connector.doctor import check_clock, check_open_files, check_port_range, Relay

from .harness import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.codec_independent]


def _doctor(system, state, *extra: str) -> tuple[int, dict[str, dict]]:
    result = system.cli("connector", "doctor", "--state-dir", str(state), "--json", *extra, check=False)
    report = json.loads(result.stdout)
    assert report["ok"] == (result.returncode == 0)
    return result.returncode, {c["name"]: c for c in report["checks"]}


def _copy(state, name):
    copy = state.parent / name
    shutil.copytree(state, copy)
    return copy


def _plant_expired_certificate(system, state) -> None:
    """Replace the connector's certificate with one from the same CA and key, expired yesterday."""
    ca = pki.load_ca(system.data_dir)
    current = pki.load_cert_file(state / "cert.pem")
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(current.subject)
        .issuer_name(ca.cert.subject)
        .public_key(current.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=10))
        .not_valid_after(now - datetime.timedelta(days=1))
    )
    for extension in current.extensions:
        if not isinstance(extension.value, (x509.SubjectKeyIdentifier, x509.AuthorityKeyIdentifier)):
            builder = builder.add_extension(extension.value, extension.critical)
    (state / "cert.pem").write_bytes(pki.cert_to_pem(builder.sign(ca.key, hashes.SHA256())))


def test_doctor_passes_a_healthy_connector_and_names_planted_problems(system):
    state = system.register("a")

    code, checks = _doctor(system, state, "--ca-sha256", system.ca_sha256)
    network = ["registration", "certificate", "relay_reachable", "tls", "ca_pin", "authentication", "clock"]
    assert code == 0 and all(checks[name]["status"] == "ok" for name in network), checks
    assert checks["open_files"]["status"] in ("ok", "warn") and checks["ephemeral_ports"]["status"] in ("ok", "warn")
    human = system.cli("connector", "doctor", "--state-dir", str(state))
    assert "all checks passed" in human.stdout and "OK    tls" in human.stdout

    # A pin that is not the relay's CA.
    code, checks = _doctor(system, state, "--ca-sha256", "ab" * 32)
    assert code == 1 and checks["ca_pin"]["status"] == "fail" and "ab" * 32 in checks["ca_pin"]["detail"]
    assert checks["tls"]["status"] == "ok"

    # An expired certificate: said with its date, and the relay refuses it too.
    expired = _copy(state, "expired")
    _plant_expired_certificate(system, expired)
    code, checks = _doctor(system, expired)
    assert code == 1 and checks["certificate"]["status"] == "fail"
    assert "expired on" in checks["certificate"]["detail"] and "register again" in checks["certificate"]["fix"]
    assert checks["tls"]["status"] == "fail" and checks["authentication"]["status"] == "skip"

    # A relay that is not there.
    unreachable = _copy(state, "unreachable")
    info = json.loads((unreachable / "connector.json").read_text())
    info["service"] = f"https://127.0.0.1:{free_port()}"
    (unreachable / "connector.json").write_text(json.dumps(info))
    code, checks = _doctor(system, unreachable)
    assert code == 1 and checks["relay_reachable"]["status"] == "fail"
    assert "Connection refused" in checks["relay_reachable"]["detail"] and checks["relay_reachable"]["fix"]
    assert checks["tls"]["status"] == "skip"

    # No registration at all.
    code, checks = _doctor(system, state.parent / "nothing-here")
    assert code == 1 and checks["registration"]["status"] == "fail" and "connector register" in checks["registration"]["detail"]


def test_doctor_judges_clock_skew_file_limits_and_port_ranges():
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    for skew, status in [(0, "ok"), (-3, "ok"), (30, "warn"), (-400, "fail")]:
        relay = Relay(date=now, seen_at=now + datetime.timedelta(seconds=skew))
        assert check_clock(relay).status == status, skew
    assert check_clock(Relay()).status == "skip"
    assert check_open_files((1024, 1048576)).status == "ok"
    assert check_open_files((1024, 4096)).status == "warn"
    assert check_open_files((256, 512)).status == "fail"
    assert check_port_range("32768\t60999\n").status == "ok"
    narrow = check_port_range("60000 61000")
    assert narrow.status == "warn" and "ip_local_port_range" in narrow.fix
    assert check_port_range("garbage").status == "skip"
