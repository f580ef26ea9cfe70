//! The HTTP endpoint's connections: the accept loop, TLS handshakes ([`super::tls`]), the
//! connection limit and the timeouts, with hyper's HTTP/1.1 server under the axum router.
//!
//! - **Limit:** at most `http.max_connections` connections are open. One more is refused at
//!   once: on plain HTTP it is answered `503` with `Connection: close` and closed after the
//!   client's request was read (so the answer is not lost to a reset); on TLS it is closed
//!   without a handshake. At most [`REFUSING_AT_ONCE`] refusals are in progress (each for at
//!   most a second); past that a connection is closed at once.
//! - **Header timeout:** from accepting a connection (the TLS handshake included), and from
//!   the first byte of each later request on it, a client has `http.header_timeout_seconds`
//!   to send the request line and headers; then the connection is closed. Slow clients
//!   cannot hold connections (and file descriptors) past it.
//! - **Idle timeout:** a keep-alive connection with no request and no response bytes for
//!   `http.idle_timeout_seconds` is closed. (hyper's own header timeout would also close
//!   idle keep-alive connections after the header timeout, so it is off and both timeouts
//!   are kept here: [`Clock`] follows the phases of a connection, read from its bytes and
//!   from the service calls.)
//! - **Size:** a request line plus headers above `http.max_header_bytes` gets `431`.
//! - While a handler runs (a capture can take `sampling.max_capture_seconds`) no timeout
//!   applies; the capture is bounded itself.
//! - Shutdown: the listener closes, open connections finish their request (graceful
//!   shutdown of hyper's connection) for at most [`SHUTDOWN_GRACE`]; then each is closed,
//!   also one whose client is still sending headers (the header timeout keeps applying
//!   until then).
//!
//! [`raise_fd_limit`] raises the soft open-file limit to the hard one at start (as Go does for
//! every program), so `max_connections` is not cut short by a 1024 soft limit.
//!
//! Hooks: a TCP listener ([`bind`], backlog [`BACKLOG`]), `setrlimit(RLIMIT_NOFILE)`. Metrics:
//! `apisix_profiler_http_connection_errors_total{reason}` ([`ConnectionError::name`]),
//! `apisix_profiler_http_open_connections`.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{Router, extract::ConnectInfo};
use hyper::{Request, body::Incoming, server::conn::http1};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Notify, OwnedSemaphorePermit, Semaphore, watch},
    time::Instant,
};
use tower::ServiceExt as _;

use super::{
    metrics::{HttpReasonLabels, LabelValue, Metrics},
    tls::Tls,
};
use crate::config;

/// Refusals (503 answers past the connection limit) in progress at once.
pub const REFUSING_AT_ONCE: usize = 64;
/// How long open connections may take to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// The answer past the connection limit.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
Content-Length: 61\r\nConnection: close\r\nRetry-After: 1\r\n\r\n\
{\"error\":\"too many open connections (http.max_connections)\"}\n";
/// Seconds between two warnings of the same kind (connection limit, accept errors).
const WARN_EVERY_SECONDS: u64 = 60;

/// The limits of `http`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    /// [`SHUTDOWN_GRACE`] (shorter in tests).
    pub shutdown_grace: Duration,
}

impl From<&config::Http> for Limits {
    fn from(h: &config::Http) -> Self {
        Self {
            header_timeout: Duration::from_secs(h.header_timeout_seconds),
            idle_timeout: Duration::from_secs(h.idle_timeout_seconds),
            max_connections: h.max_connections,
            max_header_bytes: h.max_header_bytes,
            shutdown_grace: SHUTDOWN_GRACE,
        }
    }
}

/// Why a connection was refused or closed early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionError {
    /// Refused: `http.max_connections` were open.
    MaxConnections,
    /// The TLS handshake failed (no or a bad client certificate, not TLS, …).
    TlsHandshake,
    /// No complete request headers (or TLS handshake) within the header timeout.
    HeaderTimeout,
    /// Request line plus headers above `http.max_header_bytes` (answered 431).
    HeaderTooLarge,
    /// Not HTTP/1 (answered 400 where possible).
    BadRequest,
    /// The connection failed (reset by the client, …).
    Io,
    /// `accept` failed (e.g. out of file descriptors).
    Accept,
}

