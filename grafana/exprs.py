#!/usr/bin/env python3
"""Lists or checks the PromQL expressions of the Grafana dashboard (stdlib only).

    grafana/exprs.py --list [DASHBOARD]
    grafana/exprs.py --prometheus http://127.0.0.1:9090 [--allow-empty] [DASHBOARD]

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


def extract(dashboard):
    """[(label, expr, unresolved variables)] for every panel target with an expr."""
    values = variables(dashboard)
    out = []
    for p in panels(dashboard.get("panels")):
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dashboard", nargs="?", default=DEFAULT_DASHBOARD)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--list", action="store_true", help="print the expressions")
    mode.add_argument("--prometheus", metavar="URL", help="evaluate them on this Prometheus")
    ap.add_argument("--allow-empty", action="store_true",
                    help="with --prometheus: only errors fail, not empty results")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per query")
    args = ap.parse_args()

    with open(args.dashboard) as f:
        dashboard = json.load(f)
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
