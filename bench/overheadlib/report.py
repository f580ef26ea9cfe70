"""The report: turns the measured results into BENCHMARKS.md (Markdown)."""

import statistics

from .harness import NGINX_COMM
from .prose import PROSE
from .stats import aa_ratios, direct_ratio, median, median_interval


def fmt_ratio(xs):
    return f"{median(xs):.3f} ({min(xs):.3f}–{max(xs):.3f})"


def pass_fail(ok):
    return "PASS" if ok else "FAIL"


def report(a, meta, res):
    L = []
    add = L.append
    cmd = "sudo ./bench/overhead.sh" + (" --quick" if a.quick else "")
    add("# apisix-agent overhead benchmarks")
    add("")
    if a.quick:
        add("> **Smoke run (`--quick`)**: fewer and shorter runs; the figures are indicative only.")
        add("")
    add(f"- Date: {meta['date']}; total run time {meta['runtime_s'] / 60:.1f} min")
    add(f"- Kernel: `{meta['kernel']}`")
    add(f"- CPU: {meta['cpu']} × {meta['ncpu']}; memory {meta['mem_gib']:.1f} GiB")
    add(f"- Load average (1/5/15 min) at start {' / '.join(meta['load_start'])}, at end {' / '.join(meta['load_end'])}"
        " — the machine is shared, other jobs add noise")
    add(f"- Agent: `target/release/apisix-agent` at commit {meta['rev']}; workload: {meta['nginx']} + "
        "libnginx-mod-http-lua (Debian LuaJIT 2.1, GC64)")
    add(f"- Reproduce sections 1-4 (as root, from the repository root): `{cmd}`; it rewrites them and"
        " this header and keeps sections 5 on, which other benches write")
    add("")
    add(PROSE["workload"].substitute(
        wrk_threads=a.wrk_threads,
        wrk_conns=a.wrk_conns,
        duration=a.duration,
        nginx_comm=NGINX_COMM,
    ))
    add("")
    add(PROSE["setup"].substitute(
        workers=a.workers,
        footprint_workers=res['footprint']['workers'],
        nice=a.nice,
    ))
    add("")

    # 1. throughput
    add("## 1. Throughput and p99 latency, daemon on vs off")
    add("")
    add(PROSE["throughput_method"].substitute(
        runs_off=a.pairs + 1,
        pairs=a.pairs,
        duration=a.duration,
    ))
    add("")
    add("| Sampling rate | req/s off | req/s on | Throughput ratio | 95% interval of the median | A/A control (no agent) | p99 off (ms) | p99 on (ms) | p99 ratio | CPU/request ratio | Agent CPU | Ratio expected from direct costs | Target | Result |")
    add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for hz, target in ((19, 0.99), (99, 0.97)):
        pairs = res[f"tput_{hz}"]
        offs = res[f"offs_{hz}"]
        tr = [p["tput_ratio"] for p in pairs]
        pr = [p["p99_ratio"] for p in pairs]
        cr = [p["capacity_ratio"] for p in pairs]
        dr = [direct_ratio(p["with"], res["bpf"])[0] for p in pairs]
        aa = aa_ratios(offs)
        lo, hi = median_interval(tr)
        add(
            f"| {hz} Hz{' (default)' if hz == 19 else ''} | {median([o['rps'] for o in offs]):.0f} | "
            f"{median([p['with']['rps'] for p in pairs]):.0f} | {fmt_ratio(tr)} | {lo:.3f}–{hi:.3f} | "
            f"{fmt_ratio(aa) if aa else 'n/a'} | "
            f"{median([o['p99_ms'] for o in offs]):.2f} | {median([p['with']['p99_ms'] for p in pairs]):.2f} | "
            f"{fmt_ratio(pr)} | {fmt_ratio(cr)} | {median([p['with']['agent_cpu_pct'] for p in pairs]):.2f}% of a core | "
            f"{median(dr):.3f} | throughput ratio ≥ {target} | {pass_fail(median(tr) >= target)} |"
        )
    add("")
    offs = [o for hz in (19, 99) for o in res[f"offs_{hz}"]]
    base = [o["rps"] for o in offs]
    aa_all = [r for hz in (19, 99) for r in aa_ratios(res[f"offs_{hz}"])]
    cv = 100 * statistics.pstdev(base) / statistics.mean(base)
    cpr = [r["cpu_per_req_us"] for r in offs]
    share = [100 * r["cpu_share"] for r in offs]
    aa_sd = 100 * statistics.pstdev(aa_all) if len(aa_all) > 1 else float("nan")
    add(PROSE["noise"].substitute(
        cv=f"{cv:.1f}",
        off_rps_min=f"{min(base):.0f}",
        off_rps_max=f"{max(base):.0f}",
        cpu_per_req_cv=f"{100 * statistics.pstdev(cpr) / statistics.mean(cpr):.1f}",
        cpu_per_req_min=f"{min(cpr):.0f}",
        cpu_per_req_max=f"{max(cpr):.0f}",
        share_min=f"{min(share):.0f}",
        share_max=f"{max(share):.0f}",
        aa_sd=f"{aa_sd:.1f}",
        median_resolution=f"{aa_sd * 1.25 / max(1, a.pairs) ** 0.5:.1f}",
    ))
    add("")
    add("<details><summary>Per-run figures</summary>")
    add("")
    add("| Rate | Run | req/s off before / on / off after | ratio | p99 off (ms, mean) | p99 on (ms) | CPU µs/req off (mean) | CPU µs/req on | agent CPU (on) | samples (on) | agent steady after (s) | agent thread blocked in kernel during run | bench share of the 2 CPUs off/on |")
    add("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for hz in (19, 99):
        for i, p in enumerate(res[f"tput_{hz}"], 1):
            wo, w = p["without"], p["with"]
            before, after = p["offs"]
            add(
                f"| {hz} Hz | {i} | {before['rps']:.0f} / {w['rps']:.0f} / {after['rps']:.0f} | {p['tput_ratio']:.3f} | "
                f"{wo['p99_ms']:.2f} | {w['p99_ms']:.2f} | {wo['cpu_per_req_us']:.1f} | {w['cpu_per_req_us']:.1f} | "
                f"{w['agent_cpu_pct']:.2f}% | {w['samples']:.0f} | {w['learn_s']:.1f} | "
                f"{100 * w['agent_blocked']:.0f}%{' (' + w['agent_blocked_in'] + ')' if w['agent_blocked_in'] else ''} | "
                f"{100 * wo['cpu_share']:.0f}% / {100 * w['cpu_share']:.0f}% |"
            )
    add("")
    add("</details>")
    add("")
    learn = [p["with"]["learn_s"] for hz in (19, 99) for p in res[f"tput_{hz}"]]
    add(PROSE["startup_note"].substitute(
        learn_min=f"{min(learn):.1f}",
        learn_max=f"{max(learn):.1f}",
    ))
    add("")
    # 2. BPF cost
    b = res["bpf"]
    add("## 2. Cost of the `sample` BPF program")
    add("")
    add(PROSE["bpf_method"].substitute(
        bpf_seconds=a.bpf_seconds,
        wrk_conns=a.wrk_conns,
        b_idle_mean_us=f"{b['idle']['mean_us']:.2f}",
        b_idle_runs=b['idle']['runs'],
    ))
    add("")
    add("| Case | Lua frames per sample | Program runs | Target samples | Mean per run (µs) | Per target sample (µs) | Upper bound (µs) | Target | Result |")
    add("|---|---|---|---|---|---|---|---|---|")
    labels = {"shallow": "routes handler (shallow Lua stack)", "deep50": "`/deep?depth=50` (diagnostic)",
              "deep": "`/deep` (100-frame recursion)"}
    for name in ("shallow", "deep50", "deep"):
        x = b[name]
        target = "per target sample ≤ 20 µs" if name == "deep" else "—"
        result = pass_fail(x["per_target_us"] <= 20) if name == "deep" else "—"
        add(f"| {labels[name]} | {x['lua_frames'][0]:.0f} ({x['lua_frames'][1]}) | {x['runs']} | {x['target_samples']:.0f} | "
            f"{x['mean_us']:.2f} | {x['per_target_us']:.2f} | {x['per_target_upper_us']:.2f} | {target} | {result} |")
    add("")
    add(PROSE["bpf_fit"].substitute(
        b_per_frame_us=f"{b['per_frame_us']:.2f}",
        b_fixed_us=f"{b['fixed_us']:.1f}",
    ))
    add("")

    # 3. footprint
    f = res["footprint"]
    add("## 3. Agent footprint")
    add("")
    add(PROSE["footprint_method"].substitute(
        f_workers=f['workers'],
        f_learn_s=f"{f['learn_s']:.1f}",
    ))
    add("")
    add("| Phase | Duration (s) | CPU (% of one core) | Peak RSS VmHWM (MiB) | RSS at end (MiB) | Notes |")
    add("|---|---|---|---|---|---|")
    add(f"| idle (no load) | {f['idle']['seconds']:.0f} | {f['idle']['cpu_pct']:.2f} | {f['idle']['hwm_mib']:.1f} | {f['idle']['rss_mib']:.1f} | |")
    add(f"| continuous sampling under load | {f['load']['seconds']:.0f} | {f['load']['cpu_pct']:.2f} | {f['load']['hwm_mib']:.1f} | {f['load']['rss_mib']:.1f} | {f['load']['samples']:.0f} samples; agent thread blocked in kernel {100 * f['load']['blocked']:.0f}% of the time |")
    add(f"| serving `/flamegraph?pid=…&seconds={a.fg_seconds}` under load | {f['flamegraph']['seconds']:.0f} | {f['flamegraph']['cpu_pct']:.2f} | {f['flamegraph']['hwm_mib']:.1f} | {f['flamegraph']['rss_mib']:.1f} | answered in {f['flamegraph']['answer_s']:.1f} s, {f['flamegraph']['svg_kib']:.0f} KiB SVG |")
    add("")
    peak = max(f[k]["hwm_mib"] for k in ("idle", "load", "flamegraph"))
    add("| Target | Measured | Result |")
    add("|---|---|---|")
    add(f"| peak RSS ≤ 64 MiB while continuously profiling {f['workers']} workers | {f['load']['hwm_mib']:.1f} MiB (incl. the on-demand capture: {peak:.1f} MiB) | {pass_fail(f['load']['hwm_mib'] <= 64)} |")
    add(f"| idle CPU ≤ 0.5% of one core | {f['idle']['cpu_pct']:.2f}% | {pass_fail(f['idle']['cpu_pct'] <= 0.5)} |")
    add("")

    # 4. render
    r = res["render"]
    add("## 4. SVG render time, 100 000 samples")
    add("")
    add(PROSE["render_method"].substitute(
        record=a.record,
        r_capture_samples=r['capture_samples'],
        r_capture_lost=r['capture_lost'],
        r_capture_stacks=r['capture_stacks'],
        r_samples=r['samples'],
        r_stacks=r['stacks'],
        r_max_depth=r['max_depth'],
        runs=len(r['wall_ms']),
    ))
    add("")
    add("| Samples | Distinct stacks | Render, median (min–max) ms | Command wall, median (min–max) ms | SVG size | Target | Result |")
    add("|---|---|---|---|---|---|---|")
    add(f"| {r['samples']} | {r['stacks']} | {median(r['internal_ms']):.1f} ({min(r['internal_ms']):.1f}–{max(r['internal_ms']):.1f}) | "
        f"{median(r['wall_ms']):.1f} ({min(r['wall_ms']):.1f}–{max(r['wall_ms']):.1f}) | {r['svg_kib']:.0f} KiB | "
        f"command ≤ 250 ms | {pass_fail(median(r['wall_ms']) <= 250)} |")
    add("")
    return "\n".join(L) + "\n"
