"""Who a pre-authenticated user is, and the relay's signed statement of it for the backend.

The relay signs a short-lived JWT (ES256) for every request it lets through to an oidc
app: ``iss`` names the relay, ``aud`` the app's external host. Its public key is served
as a JWKS at ``/.backhaul/jwks.json`` on every oidc app host, so a backend can verify the
``x-backhaul-identity`` header without trusting anything else in the request.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from backhaul import pki
from backhaul.errors import ConfigError, TokenError
from backhaul.relay.preauth.keyfiles import load_or_create

IDENTITY_KEY_FILE = "identity.key"
IDENTITY_ALGORITHM = "ES256"
#: Longest identity claim (sub, email, name, preferred_username) accepted from the issuer.
MAX_CLAIM = 512


@dataclasses.dataclass(frozen=True, slots=True)
class User:
    """A user the issuer vouched for."""

    sub: str
    #: The issuer that vouched for the user.
    idp: str
    email: str | None = None
    name: str | None = None
    username: str | None = None

    @property
    def display(self) -> str:
        """The name to show and log: the user name, else the e-mail address, else the subject."""
        return self.username or self.email or self.sub

    @classmethod
    def from_claims(cls, claims: dict[str, Any]) -> User:
        """The user a verified token names; TokenError if its identity claims are unusable."""
        sub, idp = claims.get("sub"), claims.get("iss")
        if not isinstance(sub, str) or not sub or not isinstance(idp, str):
            raise TokenError("the token names no subject (sub) or issuer (iss)")
        for claim in ("sub", "email", "name", "preferred_username"):
            value = claims.get(claim)
            if isinstance(value, str) and len(value) > MAX_CLAIM:
                raise TokenError(f"the token's {claim} claim is longer than {MAX_CLAIM} characters")
        email = claims.get("email")
        # An address the issuer says it has not verified is not passed on as the user's.
        if claims.get("email_verified") is False:
            email = None
        return cls(
            sub=sub,
            idp=idp,
            email=email if isinstance(email, str) and email else None,
            name=_text(claims.get("name")),
            username=_text(claims.get("preferred_username")),
        )

    def claims(self) -> dict[str, str]:
        """The user as JWT claims (the ones set only)."""
        out = {"sub": self.sub, "idp": self.idp}
        for claim, value in (("email", self.email), ("name", self.name), ("preferred_username", self.username)):
            if value is not None:
                out[claim] = value
        return out

    @classmethod
    def from_session(cls, claims: dict[str, Any]) -> User:
        """The user stored in a session cookie the relay signed itself."""
        return cls(
            sub=claims["sub"],
            idp=claims["idp"],
            email=claims.get("email"),
            name=claims.get("name"),
            username=claims.get("preferred_username"),
        )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 thumbprint of an EC public JWK: the key id the relay publishes it under."""
    members = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    return _b64url(hashlib.sha256(orjson.dumps(members, option=orjson.OPT_SORT_KEYS)).digest())


class RelayIdentity:
    """The relay's identity signing key: signs x-backhaul-identity tokens, publishes its JWKS."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        issuer: str,
        *,
        lifetime: float,
        cache_size: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise ConfigError("the relay's identity key must be an EC P-256 key")
        self.key = key
        self.issuer = issuer
        self.lifetime = lifetime
        self.cache_size = cache_size
        self.clock = clock
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        self.kid = jwk_thumbprint(jwk)
        self.jwks = {"keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": IDENTITY_ALGORITHM}]}
        self.jwks_document = orjson.dumps(self.jwks)
        # (audience, user) -> (token, exp): a user's requests reuse one token for half its lifetime.
        self._signed: collections.OrderedDict[tuple[str, User], tuple[str, float]] = collections.OrderedDict()

    @classmethod
    def load(cls, data_dir: Path, **kwargs: Any) -> RelayIdentity:
        """The identity key of a data dir (created at first use), named after the service CA."""
        try:
            ca_sha256 = orjson.loads((data_dir / "service.json").read_bytes())["ca_sha256"]
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot read the CA fingerprint from {data_dir}/service.json ({exc}); is the data dir initialized?") from exc
        path = data_dir / IDENTITY_KEY_FILE
        pem = load_or_create(path, lambda: pki.key_to_pem(pki.generate_key()))
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path} is not an unencrypted PEM private key; delete it and a new one is made at start") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{path} is not an EC private key; delete it and a new one is made at start")
        return cls(key, f"urn:backhaul:relay:{ca_sha256}", **kwargs)

    def token(self, audience: str, user: User) -> str:
        """A signed statement that ``user`` is making this request to the app at ``audience``."""
        now = self.clock()
        cache_key = (audience, user)
        cached = self._signed.get(cache_key)
        if cached is not None and cached[1] - now > self.lifetime / 2:
            self._signed.move_to_end(cache_key)
            return cached[0]
        issued = int(now)
        exp = issued + int(self.lifetime)
        claims = {**user.claims(), "iss": self.issuer, "aud": audience, "iat": issued, "nbf": issued - 5, "exp": exp}
        token = jwt.encode(claims, self.key, algorithm=IDENTITY_ALGORITHM, headers={"kid": self.kid, "typ": "JWT"})
        self._signed[cache_key] = (token, exp)
        self._signed.move_to_end(cache_key)
        while len(self._signed) > self.cache_size:
            self._signed.popitem(last=False)
        return token

    @property
    def cached(self) -> int:
        """How many signed tokens are kept for reuse."""
        return len(self._signed)
