"""`backhaul admin`: groups, enrollment tokens, apps and connectors, through the admin API."""

from __future__ import annotations

import argparse
import sys
import urllib.parse
from typing import Any, Callable

import orjson

from backhaul.admin.tables import counts, rollout_state, table, when, yes_no
from backhaul.config import RELEASE_EXPIRES_DAYS
from backhaul.errors import ConfigError

#: CPU percentage above which `connector list` warns (the service flags it as cpu_warning).
CPU_WARNING = 70.0


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # The same options are accepted before and after the subcommand; after it they
    # default to SUPPRESS so they do not overwrite a value given before it.
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--service", default=default, help="https://HOST:PORT of the relay (env BACKHAUL_SERVICE)")
    parser.add_argument("--token-file", default=default, help="file holding the admin token (env BACKHAUL_TOKEN)")
    parser.add_argument("--data-dir", default=default, help="the service data dir: admin.token and ca.pem are read from it")
    parser.add_argument("--ca", default=default, help="the service's ca.pem (env BACKHAUL_CA)")
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False, help="print JSON")


def add_parser(admin: argparse.ArgumentParser) -> None:
    """Add the admin options and subcommands to the `backhaul admin` parser."""
    _global_options(admin, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    objects = admin.add_subparsers(dest="admin_object", required=True, metavar="OBJECT")

    def leaf(sub, name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help)
        p.set_defaults(func=func)
        return p

    group = objects.add_parser("group", help="connector groups").add_subparsers(dest="admin_action", required=True)
    leaf(group, "create", group_create, "create a group").add_argument("name")
    leaf(group, "list", group_list, "list groups")
    leaf(group, "delete", group_delete, "delete an empty group").add_argument("name")
    p = leaf(group, "rename", group_rename, "rename a group")
    p.add_argument("old")
    p.add_argument("new")

    token = objects.add_parser("token", help="enrollment tokens").add_subparsers(dest="admin_action", required=True)
    p = leaf(token, "create", token_create, "create an enrollment token")
    p.add_argument("--group", default="default", help="group the connector joins (default: default)")
    p.add_argument("--ttl", type=int, default=3600, help="seconds the token stays valid (default 3600)")
    p.add_argument("--uses", type=int, default=1, help="connectors it may enroll (default 1)")
    leaf(token, "list", token_list, "list the usable enrollment tokens (never their secrets)")
    leaf(token, "revoke", token_revoke, "revoke an enrollment token: it enrolls nothing from now on").add_argument(
        "id", help="the token's id, from `token list` or `token create`"
    )

    app = objects.add_parser("app", help="published apps").add_subparsers(dest="admin_action", required=True)
    p = leaf(app, "publish", app_publish, "publish an app")
    p.add_argument("name")
    p.add_argument("--group", default="default", help="connector group serving the app (default: default)")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--tcp", type=int, metavar="PORT", help="relay TCP port users connect to")
    kind.add_argument("--udp", type=int, metavar="PORT", help="relay UDP port users send to")
    kind.add_argument("--http", metavar="EXTERNAL_HOST", help="host name users reach the web app at")
    p.add_argument("--target", help="HOST:PORT the connector dials (tcp/udp apps)")
    p.add_argument("--internal-url", help="URL of the web app inside the private network (http apps)")
    p.add_argument("--preauth", choices=["passthrough", "oidc"], default=None, help="pre-authentication (http apps)")
    p.add_argument(
        "--health-path", metavar="PATH", default=None,
        help="path connectors GET to check the web app (http apps; default: a TCP connect)",
    )
    p.add_argument("--keep-host", action="store_true", help="the app gets the external Host header, not its own (http apps)")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--backend-ca", metavar="FILE", help="PEM CA bundle the connector verifies an https app with")
    tls.add_argument(
        "--backend-insecure", action="store_true", help="do not verify the https app's certificate (testing only)"
    )
    _app_update_parser(leaf(app, "update", app_update, "change some fields of a published app (only those given)"))
    leaf(app, "list", app_list, "list apps")
    leaf(app, "delete", app_delete, "delete an app").add_argument("name")

    connector = objects.add_parser("connector", help="connectors").add_subparsers(dest="admin_action", required=True)
    leaf(connector, "list", connector_list, "list connectors")
    p = leaf(connector, "assign", connector_assign, "move a connector to a group")
    p.add_argument("id")
    p.add_argument("group")
    leaf(connector, "delete", connector_delete, "delete a connector and revoke its certificate").add_argument("id")

    node = objects.add_parser("node", help="relay nodes").add_subparsers(dest="admin_action", required=True)
    leaf(node, "list", node_list, "list the relay nodes: addresses, up or down, tunnels, version, last heartbeat")
    leaf(node, "remove", node_remove, "forget a relay node that is down (it registers again if it comes back)").add_argument("id")

    # -- releases
    release = objects.add_parser("release", help="signed connector releases").add_subparsers(dest="admin_action", required=True)
    p = leaf(release, "publish", release_publish, "sign a wheelhouse with your key and upload it as a release")
    p.add_argument("wheels", nargs="+", metavar="WHEEL", help="the backhaul wheel and the wheels it depends on")
    p.add_argument("--signing-key", required=True, metavar="FILE", help="private key from `backhaul release keygen` (stays here)")
    p.add_argument("--auto", action="store_true", help="connectors' updaters install it without a person (default: by `updater apply`)")
    p.add_argument(
        "--expires", type=float, default=RELEASE_EXPIRES_DAYS, metavar="DAYS",
        help=f"days the signed manifest stays valid; connectors refuse it afterwards (default {RELEASE_EXPIRES_DAYS:g})",
    )
    leaf(release, "list", release_list, "list releases: version, state, files, rollout per group")
    leaf(release, "revoke", release_revoke, "revoke a release: never served again").add_argument("version")

    # -- rollout
    _rollout_parsers(objects, group, leaf)


def _app_update_parser(p: argparse.ArgumentParser) -> None:
    """`app update NAME`: every option defaults to None, and only those given are sent."""
    p.add_argument("name")
    p.add_argument("--rename", metavar="NEW_NAME", help="the app's new name")
    p.add_argument("--group", help="connector group serving the app")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--tcp", type=int, metavar="PORT", help="relay TCP port users connect to (a tcp app)")
    kind.add_argument("--udp", type=int, metavar="PORT", help="relay UDP port users send to (a udp app)")
    kind.add_argument("--http", metavar="EXTERNAL_HOST", help="host name users reach the web app at (an http app)")
    p.add_argument("--target", help="HOST:PORT the connector dials (tcp/udp apps)")
    p.add_argument("--internal-url", help="URL of the web app inside the private network (http apps)")
    p.add_argument("--preauth", choices=["passthrough", "oidc"], help="pre-authentication (http apps)")
    p.add_argument("--health-path", metavar="PATH", help="path connectors GET to check the web app (http apps)")
    p.add_argument(
        "--keep-host", action=argparse.BooleanOptionalAction, default=None,
        help="the app gets the external Host header, not its own (http apps)",
    )
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--backend-ca", metavar="FILE", help="PEM CA bundle the connector verifies an https app with")
    tls.add_argument(
        "--backend-insecure", action=argparse.BooleanOptionalAction, default=None,
        help="do not verify the https app's certificate (testing only)",
    )


def call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """One admin API call with the credentials the options name."""
    # Imported here: building the CLI parser must not pay for aiohttp and cryptography.
    from backhaul.admin.client import call as api_call, resolve_target

    target = resolve_target(service=args.service, token_file=args.token_file, data_dir=args.data_dir, ca_file=args.ca)
    return api_call(target, method, path, body)


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _emit(args: argparse.Namespace, data: Any, human: str) -> int:
    print(orjson.dumps(data).decode() if args.json else human)
    return 0


def _usage(message: str) -> int:
    raise ConfigError(message)


def _read_text(path: str, option: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read(1024 * 1024)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"{option} {path}: cannot read it ({exc})") from None


# -- groups


def group_create(args: argparse.Namespace) -> int:
    data = call(args, "POST", "/v1/groups", {"name": args.name})
    return _emit(args, data, f"created group {data['name']}")


def group_list(args: argparse.Namespace) -> int:
    data = call(args, "GET", "/v1/groups")
    # -- rollout: each group's update settings and rollout state, next to its counts
    rollouts = {r["group"]: r for r in call(args, "GET", "/v1/rollout")}
    for g in data:
        r = rollouts.get(g["name"], {})
        g.update({key: r.get(key) for key in ("allow_downtime", "window", "paused", "halted")})
    rows = [
        [g["name"], g["apps"], g["connectors"], yes_no(g["allow_downtime"]), g["window"] or "-", rollout_state(g)]
        for g in data
    ]
    return _emit(args, data, table(["NAME", "APPS", "CONNECTORS", "DOWNTIME", "WINDOW", "ROLLOUT"], rows))


def group_delete(args: argparse.Namespace) -> int:
    data = call(args, "DELETE", f"/v1/groups/{_quote(args.name)}")
    return _emit(args, data, f"deleted group {args.name}")


def group_rename(args: argparse.Namespace) -> int:
    data = call(args, "PATCH", f"/v1/groups/{_quote(args.old)}", {"name": args.new})
    return _emit(args, data, f"renamed group {args.old} to {data['name']}")


# -- tokens


def token_create(args: argparse.Namespace) -> int:
    data = call(args, "POST", "/v1/tokens", {"group": args.group, "ttl": args.ttl, "uses": args.uses})
    if args.json:
        return _emit(args, data, "")
    # The token alone on stdout, so `TOKEN=$(backhaul admin token create)` works.
    print(data["token"])
    print(
        f"enrollment token {data['id']} for group {data['group']}: {data['uses']} use(s), valid until {when(data['expires'])}",
        file=sys.stderr,
    )
    return 0


def token_list(args: argparse.Namespace) -> int:
    data = call(args, "GET", "/v1/tokens")
    rows = [[t["id"], t["group"], t["uses_left"], when(t["expires"]), when(t["created"])] for t in data]
    return _emit(args, data, table(["ID", "GROUP", "USES LEFT", "EXPIRES", "CREATED"], rows))


def token_revoke(args: argparse.Namespace) -> int:
    data = call(args, "DELETE", f"/v1/tokens/{_quote(args.id)}")
    return _emit(args, data, f"revoked enrollment token {args.id}; it enrolls nothing from now on")


# -- apps


def app_publish(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "group": args.group}
    if args.http is not None:
        if args.target is not None:
            return _usage("--target is for --tcp/--udp apps; an --http app takes --internal-url URL")
        if args.internal_url is None:
            return _usage("an --http app needs --internal-url URL (where the connector reaches the web app)")
        body.update(proto="http", external_host=args.http, internal_url=args.internal_url, preauth=args.preauth or "passthrough")
        if args.health_path is not None:
            body["health_path"] = args.health_path
        if args.keep_host:
            body["keep_host"] = True
        if args.backend_insecure:
            body["backend_insecure"] = True
        if args.backend_ca is not None:
            body["backend_ca"] = _read_text(args.backend_ca, "--backend-ca")
    else:
        if args.internal_url is not None or args.preauth is not None:
            return _usage("--internal-url and --preauth are for --http apps; a --tcp/--udp app takes --target HOST:PORT")
        if args.health_path is not None:
            return _usage("--health-path is for --http apps; a --tcp app is checked by connecting to its --target")
        if args.keep_host or args.backend_ca is not None or args.backend_insecure:
            return _usage("--keep-host, --backend-ca and --backend-insecure are for --http apps")
        if args.target is None:
            return _usage("a --tcp/--udp app needs --target HOST:PORT (where the connector connects)")
        proto, port = ("tcp", args.tcp) if args.tcp is not None else ("udp", args.udp)
        body.update(proto=proto, port=port, target=args.target)
    data = call(args, "POST", "/v1/apps", body)
    where = f"http://{data['external_host']}" if data["proto"] == "http" else f"{data['proto']} port {data['port']}"
    return _emit(args, data, f"published {data['name']} at {where} via group {data['group']} -> {data['internal_url'] or data['target']}")


def app_update(args: argparse.Namespace) -> int:
    """PATCH /v1/apps/NAME with the fields given; the relay checks them against the app (a
    kind that does not fit, a port in use) and its refusal is printed as it says it."""
    changes: dict[str, Any] = {}
    # proto with the port or host, so the relay refuses a change of kind in its own words.
    if args.tcp is not None:
        changes.update(proto="tcp", port=args.tcp)
    elif args.udp is not None:
        changes.update(proto="udp", port=args.udp)
    elif args.http is not None:
        changes.update(proto="http", external_host=args.http)
    for field in ("group", "target", "internal_url", "preauth", "health_path", "keep_host", "backend_insecure"):
        value = getattr(args, field)
        if value is not None:
            changes[field] = value
    if args.rename is not None:
        changes["name"] = args.rename
    if args.backend_ca is not None:
        changes["backend_ca"] = _read_text(args.backend_ca, "--backend-ca")
    if not changes:
        return _usage(f"nothing to change for app {args.name}; give what changes, e.g. --target HOST:PORT (see --help)")
    data = call(args, "PATCH", f"/v1/apps/{_quote(args.name)}", changes)
    where = f"http://{data['external_host']}" if data["proto"] == "http" else f"{data['proto']} port {data['port']}"
    given = ", ".join(sorted(changes))
    return _emit(
        args, data,
        f"updated app {data['name']} ({given}): at {where} via group {data['group']} -> {data['internal_url'] or data['target']}",
    )


def _reachable(app: dict[str, Any]) -> str:
    """'1/2 (down: b)': active connectors of the group that report reaching the app, and who does not."""
    reach = app.get("reachability")
    if reach is None or app["proto"] == "udp":
        return "-"
    cell = f"{reach['reachable']}/{reach['active']}"
    down = [c["name"] for c in reach["connectors"] if c["reachable"] is False]
    unchecked = [c["name"] for c in reach["connectors"] if c["reachable"] is None]
    notes = [f"{label}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}" for label, names in (("down", down), ("unchecked", unchecked)) if names]
    return cell + (f" ({'; '.join(notes)})" if notes else "")


def app_list(args: argparse.Namespace) -> int:
    data = call(args, "GET", "/v1/apps")
    rows = []
    for a in data:
        listen = a["external_host"] if a["proto"] == "http" else a["port"]
        rows.append([a["name"], a["group"], a["proto"], listen, a["internal_url"] or a["target"], a["preauth"] or "", _reachable(a)])
    return _emit(args, data, table(["NAME", "GROUP", "PROTO", "LISTEN", "TARGET", "PREAUTH", "REACHABLE"], rows))


def app_delete(args: argparse.Namespace) -> int:
    data = call(args, "DELETE", f"/v1/apps/{_quote(args.name)}")
    return _emit(args, data, f"deleted app {args.name}")


# -- connectors


def connector_list(args: argparse.Namespace) -> int:
    data = call(args, "GET", "/v1/connectors")
    rows = [
        [
            c["id"],
            c["name"],
            c["group"],
            c["status"],
            c["version"],
            when(c["last_seen"]),
            # .get: a relay older than these fields lists none (empty cells).
            when(c.get("inactive_since")),
            when(c.get("removal_at")),
            c["tunnels"],
            f"{c['cpu']:.0f}%" + (" !" if c.get("cpu_warning") else ""),
        ]
        for c in data
    ]
    human = table(
        ["ID", "NAME", "GROUP", "STATUS", "VERSION", "LAST SEEN", "INACTIVE SINCE", "REMOVED ON", "TUNNELS", "CPU"], rows
    )
    hot = [c for c in data if c.get("cpu_warning")]
    for c in hot:
        human += f"\nwarning: connector {c['id']} ({c['name']}) is at {c['cpu']:.0f}% CPU (over {CPU_WARNING:.0f}%); add a connector to group {c['group']}"
    return _emit(args, data, human)


def connector_assign(args: argparse.Namespace) -> int:
    data = call(args, "PUT", f"/v1/connectors/{_quote(args.id)}/group", {"group": args.group})
    return _emit(args, data, f"connector {data['id']} is now in group {data['group']}")


def connector_delete(args: argparse.Namespace) -> int:
    data = call(args, "DELETE", f"/v1/connectors/{_quote(args.id)}")
    return _emit(args, data, f"deleted connector {args.id}; its certificate is revoked")


# -- relay nodes


def node_list(args: argparse.Namespace) -> int:
    data = call(args, "GET", "/v1/nodes")
    rows = [[n["id"], n["listen"], n["peer"], n["status"], n["tunnels"], n["version"], when(n["last_seen"])] for n in data]
    return _emit(args, data, table(["ID", "LISTEN", "PEER", "STATUS", "TUNNELS", "VERSION", "LAST SEEN"], rows))


def node_remove(args: argparse.Namespace) -> int:
    data = call(args, "DELETE", f"/v1/nodes/{_quote(args.id)}")
    return _emit(args, data, f"removed relay node {args.id}")


# -- releases


def release_publish(args: argparse.Namespace) -> int:
    # Imported here: building the CLI parser must not pay for aiohttp and cryptography.
    from backhaul.admin.client import resolve_target
    from backhaul.release.publish import publish

    target = resolve_target(service=args.service, token_file=args.token_file, data_dir=args.data_dir, ca_file=args.ca)
    data = publish(args, target)
    human = (
        f"release {data['version']} {data['state']}: {data['files']} file(s) signed by key {data['key_id']}, "
        f"{'rolled out automatically' if args.auto else 'installed by `updater apply`'}, expires {when(data['expires'])}"
    )
    return _emit(args, data, human)


def _size(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB" if n >= 1024 * 1024 else f"{n / 1024:.1f} KiB"


def release_rollout(groups: dict[str, dict]) -> str:
    """A release's rollout per group in one cell, e.g. ``default: 1/2 on it, updating c2; office: failed 1``."""
    cells = []
    for name, g in sorted(groups.items()):
        parts = [f"{g['on']}/{g['connectors']} on it"] if g["connectors"] else []
        if g["updating"]:
            parts.append(f"updating {g['updating']}")
        if g["failed"]:
            parts.append(f"failed {g['failed']}")
        if g["rolled_back"]:
            parts.append(f"rolled back {g['rolled_back']}")
        if g["halted"]:
            parts.append("halted")
        cells.append(f"{name}: {', '.join(parts)}")
    return "; ".join(cells) or "-"


def release_list(args: argparse.Namespace) -> int:
    data = call(args, "GET", "/v1/releases")
    rows = [
        [
            r["version"], r["state"] + (f" ({len(r['missing'])} missing)" if r["state"] == "incomplete" else ""),
            "yes" if r["auto"] else "no", r["key_id"], when(r["issued"]), when(r["expires"]), len(r["files"]), _size(r["size"]),
            release_rollout(r.get("groups", {})),
        ]
        for r in data
    ]
    lines = [table(["VERSION", "STATE", "AUTO", "KEY", "ISSUED", "EXPIRES", "FILES", "SIZE", "ROLLOUT"], rows)]
    # Why a release halted a group, in words: the table has only room for "halted".
    for r in data:
        for name, g in sorted(r.get("groups", {}).items()):
            if g["halted"]:
                lines.append(
                    f"release {r['version']} halted group {name}: {g['halted']}; fix or revoke it, then "
                    f"`backhaul admin rollout resume --group {name}`"
                )
    return _emit(args, data, "\n".join(lines))


def release_revoke(args: argparse.Namespace) -> int:
    data = call(args, "DELETE", f"/v1/releases/{_quote(args.version)}")
    return _emit(args, data, f"revoked release {data['revoked']}; it is never served to connectors again")


# -- rollout: group update settings, rollout status, pause and resume


def _rollout_parsers(objects, group, leaf) -> None:
    p = leaf(group, "update", group_update, "change a group's update settings (downtime, maintenance window)")
    p.add_argument("name")
    p.add_argument(
        "--allow-downtime", choices=["yes", "no"], default=None,
        help="yes: a connector may update even when no other connector of the group is up (default no)",
    )
    window = p.add_mutually_exclusive_group()
    window.add_argument(
        "--window", metavar="SPEC", default=None,
        help="maintenance window in UTC, e.g. 'Sat,Sun 02:00-04:00' or 'Mon-Fri 22:00-02:00': inside it a connector "
        "may update even when it is the group's only one up",
    )
    window.add_argument("--no-window", action="store_true", help="remove the group's maintenance window")

    rollout = objects.add_parser("rollout", help="automatic updates: one connector per group at a time").add_subparsers(
        dest="admin_action", required=True
    )
    for name, func, help in (
        ("status", rollout_status, "each group's rollout: paused or halted (why), who updates, versions, failures"),
        ("pause", rollout_pause, "grant no update lease in a group (or every group) until resumed"),
        ("resume", rollout_resume, "resume a group's (or every group's) rollout: clears its pause and its halt"),
    ):
        leaf(rollout, name, func, help).add_argument("--group", default=None, help="one group (default: every group)")
    leaf(rollout, "history", rollout_history, "a connector's newest update reports").add_argument("id", help="the connector's id")


def group_update(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.allow_downtime is not None:
        body["allow_downtime"] = args.allow_downtime == "yes"
    if args.no_window:
        body["window"] = None
    elif args.window is not None:
        body["window"] = args.window
    if not body:
        return _usage("say what to change: --allow-downtime yes|no, --window SPEC or --no-window")
    data = call(args, "PATCH", f"/v1/groups/{_quote(args.name)}/updates", body)
    window = f"maintenance window {data['window']} UTC" if data["window"] else "no maintenance window"
    downtime = "may" if data["allow_downtime"] else "may not"
    return _emit(args, data, f"group {data['group']}: updates {downtime} leave it without an active connector; {window}")


def _rollouts(args: argparse.Namespace) -> list[dict[str, Any]]:
    data = call(args, "GET", "/v1/rollout")
    if args.group is None:
        return data
    chosen = [r for r in data if r["group"] == args.group]
    if not chosen:
        raise ConfigError(f"there is no connector group {args.group!r}; see `backhaul admin group list`")
    return chosen


def _updating(r: dict[str, Any]) -> str:
    lease = r.get("lease")
    if lease is None:
        return "-"
    return f"{lease['connector_id']} to {lease['version']} (lease until {when(lease['expires'])})"


def rollout_status(args: argparse.Namespace) -> int:
    data = _rollouts(args)
    rows = [[r["group"], rollout_state(r), _updating(r), counts(r["versions"]) or "-"] for r in data]
    lines = [table(["GROUP", "ROLLOUT", "UPDATING", "VERSIONS"], rows)]
    for r in data:
        if r["halted"] is not None:
            lines.append(
                f"group {r['group']} halted: version {r['halted_version']} failed on connector {r['halted_connector']} "
                f"at {when(r['halted_at'])}: {r['halted']}; fix or revoke the release, then "
                f"`backhaul admin rollout resume --group {r['group']}`"
            )
        for f in r["failures"]:
            lines.append(
                f"  {f['step'].replace('_', ' ')}: {f['version']} on {f['connector_id']} ({f['connector']}) at {when(f['at'])}"
                + (f": {f['reason']}" if f["reason"] else "")
            )
        hidden = r["failures_total"] - len(r["failures"])
        if hidden > 0:
            lines.append(f"  ... and {hidden} older failures in group {r['group']}")
    return _emit(args, data, "\n".join(lines))


def _rollout_change(args: argparse.Namespace, action: str) -> int:
    body = {} if args.group is None else {"group": args.group}
    data = call(args, "POST", f"/v1/rollout/{action}", body)
    key = "paused" if action == "pause" else "resumed"
    where = f"group {args.group}" if args.group is not None else "every group"
    changed = data[key]
    human = f"{key} the rollout of {', '.join(changed)}" if changed else f"nothing to do: the rollout of {where} was already {'paused' if action == 'pause' else 'running'}"
    return _emit(args, data, human)


def rollout_pause(args: argparse.Namespace) -> int:
    return _rollout_change(args, "pause")


def rollout_resume(args: argparse.Namespace) -> int:
    return _rollout_change(args, "resume")


def rollout_history(args: argparse.Namespace) -> int:
    data = call(args, "GET", f"/v1/connectors/{_quote(args.id)}/updates")
    rows = [[when(r["at"]), r["group"], r["version"], r["step"], "-" if r["token"] is None else r["token"], r["reason"]] for r in data]
    return _emit(args, data, table(["AT", "GROUP", "VERSION", "STEP", "LEASE", "REASON"], rows))