impl ConnectionError {
    pub const ALL: [Self; 7] = [
        Self::MaxConnections,
        Self::TlsHandshake,
        Self::HeaderTimeout,
        Self::HeaderTooLarge,
        Self::BadRequest,
        Self::Io,
        Self::Accept,
    ];

    /// The `reason` label.
    pub fn name(self) -> &'static str {
        match self {
            Self::MaxConnections => "max_connections",
            Self::TlsHandshake => "tls_handshake",
            Self::HeaderTimeout => "header_timeout",
            Self::HeaderTooLarge => "header_too_large",
            Self::BadRequest => "bad_request",
            Self::Io => "io",
            Self::Accept => "accept",
        }
    }

    fn of(e: &hyper::Error) -> Option<Self> {
        if e.is_parse_too_large() {
            Some(Self::HeaderTooLarge)
        } else if e.is_parse() || e.is_parse_version_h2() {
            Some(Self::BadRequest)
        } else if e.is_incomplete_message() || e.is_canceled() {
            // The client went away mid-request: its business.
            None
        } else {
            Some(Self::Io)
        }
    }
}

/// What every connection task needs.
struct Ctx {
    app: Router,
    tls: Option<Arc<Tls>>,
    limits: Limits,
    http: http1::Builder,
    metrics: Arc<Metrics>,
}

impl Ctx {
    fn count(&self, e: ConnectionError) {
        self.metrics
            .http
            .connection_errors
            .get_or_create(&HttpReasonLabels {
                reason: LabelValue::fixed(e.name()),
            })
            .inc();
    }
}

/// Serves `app` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<Tls>>,
    limits: Limits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let mut http = http1::Builder::new();
    http.keep_alive(true)
        // Kept by `Clock` instead, so that idle keep-alive connections get their own timeout.
        .header_read_timeout(None)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(8192));
    for e in ConnectionError::ALL {
        let _ = metrics
            .http
            .connection_errors
            .get_or_create(&HttpReasonLabels {
                reason: LabelValue::fixed(e.name()),
            });
    }
    let ctx = Arc::new(Ctx {
        app,
        tls,
        limits,
        http,
        metrics,
    });
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(REFUSING_AT_ONCE));
    // `Some(by)` at shutdown: every connection closes by then.
    let (stop_tx, stop_rx) = watch::channel(None::<Instant>);
    let limit_warning = Every::new();
    let accept_warning = Every::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if is_per_connection(&e) => continue,
                Err(e) => {
                    ctx.count(ConnectionError::Accept);
                    if accept_warning.due() {
                        tracing::warn!(error = %e, "HTTP accept failed; retrying in 1 s");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                tokio::spawn(connection(stream, peer, slot, ctx.clone(), stop_rx.clone()));
            }
            Err(_) => {
                ctx.count(ConnectionError::MaxConnections);
                if limit_warning.due() {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        %peer,
                        "HTTP connection limit reached: refusing new connections \
                         (http.max_connections; apisix_profiler_http_connection_errors_total)"
                    );
                }
                if ctx.tls.is_none()
                    && let Ok(permit) = refusing.clone().try_acquire_owned()
                {
                    tokio::spawn(refuse(stream, permit));
                }
            }
        }
    }
    drop(listener);
    let by = Instant::now() + limits.shutdown_grace;
    let _ = stop_tx.send(Some(by));
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout_at(by, slots.acquire_many(all))
        .await
        .is_err()
    {
        // Each connection closes itself at `by`: wait for that, briefly.
        let open = limits.max_connections - slots.available_permits();
        match tokio::time::timeout(Duration::from_secs(1), slots.acquire_many(all)).await {
            Ok(_) => tracing::info!(
                closed = open,
                "HTTP connections still open at the end of the shutdown grace: closed"
            ),
            Err(_) => tracing::info!(
                open = limits.max_connections - slots.available_permits(),
                "HTTP connections still open after the shutdown grace: they end with the process"
            ),
        }
    }
    Ok(())
}

/// Errors of `accept` that concern one connection only (the next accept works).
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// Answers 503 past the limit, reads what the client sent until it closes (at most 1 s),
/// then closes.
async fn refuse(mut stream: TcpStream, _permit: OwnedSemaphorePermit) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(REFUSAL).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), io::Error>(())
    })
    .await;
}

/// Holds the open-connections gauge up for as long as it lives.
struct Open(Arc<Metrics>);

