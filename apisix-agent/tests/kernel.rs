//! Root tests: the verifier's figures for every BPF program, in both Lua walk variants,
//! within their budgets on the running kernel (combined stack ≤ 448 bytes with each frame
//! rounded as 6.1 rounds it, ≤ 50% of the instruction limit), read from the verifier's own
//! statistics by `check-kernel`. The kernel matrix (`scripts/kernel-matrix.sh`) runs the same
//! check on 5.10, 6.1 and 6.12 under QEMU.

mod common;

use std::process::Command;

/// `check-kernel --json` with `env`, and its parsed output.
fn check(env: &[(&str, &str)]) -> (std::process::ExitStatus, serde_json::Value, String) {
    let out = Command::new(common::agent())
        .args(["check-kernel", "--json"])
        .envs(env.iter().copied())
        .output()
        .expect("run apisix-agent check-kernel");
    let stdout = common::text(&out.stdout);
    let json = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("check-kernel printed bad JSON ({e}): {stdout}"));
    (out.status, json, common::text(&out.stderr))
}

fn assert_within_budgets(env: &[(&str, &str)], walk: &str, programs: &[&str]) {
    let (status, json, stderr) = check(env);
    assert_eq!(json["kernel"]["lua_walk"], walk, "{json:#}");
    let listed: Vec<&str> = json["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .filter_map(|p| p["program"].as_str())
        .collect();
    assert_eq!(listed, programs, "{json:#}");
    let mut failures = Vec::new();
    for p in json["programs"].as_array().expect("programs") {
        let name = p["program"].as_str().unwrap_or("?");
        if p["loaded"] != true && p["optional"] != true {
            failures.push(format!("{name} refused: {}", p["error"]));
        }
        for o in p["over_budget"].as_array().into_iter().flatten() {
            failures.push(format!("over budget: {}", o.as_str().unwrap_or("?")));
        }
        let v = &p["verifier"];
        eprintln!(
            "{name}: {} insns processed, combined stack {} ({})",
            v["insns_processed"], v["combined_stack"], v["stack_depths"]
        );
        if p["loaded"] == true {
            assert!(
                v["insns_processed"].as_u64().unwrap_or(0) > 0,
                "{name}: {v}"
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(status.success(), "check-kernel failed: {stderr}\n{json:#}");
}

/// The programs `check-kernel` lists, in its order, with the given variants of the CPU
/// sampler, the off-CPU exit and the allocator entry (this kernel's BTF has every epoll
/// function the event-loop pair's fentry/fexit programs hook).
fn programs(
    sample: &'static str,
    offcpu_exit: &'static str,
    alloc: &'static str,
) -> Vec<&'static str> {
    let event_loop = [
        "loop_in_wait",
        "loop_out_wait",
        "loop_in_pwait",
        "loop_out_pwait",
        "loop_in_pwait2",
        "loop_out_pwait2",
        "loop_wait_enter",
        "loop_wait_exit",
        "loop_enter",
        "loop_exit",
    ];
    let mut all = vec![sample, "offcpu_switch", offcpu_exit];
    all.extend(event_loop);
    all.extend([alloc, "alloc_return", "learn_vm"]);
    all
}

#[test]
#[ignore = "needs root"]
fn every_program_is_within_its_verifier_budgets() {
    common::require_root!();
    assert_within_budgets(
        &[],
        "bpf_loop",
        &programs("sample", "offcpu_exit", "alloc_entry"),
    );
}

#[test]
#[ignore = "needs root"]
fn the_bounded_walk_variants_are_within_their_verifier_budgets() {
    common::require_root!();
    assert_within_budgets(
        &[("APISIX_AGENT_LUA_WALK", "bounded")],
        "bounded",
        &programs(
            "sample_bounded",
            "offcpu_exit_bounded",
            "alloc_entry_bounded",
        ),
    );
}

#[test]
#[ignore = "needs root"]
fn the_kernels_btf_gives_the_offsets_the_programs_need() {
    common::require_root!();
    let (_, json, _) = check(&[]);
    let k = &json["kernel"];
    assert_eq!(k["btf"], true, "{json:#}");
    assert_eq!(k["kernel_mode_samples"], true, "{json:#}");
    assert_eq!(k["task_state"], true, "{json:#}");
}
