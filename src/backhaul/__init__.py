"""backhaul: an outbound-only private network connector and its relay service."""

import importlib.metadata

#: The version of the source tree, used when backhaul runs from source without being
#: installed. Keep it equal to pyproject.toml's (a unit test checks).
_SOURCE_VERSION = "0.1.0"


def _installed_version() -> str:
    # The installed distribution's version is the one a connector reports (heartbeat, hello,
    # `backhaul --version`): a wheel built with a bumped pyproject version says so everywhere,
    # which is what the updater and the relay's rollout compare against.
    try:
        return importlib.metadata.version("backhaul")
    except importlib.metadata.PackageNotFoundError:
        return _SOURCE_VERSION


__version__ = _installed_version()
