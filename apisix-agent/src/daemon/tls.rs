//! TLS of the HTTP endpoint (`http.tls`): rustls with the *ring* crypto provider (it builds
//! with the C compiler alone; aws-lc-rs would add cmake and a longer build), TLS 1.2 and 1.3,
//! ALPN `http/1.1`, and with `client_ca_file` mutual TLS: every client must present a
//! certificate that chains to one of those CAs.
//!
//! The files are read at start, where an unreadable or invalid one stops the start with its
//! field path (`http.tls.key_file: /etc/…/tls.key: does not match http.tls.cert_file`).
//! [`Tls::reload`] reads them again (on SIGHUP, or when their size, mtime or inode changed,
//! which also catches Kubernetes' symlink swaps of a mounted Secret) and swaps the server
//! configuration in place: the listener stays, open connections keep the configuration they
//! were accepted with, new ones get the new one. A reload that fails keeps the previous
//! files in use and says why in the log (once per distinct error); it is tried again at
//! each check until it succeeds, so a transient failure (a file not readable for a moment)
//! heals without the file changing.
//!
//! Hooks: reads the PEM files. Metrics:
//! `apisix_profiler_http_file_reloads_total{file="tls", result="ok"|"failed"}` (each attempt).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};

use super::metrics::{LabelValue, Metrics, ReloadLabels};
use crate::{config::HttpTls, error::error_chain};

/// Errors of reading the TLS files; each names the configuration field.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{field}: reading {path}")]
    Read {
        field: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A file holds no usable certificate or key, or they do not fit together.
    #[error("{field}: {path}: {message}")]
    Invalid {
        field: &'static str,
        path: String,
        message: String,
    },
}

/// Size, modification time and identity of a file: what a reload compares. `None`: the file
/// cannot be looked at (a reload then reports why).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileStamp {
    /// The stamp of `path`, following symlinks.
    pub fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// The files of `http.tls`.
#[derive(Debug, Clone)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

impl Files {
    fn stamps(&self) -> Vec<Option<FileStamp>> {
        let mut v = vec![FileStamp::of(&self.cert), FileStamp::of(&self.key)];
        if let Some(ca) = &self.client_ca {
            v.push(FileStamp::of(ca));
        }
        v
    }
}

/// The endpoint's TLS configuration, swapped in place by [`Tls::reload`].
#[derive(Debug)]
pub struct Tls {
    files: Files,
    current: RwLock<Arc<ServerConfig>>,
    watched: Watched<Vec<Option<FileStamp>>>,
    metrics: Arc<Metrics>,
}

impl Tls {
    /// Reads the files of `config`; `None` when TLS is not configured.
    pub fn load(config: &HttpTls, metrics: Arc<Metrics>) -> Result<Option<Arc<Self>>, TlsError> {
        if !config.enabled() {
            return Ok(None);
        }
        let files = Files {
            cert: PathBuf::from(&config.cert_file),
            key: PathBuf::from(&config.key_file),
            client_ca: (!config.client_ca_file.is_empty())
                .then(|| PathBuf::from(&config.client_ca_file)),
        };
        let seen = files.stamps();
        let server = build(&files)?;
        Ok(Some(Arc::new(Self {
            files,
            current: RwLock::new(Arc::new(server)),
            watched: Watched::new("tls", "TLS", "certificate", seen),
            metrics,
        })))
    }

    /// Client certificates are required.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The acceptor for the next connection, with the current configuration.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        tokio_rustls::TlsAcceptor::from(config)
    }

    /// Reads the files again when `force` (SIGHUP), when one changed since they were last
    /// read successfully, or when the last reload failed, and swaps the configuration in; a
    /// failure keeps the previous one. Returns whether the files were read.
    pub fn reload(&self, force: bool) -> bool {
        self.watched.reload(
            force,
            self.files.stamps(),
            &self.files.cert,
            &self.metrics,
            || build(&self.files),
            |server| {
                if let Ok(mut current) = self.current.write() {
                    *current = Arc::new(server);
                }
            },
        )
    }
}

/// The reload rule of a file or a set of files (the TLS files, the bearer token): what they
/// were (`S`, their stamps) when last read successfully, and the error of the last reload
/// while it keeps failing.
#[derive(Debug)]
pub struct Watched<S> {
    /// The `file` label of `apisix_profiler_http_file_reloads_total`.
    file: &'static str,
    /// What the files are for, and what they hold, for the log.
    what: &'static str,
    holds: &'static str,
    seen: Mutex<S>,
    failed: LastError,
    /// A failed reload revokes what was installed (the caller's `read` does it) instead of
    /// keeping it; said so in the log.
    fails_closed: bool,
}

impl<S: PartialEq> Watched<S> {
    /// Watching files just read successfully, stamped `seen`.
    pub fn new(file: &'static str, what: &'static str, holds: &'static str, seen: S) -> Self {
        Self {
            file,
            what,
            holds,
            seen: Mutex::new(seen),
            failed: LastError::default(),
            fails_closed: false,
        }
    }

    /// Says in the log that a failed reload revokes what was installed (the caller's `read`
    /// revokes it).
    pub fn failing_closed(mut self) -> Self {
        self.fails_closed = true;
        self
    }

