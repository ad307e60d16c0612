"""backhaul: an outbound-only private network connector and its relay service."""

__version__ = "0.1.0"
