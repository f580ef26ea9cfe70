//! Credentials of the HTTP endpoint, the way Prometheus exporter-toolkit's web configuration
//! has them, so a Prometheus scrape config's `basic_auth` or `authorization` just works:
//! - `http.basic_auth_users`: user name → bcrypt hash. A password is checked with bcrypt
//!   (constant-time comparison of the digests; an unknown user is checked against a dummy
//!   hash of the same cost, so both take as long). At most [`BCRYPT_AT_ONCE`] checks run at
//!   once, on blocking threads; at most [`BCRYPT_QUEUE`] requests wait for one, each for at
//!   most [`BCRYPT_WAIT`]; past either the request is answered 503 with `Retry-After: 1`
//!   (reason `bcrypt_busy`), so wrong passwords cannot queue up and hold connections. A password once verified for a user is remembered as a keyed
//!   SHA-256 digest (compared in constant time), so a scrape every few seconds costs one
//!   bcrypt per process lifetime, not one per scrape.
//! - `http.bearer_token_file`: `Authorization: Bearer TOKEN`; the file is read at start
//!   (whitespace around the token is dropped), again on SIGHUP, when it changes, or at
//!   each check after a failed reload ([`Auth::reload`], every 5 s); tokens are compared as
//!   SHA-256 digests in constant time. A reload that fails (the file removed, emptied or
//!   unreadable) revokes the token until the file holds one again: deleting the file is a
//!   way to revoke it (fail closed).
//!
//! [`require`] is the axum middleware: a request with valid credentials carries its
//! [`Caller`] (for `http.capture_users`); a request without valid credentials gets 401 with
//! `WWW-Authenticate` (`Basic realm="apisix-agent"` and/or `Bearer realm="apisix-agent"`);
//! `/healthz` passes without credentials when `http.healthz_without_auth` (liveness probes).
//!
//! Hooks: reads the bearer token file. Metrics: `apisix_profiler_http_auth_failures_total`
//! {reason} ([`Failure::name`]),
//! `apisix_profiler_http_file_reloads_total{file="bearer_token", result="ok"|"failed"}`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use axum::{
    Json,
    extract::{ConnectInfo, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq as _;

use super::{
    listener::Every,
    metrics::{HttpReasonLabels, LabelValue, Metrics},
    tls::{FileStamp, Watched},
};
use crate::config;

/// bcrypt checks running at once; more wait (each takes tens of milliseconds of CPU).
pub const BCRYPT_AT_ONCE: usize = 2;
/// Requests waiting for a bcrypt check at most; one more is answered 503 at once.
pub const BCRYPT_QUEUE: usize = 16;
/// Longest wait for a bcrypt check; then the request is answered 503.
pub const BCRYPT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No `Authorization` header.
    Missing,
    /// A scheme that is not configured (e.g. `Bearer` with only basic auth users).
    UnsupportedScheme,
    /// Not decodable (bad base64, no `:`, not UTF-8).
    Malformed,
    /// Basic auth with a user not in `http.basic_auth_users`.
    UnknownUser,
    /// Basic auth with a known user and the wrong password.
    WrongPassword,
    /// A bearer token that is not the one in `http.bearer_token_file` (or none, revoked).
    WrongToken,
    /// Not checked: [`BCRYPT_QUEUE`] requests wait for a bcrypt check already, or this one
    /// waited [`BCRYPT_WAIT`] (answered 503 with `Retry-After`, not 401).
    Busy,
}

impl Failure {
    pub const ALL: [Self; 7] = [
        Self::Missing,
        Self::UnsupportedScheme,
        Self::Malformed,
        Self::UnknownUser,
        Self::WrongPassword,
        Self::WrongToken,
        Self::Busy,
    ];

    /// The `reason` label.
    pub fn name(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::UnsupportedScheme => "unsupported_scheme",
            Self::Malformed => "malformed",
            Self::UnknownUser => "unknown_user",
            Self::WrongPassword => "wrong_password",
            Self::WrongToken => "wrong_token",
            Self::Busy => "bcrypt_busy",
        }
    }
}

