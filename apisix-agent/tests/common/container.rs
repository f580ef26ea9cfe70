//! Real Docker containers for the root tests: the nginx-lua test image (built from Debian
//! packages by `scripts/test-image.sh`, run by the daemon `scripts/docker-up.sh` starts) on
//! the host network, serving one Lua module on a loopback port, removed on drop.

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use super::{free_port, get};

/// The test image: Debian's nginx + ngx_lua (GC64 LuaJIT).
pub const IMAGE: &str = "apisix-profiler-test/nginx-lua:bookworm";

/// Runs `docker ARGS` and returns its trimmed stdout; panics with its stderr on failure.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("docker {args:?}: {e} (run scripts/docker-up.sh)"));
    assert!(
        out.status.success(),
        "docker {args:?} failed: {} (scripts/docker-up.sh, scripts/test-image.sh)",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Panics unless a Docker daemon answers and the test image exists.
pub fn require_docker() {
    let info = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    match info {
        Ok(o) if o.status.success() => {}
        other => {
            panic!("these tests need a running Docker daemon (scripts/docker-up.sh): {other:?}")
        }
    }
    let images = docker(&["images", "-q", IMAGE]);
    assert!(
        !images.is_empty(),
        "test image {IMAGE} missing: run scripts/test-image.sh"
    );
}

/// An nginx-lua container on the host network, removed on drop.
pub struct Container {
    pub name: String,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Container {
    /// Starts a container named `NAME_PREFIX-<test pid>` whose one location answers
    /// `require(MODULE).CALL`, with `SRC` as `MODULE.lua`; returns once it serves.
    pub fn start(name_prefix: &str, module: &str, src: &str, call: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let port = free_port();
        std::fs::write(dir.path().join(format!("{module}.lua")), src).expect("lua");
        let conf = format!(
            r#"
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
worker_processes 1;
error_log stderr warn;
pid /tmp/nginx.pid;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path /tmp; proxy_temp_path /tmp; fastcgi_temp_path /tmp;
  uwsgi_temp_path /tmp; scgi_temp_path /tmp;
  lua_package_path "/app/?.lua;/usr/share/lua/5.1/?.lua;;";
  server {{
    listen 127.0.0.1:{port};
    location / {{ content_by_lua_block {{ ngx.say(require("{module}").{call}) }} }}
  }}
}}
"#
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).expect("conf");
        let name = format!("{name_prefix}-{}", std::process::id());
        let _ = Command::new("docker").args(["rm", "-f", &name]).output();
        let mount = format!("{}:/app:ro", dir.path().display());
        docker(&[
            "run",
            "-d",
            "--network",
            "host",
            "--name",
            &name,
            "-v",
            &mount,
            IMAGE,
            "nginx",
            "-c",
            "/app/nginx.conf",
            "-g",
            "daemon off;",
        ]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if get(port, "/").is_ok() {
                return Self {
                    name,
                    port,
                    _dir: dir,
                };
            }
            thread::sleep(Duration::from_millis(100));
        }
        let logs = Command::new("docker").args(["logs", &name]).output();
        panic!("container {name} did not serve on {port}: {logs:?}");
    }

    /// Stops the container (it stays until drop removes it).
    pub fn stop(&self) {
        docker(&["stop", "-t", "2", &self.name]);
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.name])
            .output();
    }
}
