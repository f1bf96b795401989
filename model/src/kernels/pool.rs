//! One process-wide pool of persistent workers for the quantized matmuls.
//!
//! - Sized once from the CPU affinity (`available_parallelism` honours `sched_getaffinity` and
//!   cgroup quotas), or from `EDGESPEC_CPU_THREADS` / `CANDLE_NUM_THREADS` when set; the calling
//!   thread is one of the workers, so a pool of `n` spawns `n - 1` threads.
//! - Between operations a worker spins for at most [`SPIN`] (the gaps between the matmuls of one
//!   forward are shorter than that), then sleeps on a condition variable: an idle process burns
//!   no CPU, and a node sharing its cores loses at most one spin period per forward.
//! - Every model in the process submits to the same pool, one operation at a time (a mutex), so
//!   a draft and a target in one process never run more threads than the affinity allows.
//! - Work is handed out in items through an atomic cursor: a worker that was descheduled does
//!   not hold the others at a barrier, and which worker computes an item never changes a result
//!   (each item is computed by one thread, start to end). A worker that wakes after every item
//!   was taken does not join at all: the submitter closes the operation once its own loop finds
//!   the cursor exhausted and waits only for workers that joined before (still computing an
//!   item), never for one that is asleep or descheduled (a core shared with other processes).

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Longest a worker (or the submitting thread) busy-waits before sleeping.
const SPIN: Duration = Duration::from_micros(200);

type Job<'a> = &'a (dyn Fn() + Sync);

struct Shared {
    /// `epoch << 32 | CLOSED? | joined workers`: a new epoch opens an operation; workers join it
    /// (count +1) only while it is open and leave (count −1) when done.
    gate: AtomicU64,
    /// Points at the submitter's `Job` while an operation runs.
    job: AtomicPtr<Job<'static>>,
    /// Workers asleep on `wake`.
    sleepers: AtomicUsize,
    wake_mx: Mutex<()>,
    wake: Condvar,
    /// Whether the submitter sleeps on `done`.
    waiting: AtomicBool,
    done_mx: Mutex<()>,
    done: Condvar,
    panicked: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

const CLOSED: u64 = 1 << 31;
const JOINED: u64 = CLOSED - 1;

fn epoch(gate: u64) -> u64 {
    gate >> 32
}

/// The worker pool (see the module docs).
pub(crate) struct Pool {
    threads: usize,
    shared: Arc<Shared>,
    submit: Mutex<()>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads)
            .finish()
    }
}

/// The process-wide pool (created on first use).
pub(crate) fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::new(configured_threads()))
}

fn configured_threads() -> usize {
    let from_env = |k: &str| std::env::var(k).ok().and_then(|v| v.trim().parse().ok());
    from_env("EDGESPEC_CPU_THREADS")
        .or_else(|| from_env("CANDLE_NUM_THREADS"))
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn spin_until(mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        for _ in 0..64 {
            if done() {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() >= SPIN {
            return done();
        }
    }
}

impl Pool {
    pub(crate) fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            gate: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            sleepers: AtomicUsize::new(0),
            wake_mx: Mutex::new(()),
            wake: Condvar::new(),
            waiting: AtomicBool::new(false),
            done_mx: Mutex::new(()),
            done: Condvar::new(),
            panicked: Mutex::new(None),
        });
        for i in 1..threads {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("edgespec-cpu-{i}"))
                .spawn(move || worker(&s))
                .expect("spawning a CPU worker");
        }
        Pool {
            threads,
            shared,
            submit: Mutex::new(()),
        }
    }

    /// Threads that compute (the caller included).
    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Calls `f` on every item, each exactly once, spread over the pool; returns when all are
    /// done. `f` must not submit to the pool itself.
    pub(crate) fn for_each_mut<T: Send>(&self, items: &mut [T], f: impl Fn(&mut T) + Sync) {
        let len = items.len();
        let base = SendPtr(items.as_mut_ptr());
        let next = AtomicUsize::new(0);
        let work = || loop {
            let i = next.fetch_add(1, Relaxed);
            if i >= len {
                break;
            }
            let p = &base;
            // SAFETY: `i < len` indexes `items`, which outlives this call (`run` returns only
            // after every thread left `work`); the cursor hands out each index once, so no two
            // threads hold a reference to the same item.
            f(unsafe { &mut *p.0.add(i) });
        };
        if self.threads == 1 || len <= 1 {
            work();
        } else {
            self.run(&work);
        }
    }

    /// Runs `job` on the calling thread and on every worker that wakes before the caller's own
    /// call returns; returns when every thread that ran `job` is done. `job` must return only when
    /// no work is left to take (it does: it loops on the shared cursor).
    fn run(&self, job: Job<'_>) {
        let _one_at_a_time = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: only the lifetime is erased. A worker dereferences the pointer only after
        // joining the open operation and until it leaves it; this function closes the operation
        // and waits for the joined count to reach zero before returning, so `job` and `job_ref`
        // outlive every use.
        let job_ref: Job<'static> = unsafe { std::mem::transmute::<Job<'_>, Job<'static>>(job) };
        s.job
            .store((&job_ref as *const Job<'static>).cast_mut(), SeqCst);
        let next = (epoch(s.gate.load(SeqCst)) + 1) & 0xffff_ffff;
        s.gate.store(next << 32, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _g = s.wake_mx.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(job));
        s.gate.fetch_or(CLOSED, SeqCst);
        let idle = || s.gate.load(SeqCst) & JOINED == 0;
        if !spin_until(idle) {
            let mut g = s.done_mx.lock().unwrap_or_else(|e| e.into_inner());
            s.waiting.store(true, SeqCst);
            while !idle() {
                g = s.done.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.waiting.store(false, SeqCst);
        }
        s.job.store(std::ptr::null_mut(), SeqCst);
        let theirs = s.panicked.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(p) = mine.err().or(theirs) {
            resume_unwind(p);
        }
    }
}

struct SendPtr<T>(*mut T);
// SAFETY: the pointer is only dereferenced at indices handed out once each (`for_each_mut`), and
// `T: Send` lets another thread own such an item for the duration.
unsafe impl<T: Send> Sync for SendPtr<T> {}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        if !spin_until(|| epoch(s.gate.load(SeqCst)) != seen) {
            let mut g = s.wake_mx.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, SeqCst);
            while epoch(s.gate.load(SeqCst)) == seen {
                g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, SeqCst);
        }
        let mut g = s.gate.load(SeqCst);
        seen = epoch(g);
        // Join the operation unless it has closed (or already moved on) meanwhile.
        let joined = loop {
            if epoch(g) != seen || g & CLOSED != 0 {
                break false;
            }
            match s.gate.compare_exchange(g, g + 1, SeqCst, SeqCst) {
                Ok(_) => break true,
                Err(now) => g = now,
            }
        };
        if !joined {
            continue;
        }
        let ptr = s.job.load(SeqCst);
        // SAFETY: this worker joined the open operation, whose job pointer stays valid until it
        // leaves below (see `Pool::run`).
        let job: Job<'static> = unsafe { *ptr };
        if let Err(p) = catch_unwind(AssertUnwindSafe(job)) {
            *s.panicked.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        }
        if s.gate.fetch_sub(1, SeqCst) & JOINED == 1 && s.waiting.load(SeqCst) {
            let _g = s.done_mx.lock().unwrap_or_else(|e| e.into_inner());
            s.done.notify_all();
        }
    }
}