/// Errors of loading the credentials; each names the configuration field.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The bearer token file could not be read.
    #[error("http.bearer_token_file: reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The bearer token file holds no token.
    #[error("http.bearer_token_file: {path}: the file holds no token")]
    EmptyToken { path: String },
    /// A hash is not a bcrypt hash (normally caught by the configuration's validation).
    #[error("http.basic_auth_users.{user}: not a bcrypt hash")]
    Hash {
        user: String,
        #[source]
        source: bcrypt::BcryptError,
    },
    /// No random key for the verified-password digests.
    #[error("reading random bytes")]
    Random(#[source] getrandom::Error),
}

/// One basic auth user.
#[derive(Debug)]
struct User {
    hash: String,
    /// Keyed digest of the password last verified with bcrypt.
    verified: Mutex<Option<[u8; 32]>>,
}

/// The bearer token, reloadable.
#[derive(Debug)]
struct Token {
    path: PathBuf,
    /// `None` once revoked: the file was removed, emptied or unreadable at a reload.
    digest: RwLock<Option<[u8; 32]>>,
    watched: Watched<Option<FileStamp>>,
}

/// The endpoint's credentials.
#[derive(Debug)]
pub struct Auth {
    users: BTreeMap<String, User>,
    /// Checked for unknown users, so they take as long as known ones.
    dummy_hash: String,
    token: Option<Token>,
    /// Key of the verified-password digests (random per process).
    key: [u8; 32],
    healthz_open: bool,
    challenges: Vec<HeaderValue>,
    /// Held by the blocking bcrypt task itself, so a client that hangs up mid-check does not
    /// free its slot while bcrypt still runs.
    bcrypt_slots: Arc<tokio::sync::Semaphore>,
    /// Requests waiting for a bcrypt slot or running bcrypt now.
    bcrypt_queued: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    /// Failures since the last warning.
    unreported: AtomicU64,
    warnings: Every,
}

/// The outcome of checking one request.
type Checked = Result<(), Failure>;

/// Who a request with valid credentials came from, in its extensions: the basic auth user,
/// or `None` for the bearer token. Handlers read it for permissions beyond reading
/// (`http.capture_users`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub Option<String>);

/// The user name of a basic `Authorization` header (not checked).
fn basic_user(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    String::from_utf8(decoded[..colon].to_vec()).ok()
}

