//! One single-threaded Tokio runtime per core; each serves the connections handed to it.
//!
//! Why: on a multi-threaded runtime a proxied request wakes other threads several times (the
//! connection's task, the pooled upstream connection's task, idle workers looking for work):
//! measured as ~1 context switch per request and most of the kernel time (issue 12). Here a
//! connection, its requests and the upstream connections they use stay on one thread; the
//! accept loop hands each new connection to the core with the fewest open ones.

use std::{
    cell::Cell,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{runtime::Handle, sync::oneshot};

thread_local! {
    /// 1-based index of the core runtime running on this thread; 0 elsewhere.
    static CORE: Cell<usize> = const { Cell::new(0) };
}

/// Index of the core runtime on this thread (1..=n), or 0 on any other thread: per-core
/// resources (upstream pools) are picked with it.
pub fn current() -> usize {
    CORE.with(Cell::get)
}

/// The number of core runtimes `server.worker_threads` asks for (0: one per available core).
pub fn count(configured: usize) -> usize {
    if configured > 0 {
        configured
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

struct Core {
    handle: Handle,
    open: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
}

/// The running core runtimes; dropping this stops them (their remaining tasks are cancelled).
pub struct CoreRuntimes {
    cores: Vec<Core>,
}

/// A connection's place on a core; the core's count of open connections drops with it.
pub struct Placement {
    open: Arc<AtomicUsize>,
}

impl Drop for Placement {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl CoreRuntimes {
    /// Starts `n` threads, each running a current-thread runtime until this is dropped.
    pub fn start(n: usize) -> std::io::Result<Self> {
        let mut cores = Vec::with_capacity(n);
        for index in 1..=n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("bff-core-{index}"))
                .spawn(move || {
                    CORE.with(|c| c.set(index));
                    // Runs spawned connections until told to stop (or the sender is dropped).
                    let _ = runtime.block_on(stopped);
                    // Blocking tasks still running get a moment, then are left behind.
                    runtime.shutdown_timeout(Duration::from_secs(1));
                })?;
            cores.push(Core {
                handle,
                open: Arc::new(AtomicUsize::new(0)),
                stop: Some(stop),
            });
        }
        Ok(Self { cores })
    }

    /// The core with the fewest open connections, and the new connection's place on it.
    pub fn place(&self) -> Option<(Handle, Placement)> {
        let core = self
            .cores
            .iter()
            .min_by_key(|c| c.open.load(Ordering::Relaxed))?;
        core.open.fetch_add(1, Ordering::Relaxed);
        Some((
            core.handle.clone(),
            Placement {
                open: core.open.clone(),
            },
        ))
    }
}

impl Drop for CoreRuntimes {
    fn drop(&mut self) {
        for core in &mut self.cores {
            if let Some(stop) = core.stop.take() {
                let _ = stop.send(());
            }
        }
    }
}
