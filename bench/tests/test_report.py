"""Renders BENCHMARKS.md from a fixed set of made-up results, without running anything: the
report's templates and tables must fill in (python3 -m unittest discover bench/tests)."""

import os
import sys
import types
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from overheadlib.report import report  # noqa: E402
from overheadlib.sections import merge_report  # noqa: E402


def run(rps, p99, cpu_share=0.95):
    return {
        "rps": rps, "p99_ms": p99, "cpu_per_req_us": 410.0, "cpu_share": cpu_share,
        "agent_cpu_pct": 0.4, "samples": 2400, "lost": 0, "learn_s": 2.5, "agent_blocked": 0.01,
        "agent_blocked_in": "", "hz": 19, "seconds": 6, "cpu_agent_s": 0.02,
    }


def results():
    offs = [run(4800 + 10 * i, 4.1) for i in range(4)]
    pairs = [
        {"tput_ratio": 0.99, "p99_ratio": 1.01, "capacity_ratio": 0.995, "with": run(4790, 4.2),
         "without": run(4805, 4.1), "offs": (offs[i], offs[i + 1])}
        for i in range(3)
    ]
    case = {"lua_frames": (12, 30), "runs": 90000, "target_samples": 2500, "mean_us": 0.8,
            "per_target_us": 6.5, "per_target_upper_us": 7.0}
    phase = {"seconds": 20, "cpu_pct": 0.3, "hwm_mib": 30.5, "rss_mib": 28.0}
    return {
        "tput_19": pairs, "offs_19": offs, "tput_99": pairs, "offs_99": offs,
        "bpf": {"idle": {"mean_us": 0.2, "runs": 4000}, "shallow": case, "deep50": case, "deep": case,
                "per_frame_us": 0.05, "fixed_us": 3.0},
        "footprint": {"workers": 4, "learn_s": 2.0, "idle": phase,
                      "load": dict(phase, samples=9000, blocked=0.02),
                      "flamegraph": dict(phase, answer_s=10.4, svg_kib=800)},
        "render": {"capture_samples": 3900, "capture_lost": 0, "capture_stacks": 700, "samples": 100000,
                   "stacks": 3000, "max_depth": 140, "wall_ms": [180.0, 190.0], "internal_ms": [150.0, 160.0],
                   "svg_kib": 4000},
    }


ARGS = types.SimpleNamespace(quick=False, wrk_threads=2, wrk_conns=16, duration=6, workers=2, nice=-10,
                             pairs=3, bpf_seconds=15, fg_seconds=10, record=20)
META = {"date": "2026-11-29 12:00 UTC", "runtime_s": 660, "kernel": "6.18", "cpu": "vCPU", "ncpu": 2,
        "mem_gib": 24.0, "load_start": ["0.1", "0.2", "0.3"], "load_end": ["1.0", "0.9", "0.8"],
        "rev": "abc1234", "nginx": "nginx 1.22"}


class ReportTest(unittest.TestCase):
    def test_every_section_renders(self):
        text = report(ARGS, META, results())
        for heading in ("# apisix-agent overhead benchmarks", "## 1. Throughput", "## 2. Cost of the",
                        "## 3. Agent footprint", "## 4. SVG render time"):
            self.assertIn(heading, text)
        self.assertNotIn("$", text.replace("$ ", ""), "a template placeholder was left unfilled")
        self.assertIn("| 19 Hz (default) | 4815 |", text)

    def test_sections_from_5_on_are_kept(self):
        new = report(ARGS, META, results())
        old = ("# old header\n\n## 1. Throughput old\n\nold figures\n\n"
               "## 5. JIT trace frames\n\nkept 5\n\n## 8. Soak\n\n<!-- soak:begin -->\nkept 8\n")
        merged = merge_report(old, new)
        self.assertTrue(merged.startswith(new.rstrip("\n")))
        self.assertTrue(merged.endswith(old[old.index("## 5."):]))
        self.assertNotIn("old figures", merged)
        self.assertEqual(merge_report(merged, new), merged)
        self.assertEqual(merge_report("", new), new)


if __name__ == "__main__":
    unittest.main()