impl Open {
    fn new(metrics: &Arc<Metrics>) -> Self {
        metrics.http.open_connections.inc();
        Self(metrics.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.http.open_connections.dec();
    }
}

/// One connection, from accept to close.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    _slot: OwnedSemaphorePermit,
    ctx: Arc<Ctx>,
    stop: watch::Receiver<Option<Instant>>,
) {
    let _open = Open::new(&ctx.metrics);
    let _ = stream.set_nodelay(true);
    let clock = Arc::new(Clock::new(ctx.limits));
    let outcome = match &ctx.tls {
        None => drive(stream, peer, clock, &ctx, stop).await,
        Some(tls) => {
            let handshake = tls.acceptor().accept(stream);
            match tokio::time::timeout(ctx.limits.header_timeout, handshake).await {
                Ok(Ok(stream)) => drive(stream, peer, clock, &ctx, stop).await,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    Some(ConnectionError::TlsHandshake)
                }
                Err(_) => Some(ConnectionError::HeaderTimeout),
            }
        }
    };
    if let Some(e) = outcome {
        tracing::debug!(%peer, reason = e.name(), "HTTP connection closed early");
        ctx.count(e);
    }
}

/// Serves HTTP/1.1 on one connection under [`Clock`]'s timeouts.
async fn drive<I>(
    io: I,
    peer: SocketAddr,
    clock: Arc<Clock>,
    ctx: &Ctx,
    mut stop: watch::Receiver<Option<Instant>>,
) -> Option<ConnectionError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let clock = clock.clone();
        let app = ctx.app.clone();
        hyper::service::service_fn(move |mut req: Request<Incoming>| {
            clock.busy();
            req.extensions_mut().insert(ConnectInfo(peer));
            let clock = clock.clone();
            let handled = app.clone().oneshot(req);
            async move {
                let response = handled.await;
                clock.idle();
                response
            }
        })
    };
    let io = TokioIo::new(Timed {
        inner: io,
        clock: clock.clone(),
    });
    let conn = ctx.http.serve_connection(io, service);
    tokio::pin!(conn);
    let mut closing = Closing::No;
    loop {
        let deadline = match closing {
            Closing::No => clock.deadline(),
            Closing::Idle { by } => Some(by),
            // The header timeout still applies to a request being sent.
            Closing::Shutdown { by } => Some(clock.deadline().map_or(by, |d| d.min(by))),
        };
        tokio::select! {
            done = conn.as_mut() => return done.err().and_then(|e| ConnectionError::of(&e)),
            () = sleep_until(deadline) => {
                let expired = clock.expired(Instant::now());
                match closing {
                    // A request that came in just as the idle timeout struck had its time.
                    Closing::Idle { .. } => return None,
                    Closing::Shutdown { .. } => {
                        return match expired {
                            Some(Phase::Headers { .. }) => Some(ConnectionError::HeaderTimeout),
                            // The grace is over (or an idle connection's timeout struck).
                            _ => None,
                        };
                    }
                    Closing::No => {}
                }
                match expired {
                    Some(Phase::Headers { .. }) => return Some(ConnectionError::HeaderTimeout),
                    Some(_) => {
                        conn.as_mut().graceful_shutdown();
                        closing = Closing::Idle {
                            by: Instant::now() + ctx.limits.header_timeout,
                        };
                    }
                    None => {}
                }
            }
            () = clock.changed.notified() => {}
            _ = stop.changed(), if !matches!(closing, Closing::Shutdown { .. }) => {
                let by = (*stop.borrow_and_update())
                    .unwrap_or_else(|| Instant::now() + ctx.limits.shutdown_grace);
                conn.as_mut().graceful_shutdown();
                closing = Closing::Shutdown { by };
            }
        }
    }
}

/// Whether a connection was asked to close (hyper's graceful shutdown: an idle one closes at
/// once, a request in progress is finished first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    No,
    /// By the idle timeout: a request that raced it gets one more header timeout.
    Idle {
        by: Instant,
    },
    /// By the server's shutdown: closed `by` the end of [`SHUTDOWN_GRACE`].
    Shutdown {
        by: Instant,
    },
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Where a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request's headers (from accept, or from a request's first byte).
    Headers { deadline: Instant },
    /// A handler runs.
    Busy,
    /// Between requests: since the last response byte.
    Idle { since: Instant },
}

/// The phase of one connection: set from its bytes ([`Timed`]) and from the service calls;
/// its supervisor ([`drive`]) sleeps until the phase's deadline or until it changes.
struct Clock {
    phase: Mutex<Phase>,
    changed: Notify,
    limits: Limits,
}

