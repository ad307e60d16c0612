"""Exceptions with a reason a person can act on."""

from __future__ import annotations


class BackhaulError(Exception):
    """Base of every error backhaul reports to a user; the message says what to do."""

    exit_code = 1


class ConfigError(BackhaulError):
    """A setting, file or argument is wrong or missing."""

    exit_code = 2


class EnrollmentError(BackhaulError):
    """Registration of a connector was refused."""


class ServiceError(BackhaulError):
    """The relay service refused or failed a request."""


class CertificateError(BackhaulError):
    """A certificate is missing, expired, revoked or does not match the pinned CA."""


class ProxyError(ServiceError):
    """The HTTP proxy on the way to the relay could not be reached, or refused the connection."""


class IdentityProviderError(BackhaulError):
    """The OpenID Connect issuer cannot be reached or answered something unusable."""


class TokenError(BackhaulError):
    """A token or cookie presented for pre-authentication is not acceptable."""
