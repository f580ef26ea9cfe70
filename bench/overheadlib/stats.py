"""Statistics of the runs: medians, the drift-cancelling on/off ratios, the A/A control,
bootstrap intervals and the ratio expected from directly measured costs (stdlib only)."""

import os
import random
import statistics


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def aa_ratios(offs):
    """The on/off estimator applied to runs without the agent: each inner run against the mean
    of its two neighbours."""
    return [offs[j]["rps"] / ((offs[j - 1]["rps"] + offs[j + 1]["rps"]) / 2) for j in range(1, len(offs) - 1)]


def median_interval(xs, rounds=4000, seed=1):
    """95% bootstrap interval of the median of xs (deterministic)."""
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (float("nan"), float("nan"))
    rng = random.Random(seed)
    meds = sorted(median([rng.choice(xs) for _ in xs]) for _ in range(rounds))
    return meds[int(0.025 * rounds)], meds[int(0.975 * rounds) - 1]


def direct_ratio(run, bpf):
    """Throughput ratio expected from the costs measured directly for one "on" run: the agent
    process's CPU, plus the BPF program's time (target samples at the routes handler's cost per
    sample of section 2, every other firing at the early-exit cost), against the CPU the bench
    used in that run."""
    ncpu = os.cpu_count() or 1
    firings = run["hz"] * ncpu * run["seconds"]
    samples = run["samples"] + run.get("lost", 0)
    bpf_s = (samples * bpf["shallow"]["per_target_us"] + max(0, firings - samples) * bpf["idle"]["mean_us"]) / 1e6
    extra = run["cpu_agent_s"] + bpf_s
    total = run["cpu_share"] * ncpu * run["seconds"]
    return (total - extra) / total, bpf_s
