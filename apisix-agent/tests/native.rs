//! Root tests: native (C) stacks of real processes without frame pointers, and the
//! command's error paths.

mod common;

use std::{process::Command, time::Duration};

use common::{Lj, Load, Nginx, Recorded, compile_c, in_order, record};

/// A leaf that burns CPU, shared by the test programs.
const LEAF_C: &str = r#"
#include <stdint.h>
#include <stdlib.h>
volatile uint64_t sink;
__attribute__((noinline)) uint64_t leaf(uint64_t n) {
    uint64_t x = n;
    for (uint64_t i = 0; i < 2000000; i++) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    return x;
}
"#;

/// A test program: the leaf, then `body`.
fn program(body: &str) -> String {
    format!("{LEAF_C}{body}")
}

/// `main;outer;middle;leaf`.
const HOT_C: &str = r#"
__attribute__((noinline)) uint64_t middle(uint64_t n) { uint64_t r = leaf(n) ^ n; sink += r; return r; }
__attribute__((noinline)) uint64_t outer(uint64_t n) { uint64_t r = middle(n + 1); sink += r; return r + 1; }
int main(int argc, char **argv) {
    long iters = argc > 1 ? atol(argv[1]) : -1;
    for (uint64_t i = 0; iters < 0 || (long)i < iters; i++) sink += outer(i);
    return 0;
}
"#;

/// Compiles `body` without frame pointers, starts it (`setup` adjusts the command), records
/// it for 3 s at 99 Hz and asserts that at least 90% of the samples end with `chain`.
fn unwinds_to(
    name: &str,
    body: &str,
    setup: impl FnOnce(&mut Command),
    chain: &[&str],
) -> Recorded {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = compile_c(
        dir.path(),
        name,
        &program(body),
        &["-O2", "-fomit-frame-pointer"],
    );
    let mut cmd = Command::new(&bin);
    setup(&mut cmd);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
    let rec = record(child.id(), 3, &["--frequency", "99"]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(rec.status.success(), "record failed: {}", rec.dump());
    let total = rec.total();
    // 99 Hz for 3 s of one busy thread.
    assert!(total >= 200, "too few samples ({total}): {}", rec.dump());
    let good = rec.count(|f| f.ends_with(chain));
    assert!(
        good * 100 >= total * 90,
        "only {good}/{total} samples fold to …{}\n{}",
        chain.join(";"),
        rec.dump()
    );
    rec
}

#[test]
#[ignore = "needs root"]
fn c_program_without_frame_pointers_unwinds_fully() {
    common::require_root!();
    let rec = unwinds_to("hot", HOT_C, |_| {}, &["main", "outer", "middle", "leaf"]);
    assert!(rec.counter(&["samples"]) > 0, "{}", rec.dump());
}

/// The hot loop below a frame of 9 000 bytes: the main thread's live stack is 9–10 KiB and
/// its mapping ends within 16 KiB of the leaf, so only a copy sized to the stack's top gets
/// it whole (probing power-of-two sizes gets 8 KiB and loses `main`).
const DEEP_MAIN_C: &str = r#"
__attribute__((noinline)) uint64_t padded(uint64_t n) {
    volatile char buf[9000];
    for (unsigned i = 0; i < sizeof buf; i += 512) buf[i] = (char)n;  /* every page touched */
    buf[sizeof buf - 1] = (char)n;
    uint64_t r = leaf(n) ^ buf[0] ^ buf[sizeof buf - 1];
    sink += r;
    return r;
}
int main(void) {
    for (uint64_t i = 0;; i++) sink += padded(i);
}
"#;

#[test]
#[ignore = "needs root"]
fn main_thread_with_a_deep_stack_unwinds_to_main() {
    common::require_root!();
    // A small environment: the arguments and environment above the frames stay small.
    let small_env = |cmd: &mut Command| {
        cmd.env_clear().env("PATH", "/usr/bin:/bin");
    };
    unwinds_to(
        "deepmain",
        DEEP_MAIN_C,
        small_env,
        &["main", "padded", "leaf"],
    );
}

#[test]
#[ignore = "needs root"]
fn stripped_nginx_worker_unwinds_through_static_functions() {
    common::require_root!();
    let nginx = Nginx::start(
        Lj::Gc64,
        &[],
        "",
        r#"location /spin { content_by_lua_block {
            local x = 0
            for i = 1, 200000 do x = (x * 7 + i) % 1000003 end
            ngx.say(x)
        } }"#,
    );
    let worker = nginx.worker().expect("worker pid");
    let _load = Load::start(nginx.port, "/spin", 2, Duration::from_secs(20));
    let rec = record(worker, 4, &[]);
    assert!(rec.status.success(), "record failed: {}", rec.dump());
    let total = rec.total();
    assert!(total >= 100, "too few samples ({total}): {}", rec.dump());
    let chain = [
        "main",
        "ngx_master_process_cycle",
        "ngx_spawn_process",
        "ngx_process_events_and_timers",
    ];
    let good = rec.count(|f| in_order(f, &chain));
    assert!(
        good * 100 >= total * 80,
        "only {good}/{total} samples contain {chain:?} in order\n{}",
        rec.dump()
    );
    // Static functions between them are unwound through and named by offset.
    let through_static = rec.count(|f| {
        f.windows(3).any(|w| {
            w[0] == "ngx_spawn_process"
                && w[1].starts_with("nginx+0x")
                && w[2] == "ngx_process_events_and_timers"
        })
    });
    assert!(
        through_static * 100 >= total * 80,
        "static ngx_worker_process_cycle not shown as nginx+0x… ({through_static}/{total})\n{}",
        rec.dump()
    );
}