impl Clock {
    fn new(limits: Limits) -> Self {
        Self {
            phase: Mutex::new(Phase::Headers {
                deadline: Instant::now() + limits.header_timeout,
            }),
            changed: Notify::new(),
            limits,
        }
    }

    fn set(&self, f: impl FnOnce(&mut Phase) -> bool) {
        let changed = match self.phase.lock() {
            Ok(mut p) => f(&mut p),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        };
        if changed {
            self.changed.notify_one();
        }
    }

    fn get(&self) -> Phase {
        match self.phase.lock() {
            Ok(p) => *p,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    /// Bytes arrived: a new request starts when the connection was idle.
    fn on_read(&self) {
        let header = self.limits.header_timeout;
        self.set(|p| match p {
            Phase::Idle { .. } => {
                *p = Phase::Headers {
                    deadline: Instant::now() + header,
                };
                true
            }
            _ => false,
        });
    }

    /// Bytes were written: a response is still being sent.
    fn on_write(&self) {
        self.set(|p| {
            if let Phase::Idle { since } = p {
                *since = Instant::now();
            }
            false
        });
    }

    /// The request's headers are in: the handler runs.
    fn busy(&self) {
        self.set(|p| {
            *p = Phase::Busy;
            true
        });
    }

    /// The handler answered.
    fn idle(&self) {
        self.set(|p| {
            *p = Phase::Idle {
                since: Instant::now(),
            };
            true
        });
    }

    fn deadline(&self) -> Option<Instant> {
        match self.get() {
            Phase::Headers { deadline } => Some(deadline),
            Phase::Busy => None,
            Phase::Idle { since } => Some(since + self.limits.idle_timeout),
        }
    }

    /// The phase, when its deadline has passed at `now`.
    fn expired(&self, now: Instant) -> Option<Phase> {
        let p = self.get();
        self.deadline().filter(|d| *d <= now).map(|_| p)
    }
}

/// A connection's byte stream, telling its [`Clock`] when bytes move.
struct Timed<I> {
    inner: I,
    clock: Arc<Clock>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Timed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.on_read();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Timed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.on_write();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.on_write();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A warning gate: open at most once every [`WARN_EVERY_SECONDS`] (also for
/// [`super::auth`]).
#[derive(Debug)]
pub struct Every {
    started: std::time::Instant,
    /// When it last opened, in seconds since `started`, plus one (0: never).
    last: AtomicU64,
}

impl Default for Every {
    fn default() -> Self {
        Self::new()
    }
}

impl Every {
    pub fn new() -> Self {
        Self {
            started: std::time::Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// Whether a warning may be logged now (then not again for a while).
    pub fn due(&self) -> bool {
        let now = self.started.elapsed().as_secs() + 1;
        let last = self.last.load(Ordering::Relaxed);
        (last == 0 || now >= last + WARN_EVERY_SECONDS)
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Pending connections the kernel queues before `accept` (std's and tokio's `bind` use 128;
/// a burst above that while the accept loop is off the CPU for a few milliseconds drops
/// SYNs, and each dropped one costs its client a 1 s retransmission).
pub const BACKLOG: u32 = 1024;

/// Binds the endpoint's listening socket, with [`BACKLOG`] (the kernel caps it at
/// `net.core.somaxconn`).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Raises the soft limit on open files to the hard limit; warns when it stays below what
/// `max_connections` connections plus the agent's own files need. Returns the soft limit.
pub fn raise_fd_limit(max_connections: usize) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    let soft = lim.rlim_cur;
    // BPF maps and perf events (per CPU), target files, the Docker socket.
    let own = 256 + 4 * std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    if soft < max_connections as u64 + own {
        tracing::warn!(
            open_files = soft,
            max_connections,
            "the open-file limit is below http.max_connections plus the agent's own files: \
             connections past it fail (raise LimitNOFILE / ulimit -n or lower \
             http.max_connections)"
        );
    }
    soft
}

/// A warning for an endpoint reachable from other hosts without TLS or credentials; `None`
/// on loopback or when both are set.
pub fn exposure_warning(listen: SocketAddr, tls: bool, auth: bool) -> Option<&'static str> {
    if listen.ip().is_loopback() {
        return None;
    }
    match (tls, auth) {
        (false, false) => Some(
            "listening on a non-loopback address without TLS or authentication: anyone who \
             reaches the port can read the metrics and start captures (set http.tls and \
             http.basic_auth_users, see config.example.yaml)",
        ),
        (false, true) => Some(
            "listening on a non-loopback address without TLS: credentials travel in clear \
             text (set http.tls)",
        ),
        (true, false) => Some(
            "listening on a non-loopback address without authentication: anyone who reaches \
             the port can read the metrics and start captures (set http.basic_auth_users or \
             http.bearer_token_file, or http.tls.client_ca_file)",
        ),
        (true, true) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            max_connections: 4,
            max_header_bytes: 8192,
            shutdown_grace: Duration::from_millis(300),
        }
    }

    /// A client that sent half a request when the server stops is closed at the end of the
    /// shutdown grace, and the server returns then (not when the runtime ends).
    #[test]
    fn shutdown_closes_a_half_sent_request_after_the_grace() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let limits = Limits {
                header_timeout: Duration::from_secs(60),
                ..limits()
            };
            let listener = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
            let addr = listener.local_addr().expect("local addr");
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(serve(
                listener,
                Router::new(),
                None,
                limits,
                Arc::default(),
                async move {
                    let _ = stop_rx.await;
                },
            ));
            let mut client = TcpStream::connect(addr).await.expect("connect");
            client
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await
                .expect("half a request");
            tokio::time::sleep(Duration::from_millis(100)).await;
            let stopped = Instant::now();
            stop_tx.send(()).expect("stop");
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await;
            assert!(
                matches!(read, Ok(Ok(0) | Err(_))),
                "closed, without an answer: {read:?}"
            );
            let waited = stopped.elapsed();
            assert!(
                waited >= limits.shutdown_grace && waited < Duration::from_secs(2),
                "closed after {waited:?}"
            );
            let served = tokio::time::timeout(Duration::from_secs(2), server).await;
            assert!(matches!(served, Ok(Ok(Ok(())))), "{served:?}");
        });
    }

    #[test]
    fn clock_phases() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        rt.block_on(async {
            let c = Clock::new(limits());
            let t0 = Instant::now();
            assert_eq!(c.deadline(), Some(t0 + Duration::from_secs(2)));
            assert_eq!(c.expired(t0), None);
            assert!(matches!(
                c.expired(t0 + Duration::from_secs(2)),
                Some(Phase::Headers { .. })
            ));
            // Bytes while reading headers do not extend the header deadline.
            c.on_read();
            assert_eq!(c.deadline(), Some(t0 + Duration::from_secs(2)));
            c.busy();
            assert_eq!(c.deadline(), None, "no timeout while a handler runs");
            c.idle();
            assert_eq!(c.deadline(), Some(t0 + Duration::from_secs(10)));
            tokio::time::advance(Duration::from_secs(5)).await;
            c.on_write();
            assert_eq!(
                c.deadline(),
                Some(t0 + Duration::from_secs(15)),
                "response bytes keep it alive"
            );
            tokio::time::advance(Duration::from_secs(1)).await;
            c.on_read();
            assert_eq!(
                c.deadline(),
                Some(t0 + Duration::from_secs(8)),
                "a new request's first byte starts the header timeout"
            );
        });
    }

    #[test]
    fn exposure() {
        let lo: SocketAddr = "127.0.0.1:9464".parse().expect("addr");
        let lo6: SocketAddr = "[::1]:9464".parse().expect("addr");
        let any: SocketAddr = "0.0.0.0:9464".parse().expect("addr");
        let any6: SocketAddr = "[::]:9464".parse().expect("addr");
        assert_eq!(exposure_warning(lo, false, false), None);
        assert_eq!(exposure_warning(lo6, false, false), None);
        assert!(exposure_warning(any, false, false).is_some());
        assert!(exposure_warning(any6, false, false).is_some());
        assert!(exposure_warning(any, false, true).is_some());
        assert!(exposure_warning(any, true, false).is_some());
        assert_eq!(exposure_warning(any, true, true), None);
    }

    #[test]
    fn refusal_is_well_formed() {
        let text = std::str::from_utf8(REFUSAL).expect("ascii");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|n| n.parse().ok())
            .expect("content length");
        assert_eq!(len, body.len());
        assert!(serde_json::from_str::<serde_json::Value>(body).is_ok());
    }

    #[test]
    fn warnings_are_gated() {
        let e = Every::new();
        assert!(e.due());
        assert!(!e.due());
    }
}
