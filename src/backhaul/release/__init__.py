"""Signed releases: the manifest a publisher signs, and the keys that sign and verify it.

Sans-I/O except for key files and the streamed check of a downloaded file. The relay uses
this to check an upload (with the public key sent along, never a private one); a connector's
updater uses it to decide what to install (with the keys pinned on the connector only).
"""
