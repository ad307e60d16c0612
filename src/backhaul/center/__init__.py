"""The admin center: the web page at /admin/ on the relay's listen port (docs/operations.md).

Pages are rendered on the server (Jinja2, autoescaped) from the store; every change the
page makes is a fetch() to the control API's own /v1/ endpoints, authorized by the session
cookie plus a CSRF header (control/web.py require_admin), never by a second API.
"""
