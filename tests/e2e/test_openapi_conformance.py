"""The control API against its own OpenAPI document, with schemathesis, on a real relay.

The schema is the one the relay serves at /v1/openapi.json. Every operation gets a
bounded number of generated requests, both schema-valid (positive) and schema-violating
(negative); each answer must be a documented status code with a documented content type
and a body matching the documented schema, never a 5xx, and a negative request must be
refused. Separately, a request the document calls valid must not be refused as malformed.
"""

from __future__ import annotations

import copy

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.config import ChecksConfig, SchemathesisConfig
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.formats import unregister_string_format
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from backhaul import pki
from backhaul.control.openapi import CA_BUNDLE_FORMAT, openapi_document

from .harness import running_relay

pytestmark = [pytest.mark.e2e, pytest.mark.codec_independent]

#: Generated requests per operation and mode: enough to reach the validation and
#: not-found branches of every handler, small enough for the whole file to take seconds.
MAX_EXAMPLES = 10

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

#: Operations whose schema-valid requests cannot be made acceptable by any document:
#: a random string is never a valid CSR, so the server must answer 400 and does.
#: The same for a release upload: random text is never a manifest signed by the key sent.
NO_VALID_BODY = {"POST /v1/enroll", "POST /v1/connector/renew", "POST /v1/releases"}

#: Failures schemathesis found in src/backhaul/control that are not fixed yet:
#: (check, label) -> reason. Each is an xfail(strict) so a fix turns it into a failure to remove here.
KNOWN_BUGS: dict[tuple[str, str], str] = {}

#: schemathesis leaves out the operation that serves the schema it loaded; loading it proved it answers.
SCHEMA_OPERATION = "GET /v1/openapi.json"


def _operations() -> list[tuple[str, dict]]:
    doc = openapi_document()
    ops = [(f"{method.upper()} {path}", op) for path, methods in doc["paths"].items() for method, op in methods.items()]
    return [(label, op) for label, op in ops if label != SCHEMA_OPERATION]


def _labels() -> list[str]:
    return [label for label, _ in _operations()]


def _param(check: str, label: str, mode: GenerationMode):
    reason = KNOWN_BUGS.get((check, label))
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(label, mode, marks=marks, id=f"{label}-{mode.value}")


def _conformance_params():
    for label, op in _operations():
        yield _param("conformance", label, GenerationMode.POSITIVE)
        # Only a body or a path parameter can violate the schema; the others have no negative case.
        if "requestBody" in op or "parameters" in op:
            yield _param("conformance", label, GenerationMode.NEGATIVE)


def _acceptance_params():
    for label in _labels():
        if label not in NO_VALID_BODY:
            yield _param("acceptance", label, GenerationMode.POSITIVE)


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    """One relay for every operation: starting one costs seconds."""
    with running_relay(tmp_path_factory.mktemp("openapi")) as system:
        yield system


@pytest.fixture(scope="module")
def ca_bundles():
    """Real CA certificates for an http app's backend_ca: no drawn text is a PEM bundle.

    schemathesis's format registry is global, so the generator is removed after the module.
    """
    bundles = [pki.make_ca(f"backend CA {n}").cert_pem.decode("ascii") for n in range(2)]
    schemathesis.openapi.format(CA_BUNDLE_FORMAT, st.sampled_from([*bundles, "".join(bundles)]))
    yield
    unregister_string_format(CA_BUNDLE_FORMAT)


@pytest.fixture(scope="module")
def api(relay, ca_bundles):
    ca = str(relay.data_dir / "ca.pem")
    # A body over ControlSettings.max_body (a negative case's overlong string, as JSON
    # escapes) is refused with 413 before it is read: a refusal too.
    rejections = ChecksConfig().negative_data_rejection.expected_statuses + ["413"]
    config = SchemathesisConfig.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": rejections}}})
    schema = schemathesis.openapi.from_url(f"{relay.url}/v1/openapi.json", config=config, verify=ca, timeout=10)
    token = (relay.data_dir / "admin.token").read_text().strip()
    # The /v1/connector/* calls authenticate with a client certificate, so they are
    # driven with a real registered connector's certificate rather than excluded.
    # Enrollment is driven too: it needs no credential, and its refusals must conform.
    state = relay.register("probe")
    # One session keeps connections alive: a TLS handshake per request would dominate the run.
    with requests.Session() as session:
        yield {
            "schema": schema,
            "base_url": relay.url,
            "session": session,
            "verify": ca,
            "headers": {"Authorization": f"Bearer {token}"},
            "cert": (str(state / "cert.pem"), str(state / "key.pem")),
        }


def _fuzz(api, label: str, mode: GenerationMode, checks: list) -> list[int]:
    """Send MAX_EXAMPLES generated requests for ``label``; the checks raise on the first failure."""
    operation = api["schema"].find_operation_by_label(label)
    assert operation is not None, f"{label} is missing from the served document"
    # Every operation the document says authenticates with a client certificate gets one.
    mtls = operation.definition.raw.get("security") == [{"connectorCertificate": []}]
    extra = {"cert": api["cert"]} if mtls else {}
    statuses: list[int] = []

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        # No shrinking: a failure is reported as found, which keeps the run bounded.
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        response = case.call_and_validate(
            base_url=api["base_url"], session=api["session"], headers=api["headers"], checks=checks,
            verify=api["verify"], timeout=10, **extra
        )
        statuses.append(response.status_code)

    run()
    assert statuses, f"no request was sent for {label}"
    return statuses


def test_the_served_document_is_the_one_in_the_code(api):
    assert api["schema"].raw_schema == openapi_document()
    served = {op.ok().label for op in api["schema"].get_all_operations()}
    assert served == set(_labels())


@pytest.mark.parametrize("label, mode", list(_conformance_params()))
def test_answers_conform_to_the_document(api, label, mode):
    # A negative case may negate only the Authorization header, which the fixed admin
    # header then replaces, so "was it refused" is left to negative_data_rejection: it
    # knows which part of the request was made invalid.
    _fuzz(api, label, mode, CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else []))


@pytest.mark.parametrize("label, mode", list(_acceptance_params()))
def test_schema_valid_requests_are_accepted(api, label, mode):
    """A request the document calls valid is not refused as malformed (schemathesis ST202)."""
    _fuzz(api, label, mode, [positive_data_acceptance])


def test_the_checks_catch_a_document_that_lies(api):
    """The same checks fail when the document promises a field the server does not send."""
    doc = copy.deepcopy(openapi_document())
    doc["components"]["schemas"]["Health"]["required"].append("uptime")
    lying = schemathesis.openapi.from_dict(doc)
    with pytest.raises(BaseExceptionGroup) as caught:
        _fuzz({**api, "schema": lying}, "GET /v1/health", GenerationMode.POSITIVE, CHECKS)
    assert "uptime" in str(caught.value.exceptions[0])
