"""Pre-authentication of HTTP apps: the Gate contract the edge calls, and its OpenID Connect implementation."""