impl Auth {
    /// The credentials of `http`; `None` when neither basic auth users nor a bearer token
    /// file are configured.
    pub fn load(
        http: &config::Http,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Arc<Self>>, AuthError> {
        if !http.auth_enabled() {
            return Ok(None);
        }
        let mut users = BTreeMap::new();
        // The users' highest cost: an unknown user takes as long as the slowest known one
        // (not longer, which would tell them apart as well).
        let mut cost = 0;
        for (name, hash) in &http.basic_auth_users {
            let parts = hash
                .parse::<bcrypt::HashParts>()
                .map_err(|source| AuthError::Hash {
                    user: name.clone(),
                    source,
                })?;
            cost = cost.max(parts.get_cost());
            users.insert(
                name.clone(),
                User {
                    hash: hash.clone(),
                    verified: Mutex::new(None),
                },
            );
        }
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(AuthError::Random)?;
        // A hash of a random password nobody knows, at the users' highest cost.
        let dummy_hash = if users.is_empty() {
            String::new()
        } else {
            let mut junk = [0u8; 16];
            getrandom::fill(&mut junk).map_err(AuthError::Random)?;
            bcrypt::hash(junk, cost).map_err(|source| AuthError::Hash {
                user: "(dummy)".to_owned(),
                source,
            })?
        };
        let token = if http.bearer_token_file.is_empty() {
            None
        } else {
            let path = PathBuf::from(&http.bearer_token_file);
            let seen = FileStamp::of(&path);
            let digest = read_token(&path)?;
            Some(Token {
                path,
                digest: RwLock::new(Some(digest)),
                watched: Watched::new("bearer_token", "bearer token", "token", seen)
                    .failing_closed(),
            })
        };
        let mut challenges = Vec::new();
        if !users.is_empty() {
            challenges.push(HeaderValue::from_static(
                "Basic realm=\"apisix-agent\", charset=\"UTF-8\"",
            ));
        }
        if token.is_some() {
            challenges.push(HeaderValue::from_static("Bearer realm=\"apisix-agent\""));
        }
        for f in Failure::ALL {
            // Every reason exists from the start, so rate() sees the first failure.
            let _ = metrics.http.auth_failures.get_or_create(&HttpReasonLabels {
                reason: LabelValue::fixed(f.name()),
            });
        }
        Ok(Some(Arc::new(Self {
            users,
            dummy_hash,
            token,
            key,
            healthz_open: http.healthz_without_auth,
            challenges,
            bcrypt_slots: Arc::new(tokio::sync::Semaphore::new(BCRYPT_AT_ONCE)),
            bcrypt_queued: Arc::new(AtomicUsize::new(0)),
            metrics,
            unreported: AtomicU64::new(0),
            warnings: Every::new(),
        })))
    }

    /// Checks the `Authorization` header of a request.
    pub async fn check(&self, headers: &HeaderMap) -> Checked {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(Failure::Missing);
        };
        let value = value.to_str().map_err(|_| Failure::Malformed)?.trim();
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("basic") && !self.users.is_empty() {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .map_err(|_| Failure::Malformed)?;
            let colon = decoded
                .iter()
                .position(|b| *b == b':')
                .ok_or(Failure::Malformed)?;
            let (user, password) = (&decoded[..colon], &decoded[colon + 1..]);
            let user = std::str::from_utf8(user).map_err(|_| Failure::Malformed)?;
            self.check_password(user, password).await
        } else if scheme.eq_ignore_ascii_case("bearer")
            && let Some(token) = &self.token
        {
            let given: [u8; 32] = Sha256::digest(rest.as_bytes()).into();
            let want = match token.digest.read() {
                Ok(d) => *d,
                Err(poisoned) => *poisoned.into_inner(),
            };
            // Revoked: no token is valid until the file holds one again.
            if let Some(want) = want
                && bool::from(given.ct_eq(&want))
            {
                Ok(())
            } else {
                Err(Failure::WrongToken)
            }
        } else {
            Err(Failure::UnsupportedScheme)
        }
    }

    async fn check_password(&self, user: &str, password: &[u8]) -> Checked {
        let known = self.users.get(user);
        let digest = self.digest(user, password);
        if let Some(u) = known
            && let Ok(verified) = u.verified.lock()
            && let Some(v) = *verified
            && bool::from(v.ct_eq(&digest))
        {
            return Ok(());
        }
        let hash = known.map_or_else(|| self.dummy_hash.clone(), |u| u.hash.clone());
        let password = password.to_vec();
        let queued = Queued::join(&self.bcrypt_queued).ok_or(Failure::Busy)?;
        let slot = tokio::time::timeout(BCRYPT_WAIT, self.bcrypt_slots.clone().acquire_owned())
            .await
            .map_err(|_| Failure::Busy)?;
        let good = match slot {
            // The slot and the queue place move into the blocking task: they are freed when
            // bcrypt ends, not when this future is dropped (a client hanging up).
            Ok(slot) => tokio::task::spawn_blocking(move || {
                let good = bcrypt::verify(password, &hash).unwrap_or(false);
                drop(slot);
                drop(queued);
                good
            })
            .await
            .unwrap_or(false),
            Err(_) => false,
        };
        match known {
            None => Err(Failure::UnknownUser),
            Some(_) if !good => Err(Failure::WrongPassword),
            Some(u) => {
                if let Ok(mut verified) = u.verified.lock() {
                    *verified = Some(digest);
                }
                Ok(())
            }
        }
    }