#[test]
#[ignore = "needs root"]
fn unknown_pid_is_a_clear_error() {
    common::require_root!();
    let rec = record(999_999_999, 1, &[]);
    assert!(!rec.status.success());
    assert!(
        rec.stderr.contains("no process with pid 999999999"),
        "{}",
        rec.stderr
    );
}

#[test]
fn bad_arguments_are_rejected() {
    let out = Command::new(common::agent())
        .args(["record", "--pid", "1", "--frequency", "0"])
        .output()
        .expect("run agent");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--frequency"));
    let out = Command::new(common::agent())
        .args(["record", "--pid", "notanumber"])
        .output()
        .expect("run agent");
    assert!(!out.status.success());
}

#[test]
#[ignore = "needs root"]
fn missing_privilege_is_a_clear_error() {
    common::require_root!();
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = compile_c(dir.path(), "hot", &program(HOT_C), &["-O2"]);
    let mut child = Command::new(&bin).spawn().expect("start hot");
    // Drop to nobody with no capabilities.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(common::agent())
        .args([
            "record",
            "--pid",
            &child.id().to_string(),
            "--duration",
            "1",
        ])
        .output()
        .expect("run setpriv (util-linux)");
    let _ = child.kill();
    let _ = child.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "unprivileged record succeeded: {stderr}"
    );
    assert!(
        stderr.contains("permission denied") && stderr.contains("CAP_BPF"),
        "unclear error: {stderr}"
    );
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error:")).count(),
        1
    );
}

#[test]
#[ignore = "needs root"]
fn target_exiting_mid_recording_keeps_its_samples() {
    common::require_root!();
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = compile_c(
        dir.path(),
        "hot",
        &program(HOT_C),
        &["-O2", "-fomit-frame-pointer"],
    );
    // About one to two seconds of work, then exit.
    let mut child = Command::new(&bin).arg("400").spawn().expect("start hot");
    let started = std::time::Instant::now();
    let rec = record(child.id(), 20, &[]);
    let _ = child.wait();
    assert!(rec.status.success(), "record failed: {}", rec.dump());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "record did not stop when the target exited"
    );
    assert_eq!(rec.summary["exited"], true, "{}", rec.dump());
    assert!(
        rec.count(|f| f.ends_with(&["main", "outer", "middle", "leaf"])) > 20,
        "samples before the exit were lost: {}",
        rec.dump()
    );
}
