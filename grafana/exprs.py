#!/usr/bin/env python3
"""Lists or checks the PromQL expressions of the Grafana dashboard (stdlib only).

    grafana/exprs.py --list [DASHBOARD]
    grafana/exprs.py --prometheus http://127.0.0.1:9090 [--allow-empty] [DASHBOARD]
    grafana/exprs.py --graph-url http://127.0.0.1:9090 --row Plugins [--var plugin=NAME]

Every panel target's `expr` (rows' nested panels included) is taken from the dashboard JSON
(default: grafana/dashboards/apisix-profiler.json beside this script) and Grafana's
variables are substituted the way the "All" selection and a typical interval would:
dashboard variables -> their allValue (`.*` for $container), $__rate_interval -> 1m,
$__interval -> 30s, $__range -> 5m ($__range_s 300, $__range_ms 300000, $__interval_ms
30000). Both `$name` and `${name}` / `${name:format}` forms are replaced.

--list prints one `Panel title [refId]: expr` per line.
--prometheus evaluates each with an instant query (POST /api/v1/query) and exits 1,
listing each expression that returns an error or - unless --allow-empty, which only checks
that the expressions parse and evaluate - zero series. A variable left unresolved is an
error too.
--graph-url prints the address of Prometheus's own graph page showing every expression of
the panels of one dashboard row (`--row`, by title) as stacked graphs over `--range`: a
stand-in for the Grafana row where Grafana is not at hand. `--var NAME=VALUE` sets a
dashboard variable (e.g. the plugin of "Lua functions of plugin $plugin").
"""

import argparse
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request

BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__interval_ms": "30000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
}
VAR_RE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)(?::[^\]]*)?\]\]")
DEFAULT_DASHBOARD = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                 "dashboards", "apisix-profiler.json")


def panels(items):
    for p in items or []:
        yield p
        # collapsed rows keep their panels inside
        yield from panels(p.get("panels"))


def row_panels(dashboard, title):
    """The panels of the row titled `title`: those nested in it when it is collapsed, else
    those that follow it up to the next row."""
    out, inside = [], False
    for p in dashboard.get("panels") or []:
        if p.get("type") == "row":
            if inside:
                break
            inside = p.get("title") == title
            if inside:
                out.extend(p.get("panels") or [])
        elif inside:
            out.append(p)
    return out


def variables(dashboard):
    values = {}
    for v in dashboard.get("templating", {}).get("list", []):
        name = v.get("name")
        if not name:
            continue
        if v.get("includeAll"):
            values[name] = v.get("allValue") or ".*"
        elif v.get("type") in ("constant", "textbox", "custom") and v.get("query"):
            values[name] = str(v["query"]).split(",")[0].strip()
        else:
            values[name] = ".*"
    return values


def substitute(expr, values):
    unresolved = []

    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name in BUILTINS:
            return BUILTINS[name]
        if name in values:
            return values[name]
        unresolved.append(name)
        return m.group(0)

    return VAR_RE.sub(repl, expr), unresolved


def extract(dashboard, items=None, overrides=None):
    """[(label, expr, unresolved variables)] for every panel target with an expr (of
    `items`, by default the whole dashboard)."""
    values = variables(dashboard)
    values.update(overrides or {})
    out = []
    for p in panels(dashboard.get("panels") if items is None else items):
        for t in p.get("targets") or []:
            expr = (t.get("expr") or "").strip()
            if not expr:
                continue
            sub, unresolved = substitute(expr, values)
            label = f"{p.get('title') or '(untitled)'} [{t.get('refId', '?')}]"
            out.append((label, sub, unresolved))
    return out


def query(base, expr, timeout):
    url = base.rstrip("/") + "/api/v1/query"
    data = urllib.parse.urlencode({"query": expr}).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        try:
            body = json.load(e)
        except ValueError:
            return None, f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        return None, f"request failed: {e}"
    if body.get("status") != "success":
        return None, f"{body.get('errorType', 'error')}: {body.get('error', body)}"
    data = body.get("data", {})
    kind, result = data.get("resultType"), data.get("result")
    if kind in ("vector", "matrix"):
        return len(result or []), None
    # scalar / string: one value
    return 1, None


def graph_url(args, dashboard):
    if not args.row:
        print("--graph-url needs --row TITLE", file=sys.stderr)
        return 2
    overrides = {}
    for v in args.var:
        name, sep, value = v.partition("=")
        if not sep or not name:
            print(f"--var {v!r}: expected NAME=VALUE", file=sys.stderr)
            return 2
        overrides[name] = value
    items = row_panels(dashboard, args.row)
    exprs = extract(dashboard, items, overrides)
    if not exprs:
        print(f"{args.dashboard}: no row {args.row!r} with panel expressions", file=sys.stderr)
        return 1
    params = []
    for i, (label, expr, unresolved) in enumerate(exprs):
        if unresolved:
            print(f"{label}: unresolved variable(s): {', '.join(unresolved)}",
                  file=sys.stderr)
            return 1
        params += [(f"g{i}.expr", " ".join(expr.split())), (f"g{i}.tab", "0"),
                   (f"g{i}.stacked", "1"), (f"g{i}.range_input", args.range)]
    print(args.graph_url.rstrip("/") + "/graph?" + urllib.parse.urlencode(params))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dashboard", nargs="?", default=DEFAULT_DASHBOARD)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--list", action="store_true", help="print the expressions")
    mode.add_argument("--prometheus", metavar="URL", help="evaluate them on this Prometheus")
    mode.add_argument("--graph-url", metavar="URL",
                      help="print this Prometheus's graph page for the panels of --row")
    ap.add_argument("--row", help="with --graph-url: the dashboard row's title")
    ap.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                    help="with --graph-url: a dashboard variable's value")
    ap.add_argument("--range", default="5m", help="with --graph-url: the graphs' time range")
    ap.add_argument("--allow-empty", action="store_true",
                    help="with --prometheus: only errors fail, not empty results")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per query")
    args = ap.parse_args()

    with open(args.dashboard) as f:
        dashboard = json.load(f)
    if args.graph_url:
        return graph_url(args, dashboard)
    exprs = extract(dashboard)
    if not exprs:
        print(f"{args.dashboard}: no panel expressions", file=sys.stderr)
        return 1

    if args.list:
        for label, expr, _ in exprs:
            print(f"{label}: {' '.join(expr.split())}")
        return 0

    failed = []
    for label, expr, unresolved in exprs:
        if unresolved:
            failed.append((label, expr, "unresolved variable(s): " + ", ".join(unresolved)))
            continue
        n, err = query(args.prometheus, expr, args.timeout)
        if err:
            failed.append((label, expr, err))
        elif n == 0 and not args.allow_empty:
            failed.append((label, expr, "no series"))
        else:
            print(f"ok   {label}: {n} series")
    for label, expr, why in failed:
        print(f"FAIL {label}: {why}\n     {' '.join(expr.split())}")
    print(f"{len(exprs) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