    /// SHA-256 over the process key, the user and the password.
    fn digest(&self, user: &str, password: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.key);
        h.update(user.as_bytes());
        h.update([0]);
        h.update(password);
        h.finalize().into()
    }

    /// Reads the bearer token file again when `force` (SIGHUP), when it changed since it
    /// was last read successfully, or when the last reload failed; a failure (the file
    /// removed, emptied or unreadable) revokes the token: fail closed. Returns whether the
    /// file was read.
    pub fn reload(&self, force: bool) -> bool {
        let Some(token) = &self.token else {
            return false;
        };
        token.watched.reload(
            force,
            FileStamp::of(&token.path),
            &token.path,
            &self.metrics,
            || {
                let read = read_token(&token.path);
                if read.is_err()
                    && let Ok(mut d) = token.digest.write()
                {
                    *d = None;
                }
                read
            },
            |digest| {
                if let Ok(mut d) = token.digest.write() {
                    *d = Some(digest);
                }
            },
        )
    }

    /// Counts a failure; logs a warning at most once a minute.
    fn refused(&self, failure: Failure, peer: Option<SocketAddr>, path: &str) {
        self.metrics
            .http
            .auth_failures
            .get_or_create(&HttpReasonLabels {
                reason: LabelValue::fixed(failure.name()),
            })
            .inc();
        let unreported = self.unreported.fetch_add(1, Ordering::Relaxed) + 1;
        if self.warnings.due() {
            self.unreported.store(0, Ordering::Relaxed);
            tracing::warn!(
                reason = failure.name(),
                peer = %peer.map_or_else(|| "?".to_owned(), |p| p.to_string()),
                path,
                refused_since_last_warning = unreported,
                "HTTP request refused for missing or wrong credentials \
                 (apisix_profiler_http_auth_failures_total; warned at most once a minute)"
            );
        } else {
            tracing::debug!(
                reason = failure.name(),
                path,
                "HTTP request refused for missing or wrong credentials"
            );
        }
    }

    fn busy() -> Response {
        let mut response = (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "error": "too many password checks waiting; retry in a moment"
            })),
        )
            .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        response
    }

    fn unauthorized(&self) -> Response {
        let mut response = (
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({ "error": "authentication required" })),
        )
            .into_response();
        for c in &self.challenges {
            response
                .headers_mut()
                .append(header::WWW_AUTHENTICATE, c.clone());
        }
        response
    }
}

/// Longest bearer token file read; the bytes after are ignored (and make the token wrong).
const MAX_TOKEN_FILE_BYTES: u64 = 4096;

/// A place in the bcrypt queue, freed on drop.
struct Queued(Arc<AtomicUsize>);

impl Queued {
    /// A place, or `None` when [`BCRYPT_QUEUE`] are taken.
    fn join(queue: &Arc<AtomicUsize>) -> Option<Self> {
        queue
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < BCRYPT_QUEUE).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(queue.clone()))
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The token in `path`, as a digest.
fn read_token(path: &std::path::Path) -> Result<[u8; 32], AuthError> {
    use std::io::Read as _;
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TOKEN_FILE_BYTES).read_to_end(&mut text))
        .map_err(|source| AuthError::Read {
            path: path.display().to_string(),
            source,
        })?;
    let token = text.trim_ascii();
    if token.is_empty() {
        return Err(AuthError::EmptyToken {
            path: path.display().to_string(),
        });
    }
    Ok(Sha256::digest(token).into())
}

/// The middleware: lets a request with valid credentials (or `/healthz`, when open) through,
/// answers 401 to the others.
pub async fn require(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    if auth.healthz_open && req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    match auth.check(req.headers()).await {
        Ok(()) => {
            let user = basic_user(req.headers()).filter(|_| !auth.users.is_empty());
            req.extensions_mut().insert(Caller(user));
            next.run(req).await
        }
        Err(failure) => {
            let peer = req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0);
            auth.refused(failure, peer, req.uri().path());
            if failure == Failure::Busy {
                Auth::busy()
            } else {
                auth.unauthorized()
            }
        }
    }
}

/// Longest password bcrypt uses whole; it silently ignores the bytes after.
pub const MAX_PASSWORD_BYTES: usize = 72;

