//! The one thread that encodes pprof profiles: the window profiles of `/debug/pprof/*` and
//! `/flamegraph?format=pprof`, and captures encoded as pprof, run on it one at a time.
//! Process-wide, started on the first encoding; a job that panics fails its own request only.
//!
//! Hooks: none (one thread, `pprof-encoder`). Metrics: none.

/// The encoding thread is gone, or the encoding panicked.
#[derive(Debug, thiserror::Error)]
#[error("the pprof encoder thread is gone")]
pub struct EncoderGone;

type EncodeJob = Box<dyn FnOnce() + Send>;

/// Runs `job` on the one thread that encodes pprof profiles, one at a time. One thread because
/// glibc keeps the memory a thread freed in that thread's arena: encodings spread over the
/// blocking pool's threads would each keep an encoding's working set (about 10 MiB for a
/// busy 60 s window), a single thread keeps one, however many scrapes and scrapers.
pub async fn on_encoder_thread<T: Send + 'static>(
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<T, EncoderGone> {
    static ENCODER: std::sync::OnceLock<Option<std::sync::mpsc::Sender<EncodeJob>>> =
        std::sync::OnceLock::new();
    let sender = ENCODER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<EncodeJob>();
        std::thread::Builder::new()
            .name("pprof-encoder".to_owned())
            .spawn(move || {
                for job in rx {
                    // A job that panics fails its own request only.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .map_err(|e| tracing::warn!(error = %e, "cannot start the pprof encoder thread"))
            .ok()
            .map(|_| tx)
    });
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: EncodeJob = Box::new(move || {
        let _ = tx.send(job());
    });
    match sender {
        Some(s) => s.send(job).map_err(|_| EncoderGone)?,
        // No thread could be started: encode on the blocking pool.
        None => drop(tokio::task::spawn_blocking(job)),
    }
    rx.await.map_err(|_| EncoderGone)
}