    /// Reads again (`read`, then `install` swaps what it made in) when `force` (SIGHUP), when
    /// `now` differs from the stamps of the last successful read, or when the last reload
    /// failed; a failure keeps what is installed and is warned about once per distinct
    /// error. `now` is taken before the read, so a change during it is seen at the next
    /// check. Counts each attempt; returns whether the files were read.
    pub fn reload<T, E: std::error::Error>(
        &self,
        force: bool,
        now: S,
        path: &Path,
        metrics: &Metrics,
        read: impl FnOnce() -> Result<T, E>,
        install: impl FnOnce(T),
    ) -> bool {
        let unchanged = self.seen.lock().is_ok_and(|seen| *seen == now);
        if !force && unchanged && !self.failed.any() {
            return false;
        }
        let (what, holds) = (self.what, self.holds);
        let result = match read() {
            Ok(value) => {
                install(value);
                if let Ok(mut seen) = self.seen.lock() {
                    *seen = now;
                }
                self.failed.clear();
                tracing::info!(file = %path.display(), "{what} reloaded: the new {holds} in use");
                "ok"
            }
            Err(e) => {
                let error = error_chain(&e);
                let new = self.failed.is_new(&error);
                if new && self.fails_closed {
                    tracing::warn!(
                        error,
                        "{what} reload failed; the {holds} is revoked until the file holds one \
                         again (retried every check; warned once per distinct error)"
                    );
                } else if new {
                    tracing::warn!(
                        error,
                        "{what} reload failed; the previous {holds} stays in use (retried every \
                         check; warned once per distinct error)"
                    );
                } else {
                    tracing::debug!(error, "{what} reload failed again");
                }
                "failed"
            }
        };
        metrics
            .http
            .reloads
            .get_or_create(&ReloadLabels {
                file: LabelValue::fixed(self.file),
                result: LabelValue::fixed(result),
            })
            .inc();
        true
    }
}

/// The error of the last reload of a file, while it keeps failing: a file retried at every
/// check is warned about once per distinct error, not every few seconds.
#[derive(Debug, Default)]
pub struct LastError(Mutex<Option<String>>);

impl LastError {
    /// Remembers `error`; whether it differs from the one remembered (then warn).
    pub fn is_new(&self, error: &str) -> bool {
        let Ok(mut last) = self.0.lock() else {
            return true;
        };
        if last.as_deref() == Some(error) {
            return false;
        }
        *last = Some(error.to_owned());
        true
    }

    /// The last reload failed.
    pub fn any(&self) -> bool {
        self.0.lock().is_ok_and(|l| l.is_some())
    }

    /// A reload succeeded.
    pub fn clear(&self) {
        if let Ok(mut last) = self.0.lock() {
            *last = None;
        }
    }
}

/// The crypto provider: *ring*.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        field,
        path: path.display().to_string(),
        source,
    })
}

fn invalid(field: &'static str, path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        field,
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// The certificates of a PEM file (at least one).
fn certificates(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(field, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(field, path, format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(field, path, "no CERTIFICATE block in the file"));
    }
    Ok(certs)
}

/// Builds the server configuration from the files.
fn build(files: &Files) -> Result<ServerConfig, TlsError> {
    const CERT: &str = "http.tls.cert_file";
    const KEY: &str = "http.tls.key_file";
    const CA: &str = "http.tls.client_ca_file";
    let provider = provider();
    let certs = certificates(CERT, &files.cert)?;
    let key_pem = read(KEY, &files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        invalid(
            KEY,
            &files.key,
            format!("no private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block): {e}"),
        )
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(CERT, &files.cert, e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(CA, ca)? {
                roots
                    .add(cert)
                    .map_err(|e| invalid(CA, ca, format!("not a CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid(CA, ca, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder.with_single_cert(certs, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            invalid(KEY, &files.key, "does not match http.tls.cert_file")
        }
        e => invalid(KEY, &files.key, e.to_string()),
    })?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_config(dir: &Path, cert: &str, key: &str, ca: &str) -> HttpTls {
        let p = |name: &str| {
            if name.is_empty() {
                String::new()
            } else {
                dir.join(name).display().to_string()
            }
        };
        HttpTls {
            cert_file: p(cert),
            key_file: p(key),
            client_ca_file: p(ca),
        }
    }

    fn load_err(config: &HttpTls) -> String {
        match Tls::load(config, Arc::default()) {
            Ok(_) => panic!("accepted {config:?}"),
            Err(e) => error_chain(&e),
        }
    }

    #[test]
    fn missing_and_bad_files_name_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("junk.pem"), "not a certificate\n").expect("write");
        let e = load_err(&tls_config(dir.path(), "absent.pem", "absent.key", ""));
        assert!(e.starts_with("http.tls.cert_file: reading "), "{e}");
        assert!(e.contains("absent.pem"), "{e}");
        let e = load_err(&tls_config(dir.path(), "junk.pem", "absent.key", ""));
        assert!(e.starts_with("http.tls.cert_file: "), "{e}");
        assert!(e.contains("no CERTIFICATE"), "{e}");
    }

    #[test]
    fn unconfigured_is_none() {
        assert!(matches!(
            Tls::load(&HttpTls::default(), Arc::default()),
            Ok(None)
        ));
    }

    #[test]
    fn last_error_warns_once_per_distinct_error() {
        let e = LastError::default();
        assert!(!e.any());
        assert!(e.is_new("a"));
        assert!(!e.is_new("a"), "the same error again: no warning");
        assert!(e.any());
        assert!(e.is_new("b"));
        e.clear();
        assert!(!e.any());
        assert!(e.is_new("b"), "after a success, the error is new again");
    }

    #[test]
    fn stamps_see_a_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("f");
        std::fs::write(&f, "a").expect("write");
        let a = FileStamp::of(&f);
        assert!(a.is_some());
        std::fs::write(&f, "bb").expect("write");
        assert_ne!(a, FileStamp::of(&f));
        assert_eq!(FileStamp::of(&dir.path().join("absent")), None);
    }
}