/// Errors of `apisix-agent hash-password`.
#[derive(Debug, thiserror::Error)]
pub enum HashPasswordError {
    #[error("reading the password")]
    Read(#[source] std::io::Error),
    #[error("no password on standard input")]
    Empty,
    #[error(
        "the password is {0} bytes long: bcrypt uses only the first {MAX_PASSWORD_BYTES}, so \
         longer ones are refused"
    )]
    TooLong(usize),
    #[error("--cost {0} is outside {min}..={max}", min = config::BCRYPT_COSTS.start(),
        max = config::BCRYPT_COSTS.end())]
    Cost(u32),
    #[error("hashing")]
    Hash(#[source] bcrypt::BcryptError),
}

/// The bcrypt hash of `password` at `cost`, for `http.basic_auth_users`.
pub fn hash_password(password: &[u8], cost: u32) -> Result<String, HashPasswordError> {
    if password.is_empty() {
        return Err(HashPasswordError::Empty);
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(HashPasswordError::TooLong(password.len()));
    }
    if !config::BCRYPT_COSTS.contains(&cost) {
        return Err(HashPasswordError::Cost(cost));
    }
    bcrypt::hash(password, cost).map_err(HashPasswordError::Hash)
}

/// `apisix-agent hash-password`: the bcrypt hash of the first line of `input` (without its
/// `\n` or `\r\n`).
pub fn hash_password_line(
    mut input: impl std::io::BufRead,
    cost: u32,
) -> Result<String, HashPasswordError> {
    let mut line = Vec::new();
    input
        .read_until(b'\n', &mut line)
        .map_err(HashPasswordError::Read)?;
    let password = line.strip_suffix(b"\n").unwrap_or(&line);
    let password = password.strip_suffix(b"\r").unwrap_or(password);
    hash_password(password, cost)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::error_chain;

    /// Cost 4, the lowest bcrypt allows, keeps the tests fast.
    fn auth(users: &[(&str, &str)], token: Option<&std::path::Path>) -> Arc<Auth> {
        let mut http = config::Http::default();
        for (user, password) in users {
            let hash = match hash_password(password.as_bytes(), 4) {
                Ok(h) => h,
                Err(e) => panic!("{e}"),
            };
            http.basic_auth_users.insert((*user).to_owned(), hash);
        }
        if let Some(t) = token {
            http.bearer_token_file = t.display().to_string();
        }
        match Auth::load(&http, Arc::default()) {
            Ok(Some(a)) => a,
            Ok(None) => panic!("no auth"),
            Err(e) => panic!("{}", error_chain(&e)),
        }
    }

    fn headers(authorization: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = authorization {
            h.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(a).expect("header value"),
            );
        }
        h
    }

    fn basic(user: &str, password: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
    }

    fn check(auth: &Auth, authorization: Option<&str>) -> Checked {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(auth.check(&headers(authorization)))
    }

    #[test]
    fn the_bcrypt_queue_is_bounded() {
        // Cost 10: tens of milliseconds each, so the checks pile up.
        let mut http = config::Http::default();
        let hash = bcrypt::hash("right", 10).expect("hash");
        http.basic_auth_users.insert("prom".to_owned(), hash);
        let a = match Auth::load(&http, Arc::default()) {
            Ok(Some(a)) => a,
            _ => panic!("no auth"),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .expect("runtime");
        let outcomes = rt.block_on(async {
            let wrong = headers(Some(&basic("prom", "wrong")));
            let checks: Vec<_> = (0..64)
                .map(|_| {
                    let (a, h) = (a.clone(), wrong.clone());
                    tokio::spawn(async move { a.check(&h).await })
                })
                .collect();
            let mut out = Vec::new();
            for c in checks {
                out.push(c.await.expect("join"));
            }
            out
        });
        let busy = outcomes
            .iter()
            .filter(|o| **o == Err(Failure::Busy))
            .count();
        let wrong = outcomes
            .iter()
            .filter(|o| **o == Err(Failure::WrongPassword))
            .count();
        assert!(busy >= 64 - BCRYPT_QUEUE, "{busy} busy of 64");
        assert_eq!(busy + wrong, 64);
        // Once the queue drained, the right password passes.
        assert_eq!(check(&a, Some(&basic("prom", "right"))), Ok(()));
    }

    #[test]
    fn no_credentials_configured_is_none() {
        assert!(matches!(
            Auth::load(&config::Http::default(), Arc::default()),
            Ok(None)
        ));
    }

    #[test]
    fn basic_auth_outcomes() {
        let a = auth(&[("prom", "s3cret: with colon"), ("other", "x")], None);
        assert_eq!(
            check(&a, Some(&basic("prom", "s3cret: with colon"))),
            Ok(())
        );
        // Verified once, then remembered: still right, and a wrong one still wrong.
        assert_eq!(
            check(&a, Some(&basic("prom", "s3cret: with colon"))),
            Ok(())
        );
        assert_eq!(
            check(&a, Some(&basic("prom", "s3cret"))),
            Err(Failure::WrongPassword)
        );
        assert_eq!(
            check(&a, Some(&basic("other", "s3cret: with colon"))),
            Err(Failure::WrongPassword),
            "another user's password"
        );
        assert_eq!(
            check(&a, Some(&basic("nobody", "x"))),
            Err(Failure::UnknownUser)
        );
        assert_eq!(check(&a, None), Err(Failure::Missing));
        assert_eq!(check(&a, Some("Basic !!!")), Err(Failure::Malformed));
        let no_colon = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("promx")
        );
        assert_eq!(check(&a, Some(&no_colon)), Err(Failure::Malformed));
        assert_eq!(
            check(&a, Some("Bearer abc")),
            Err(Failure::UnsupportedScheme),
            "no token configured"
        );
        // The scheme is case-insensitive.
        let lower = basic("other", "x").replacen("Basic", "basic", 1);
        assert_eq!(check(&a, Some(&lower)), Ok(()));
    }

    #[test]
    fn bearer_token_and_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        std::fs::write(&file, "  tok-1\n").expect("write");
        let a = auth(&[], Some(&file));
        assert_eq!(check(&a, Some("Bearer tok-1")), Ok(()));
        assert_eq!(check(&a, Some("Bearer tok-2")), Err(Failure::WrongToken));
        assert_eq!(check(&a, Some("Bearer ")), Err(Failure::WrongToken));
        assert_eq!(
            check(&a, Some(&basic("a", "b"))),
            Err(Failure::UnsupportedScheme)
        );
        assert!(!a.reload(false), "unchanged file: not read again");
        std::fs::write(&file, "tok-2-longer\n").expect("write");
        assert!(a.reload(false), "changed file: read again");
        assert_eq!(check(&a, Some("Bearer tok-2-longer")), Ok(()));
        assert_eq!(check(&a, Some("Bearer tok-1")), Err(Failure::WrongToken));
        // A reload that fails revokes the token (fail closed), and is tried again at the next
        // check although the file did not change.
        std::fs::write(&file, "\n").expect("write");
        assert!(a.reload(true));
        assert_eq!(
            check(&a, Some("Bearer tok-2-longer")),
            Err(Failure::WrongToken)
        );
        assert!(a.reload(false), "a failed reload is retried");
        std::fs::write(&file, "tok-2-longer\n").expect("write");
        assert!(a.reload(false));
        assert_eq!(check(&a, Some("Bearer tok-2-longer")), Ok(()));
        std::fs::remove_file(&file).expect("remove");
        assert!(a.reload(false), "a removed file is a change");
        assert_eq!(
            check(&a, Some("Bearer tok-2-longer")),
            Err(Failure::WrongToken),
            "a removed token file revokes the token"
        );
        std::fs::write(&file, "tok-3\n").expect("write");
        assert!(a.reload(false));
        assert_eq!(check(&a, Some("Bearer tok-3")), Ok(()));
        assert!(
            !a.reload(false),
            "read successfully: not again until it changes"
        );
    }

    #[test]
    fn token_file_errors_name_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut http = config::Http {
            bearer_token_file: dir.path().join("absent").display().to_string(),
            ..config::Http::default()
        };
        let e = match Auth::load(&http, Arc::default()) {
            Err(e) => error_chain(&e),
            Ok(_) => panic!("accepted a missing token file"),
        };
        assert!(e.starts_with("http.bearer_token_file: reading "), "{e}");
        std::fs::write(dir.path().join("empty"), " \n").expect("write");
        http.bearer_token_file = dir.path().join("empty").display().to_string();
        let e = match Auth::load(&http, Arc::default()) {
            Err(e) => error_chain(&e),
            Ok(_) => panic!("accepted an empty token file"),
        };
        assert!(e.contains("holds no token"), "{e}");
    }

    #[test]
    fn dummy_hash_has_the_users_highest_cost() {
        let a = auth(&[("a", "x"), ("b", "y")], None);
        let dummy = match a.dummy_hash.parse::<bcrypt::HashParts>() {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(dummy.get_cost(), 4, "the users' cost, not bcrypt's default");
        let mut http = config::Http::default();
        for (user, cost) in [("low", 4), ("high", 5)] {
            let hash = match hash_password(b"pw", cost) {
                Ok(h) => h,
                Err(e) => panic!("{e}"),
            };
            http.basic_auth_users.insert(user.to_owned(), hash);
        }
        let a = match Auth::load(&http, Arc::default()) {
            Ok(Some(a)) => a,
            _ => panic!("not loaded"),
        };
        assert!(matches!(a.dummy_hash.parse::<bcrypt::HashParts>(), Ok(p) if p.get_cost() == 5));
    }

    #[test]
    fn hash_password_reads_one_line() {
        let hash = |input: &[u8]| hash_password_line(std::io::Cursor::new(input.to_vec()), 4);
        let verifies = |input: &[u8], password: &[u8]| match hash(input) {
            Ok(h) => bcrypt::verify(password, &h).unwrap_or(false),
            Err(e) => panic!("{:?}: {}", String::from_utf8_lossy(input), error_chain(&e)),
        };
        assert!(verifies(b"pw\n", b"pw"));
        assert!(
            verifies(b"pw\r\n", b"pw"),
            "a CR LF line end is not part of it"
        );
        assert!(verifies(b"pw", b"pw"), "no line end");
        assert!(
            verifies(b" pw \nsecond line\n", b" pw "),
            "the first line, spaces kept"
        );
        assert!(!verifies(b"pw\n", b"pw\n"));
        let longest = [b'x'; MAX_PASSWORD_BYTES];
        assert!(verifies(&longest, &longest));
        assert!(matches!(hash(b"\n"), Err(HashPasswordError::Empty)));
        assert!(matches!(hash(b""), Err(HashPasswordError::Empty)));
        assert!(matches!(hash(b"\r\n"), Err(HashPasswordError::Empty)));
        let mut long = vec![b'x'; MAX_PASSWORD_BYTES + 1];
        long.push(b'\n');
        match hash(&long) {
            Err(e @ HashPasswordError::TooLong(73)) => {
                assert!(e.to_string().contains("73 bytes"), "{e}");
            }
            other => panic!("a 73-byte password: {other:?}"),
        }
        match hash_password_line(std::io::Cursor::new(b"pw\n".to_vec()), 3) {
            Err(e @ HashPasswordError::Cost(3)) => {
                assert_eq!(e.to_string(), "--cost 3 is outside 4..=31");
            }
            other => panic!("cost 3: {other:?}"),
        }
    }

    #[test]
    fn htpasswd_style_2y_hashes_verify() {
        // `htpasswd -nbBC 4 u pw` writes $2y$ hashes; exporter-toolkit accepts them too.
        let hash = match hash_password(b"pw", 4) {
            Ok(h) => h.replacen("$2b$", "$2y$", 1),
            Err(e) => panic!("{e}"),
        };
        let mut http = config::Http::default();
        http.basic_auth_users.insert("u".to_owned(), hash);
        let a = match Auth::load(&http, Arc::default()) {
            Ok(Some(a)) => a,
            _ => panic!("not loaded"),
        };
        assert_eq!(check(&a, Some(&basic("u", "pw"))), Ok(()));
    }
}
