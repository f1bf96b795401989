//! The start/stop harness of in-process servers, and bounded polling.
//!
//! Every node's `App::run` takes a shutdown future, so one handle serves them all:
//! [`Running::spawn`] hands the run function a cancellation future and keeps the task.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// A server task that shuts down gracefully when asked ([`Running::shutdown`], [`Running::stop`],
/// or dropping the handle).
#[derive(Debug)]
pub struct Running<T> {
    stop: CancellationToken,
    task: JoinHandle<T>,
}

impl<T: Send + 'static> Running<T> {
    /// Spawns `run(shutdown)`; the server should return once `shutdown` completes.
    ///
    /// ```text
    /// let app = App::build(settings).await?;
    /// let addr = app.grpc_addr();
    /// let node = Running::spawn(|shutdown| app.run(shutdown));
    /// ```
    pub fn spawn<F>(run: impl FnOnce(WaitForCancellationFutureOwned) -> F) -> Self
    where
        F: Future<Output = T> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(stop.clone().cancelled_owned()));
        Self { stop, task }
    }

    /// A task already spawned that shuts down when `stop` is cancelled.
    pub fn adopt(stop: CancellationToken, task: JoinHandle<T>) -> Self {
        Self { stop, task }
    }

    /// Asks the server to shut down, without waiting.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Waits until the server's task has ended (after [`Running::shutdown`], or on its own), and
    /// returns what it returned. Call it once: a task that has ended cannot be awaited again.
    pub async fn finished(&mut self) -> Result<T, JoinError> {
        (&mut self.task).await
    }

    /// Whether the task has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Graceful shutdown: asks and waits.
    pub async fn stop(mut self) -> Result<T, JoinError> {
        self.shutdown();
        self.finished().await
    }
}

impl<T, E> Running<Result<T, E>>
where
    T: Send + 'static,
    E: Send + 'static,
    anyhow::Error: From<E>,
{
    /// Graceful shutdown ([`Running::stop`]), with the server's error and a panic of its task
    /// as one error.
    pub async fn close(self) -> anyhow::Result<T> {
        Ok(self.stop().await.context("the server task panicked")??)
    }
}

impl<T> Drop for Running<T> {
    fn drop(&mut self) {
        // A dropped handle still shuts its server down (gracefully, in the background).
        self.stop.cancel();
    }
}

/// A free loopback address (bound, read, released: whoever needs a fixed address binds it
/// right after, e.g. a child process or a server that must come back on the same address).
///
/// Never the same port twice in one process: once released, the kernel may hand a port out
/// again at the next bind to port 0, so two calls in a row (a coordinator's gRPC and admin
/// addresses), or two tests running in parallel threads, could get the same address and one
/// server would fail to bind — the flakes of `connect_retry`, `chaos_soak` and
/// `e2e_long_prompt`. Another process can still take the port before it is bound again; that
/// window is short.
pub fn free_addr() -> std::io::Result<std::net::SocketAddr> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..64 {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return Ok(addr);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no loopback port that this process has not handed out already in 64 tries",
    ))
}

/// Bounded polling (not a sleep as synchronisation): checks `cond` every 10 ms and panics,
/// naming `what`, when it has not held within 10 s.
pub async fn eventually<F, Fut>(what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if let Err(e) = wait_until(what, Duration::from_secs(10), cond).await {
        panic!("{e}");
    }
}

/// Checks `cond` every 10 ms until it holds; an error naming `what` when it has not held
/// `within`.
pub async fn wait_until<F, Fut>(what: &str, within: Duration, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("timed out waiting for: {what}")
}

#[cfg(test)]
mod tests {
    /// Released ports come back from the kernel (on Linux about 130 repeats in 2 000 binds to
    /// port 0); `free_addr` never repeats one.
    #[test]
    fn free_addr_never_hands_out_a_port_twice() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2000 {
            let a = super::free_addr().unwrap();
            assert!(a.ip().is_loopback());
            assert!(seen.insert(a.port()), "{a} handed out twice");
        }
    }
}
