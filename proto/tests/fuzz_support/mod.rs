//! Shared by every fuzz harness of the workspace (`*/tests/fuzz_*.rs`; the other crates include
//! this file with `#[path]`): the case count, a capped and measuring global allocator, and the
//! campaign report.
//!
//! The harnesses are proptest-driven so they run on the stable toolchain inside `cargo test`:
//! a CI-sized number of cases by default, a campaign when `EDGESPEC_FUZZ_CASES` says so:
//!
//! ```text
//! EDGESPEC_FUZZ_CASES=1000000 cargo test --release -p edgespec-proto --test fuzz_proto -- --nocapture
//! ```
//!
//! Properties every target checks: the decoder does not panic (proptest turns a panic into a
//! failing case, shrinks it and prints the minimal input), no single allocation of a case exceeds
//! the target's bound (a declared length of 2^60 must be refused, not allocated), and a refused
//! input comes back as an error value. `PROPTEST_RNG_SEED=<u64>` replays a run.
#![allow(dead_code, unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestCaseResult, TestRunner};

/// Environment variable with the number of cases of a campaign (per target).
pub const CASES_ENV: &str = "EDGESPEC_FUZZ_CASES";

/// Any single allocation request larger than this is refused: the process aborts with
/// "memory allocation of N bytes failed" instead of the machine swapping or the kernel killing
/// something else. Far above what any harness input needs (inputs are capped at a few MiB).
pub const HARD_ALLOC_LIMIT: usize = 1 << 31;

/// Requests at least this large are recorded per thread (smaller ones cost one comparison).
const TRACK_FROM: usize = 1 << 16;

thread_local! {
    static PEAK: Cell<usize> = const { Cell::new(0) };
    /// This thread is running a fuzz target: its panics are caught and reported by proptest,
    /// so the panic hook stays quiet (and skips the backtrace, which costs milliseconds).
    static QUIET: Cell<bool> = const { Cell::new(false) };
    /// The running target's allocation bound, and where a request above it came from.
    static LIMIT: Cell<usize> = const { Cell::new(usize::MAX) };
    static OVER_LIMIT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
    static IN_NOTE: Cell<bool> = const { Cell::new(false) };
    /// Where the last quiet panic happened.
    static LAST_PANIC: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Installs (once) a panic hook that is silent on threads running a target.
fn quiet_panics_in_targets() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.try_with(Cell::get).unwrap_or(false) {
                let at = info
                    .location()
                    .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
                    .unwrap_or_default();
                let _ = LAST_PANIC.try_with(|p| *p.borrow_mut() = at);
            } else {
                previous(info);
            }
        }));
    });
}

fn note(size: usize) {
    if size >= TRACK_FROM {
        let _ = PEAK.try_with(|p| p.set(p.get().max(size)));
        // Above the bound: remember where from (the capture allocates; the guard keeps those
        // allocations from being noted again).
        if size > LIMIT.try_with(Cell::get).unwrap_or(usize::MAX)
            && !IN_NOTE.try_with(|g| g.replace(true)).unwrap_or(true)
        {
            let trace = std::backtrace::Backtrace::force_capture().to_string();
            let _ = OVER_LIMIT
                .try_with(|o| *o.borrow_mut() = Some(format!("{size} bytes at\n{trace}")));
            let _ = IN_NOTE.try_with(|g| g.set(false));
        }
    }
}

/// The system allocator, measuring the largest single request per thread and refusing requests
/// above [`HARD_ALLOC_LIMIT`].
pub struct CappedAlloc;

// SAFETY: every call is forwarded unchanged to `System`; a refused request returns null, which
// `GlobalAlloc` allows (the caller then reports the allocation failure).
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        if layout.size() > HARD_ALLOC_LIMIT {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        if layout.size() > HARD_ALLOC_LIMIT {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        if new_size > HARD_ALLOC_LIMIT {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

/// Forgets this thread's largest allocation so far.
pub fn reset_peak() {
    let _ = PEAK.try_with(|p| p.set(0));
    let _ = OVER_LIMIT.try_with(|o| o.borrow_mut().take());
}

/// This thread's largest single allocation request since [`reset_peak`] (0 if all were below
/// 64 KiB).
pub fn peak() -> usize {
    PEAK.try_with(Cell::get).unwrap_or(0)
}

/// Fails the case if a single allocation since [`reset_peak`] exceeded `limit` bytes.
pub fn check_peak(limit: usize, what: &str) -> TestCaseResult {
    let p = peak();
    if p > limit {
        let at = OVER_LIMIT
            .with(|o| o.borrow().clone())
            .map(|t| {
                // The frames of the workspace and its dependencies, not std's or the harness's.
                t.lines()
                    .filter(|l| !l.contains("/rustc/") && !l.contains("fuzz_support"))
                    .take(60)
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default();
        return Err(TestCaseError::fail(format!(
            "{what}: one allocation of {p} bytes (limit {limit}); {at}"
        )));
    }
    Ok(())
}

/// Runs `f` on a new thread (whose thread-locals die with it) and returns its result; its
/// largest allocation counts toward this thread's, and a panic in it continues here.
///
/// For decoders whose dependencies keep per-thread state across instances: tokenizers 0.23's
/// BPE caches words in a thread-local map keyed by instance and never drops a dropped instance's
/// entry, so a harness building a tokenizer per case on one thread grows that map without bound
/// (a 76 MB rehash after ~636 000 tokenizers).
pub fn in_fresh_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let limit = LIMIT.with(Cell::get);
    let (result, child_peak, over, last_panic) = std::thread::scope(|s| {
        s.spawn(|| {
            QUIET.with(|q| q.set(true));
            LIMIT.with(|l| l.set(limit));
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let over = OVER_LIMIT.with(|o| o.borrow_mut().take());
            let at = LAST_PANIC.with(|p| p.borrow().clone());
            (r, peak(), over, at)
        })
        .join()
        .expect("the helper thread returns")
    });
    let _ = PEAK.try_with(|p| p.set(p.get().max(child_peak)));
    if over.is_some() {
        OVER_LIMIT.with(|o| *o.borrow_mut() = over);
    }
    match result {
        Ok(v) => v,
        Err(payload) => {
            LAST_PANIC.with(|p| *p.borrow_mut() = last_panic);
            std::panic::resume_unwind(payload)
        }
    }
}

/// Number of cases: `EDGESPEC_FUZZ_CASES` if set, else `ci`.
pub fn cases(ci: u32) -> u32 {
    match std::env::var(CASES_ENV) {
        Ok(v) => v
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{CASES_ENV}={v:?} is not a number")),
        Err(_) => ci,
    }
}

/// True when running a campaign.
pub fn campaign() -> bool {
    std::env::var_os(CASES_ENV).is_some()
}

/// What one target did.
#[derive(Debug, Clone)]
pub struct Report {
    /// Target name.
    pub target: &'static str,
    /// Test cases run (each one or more decoder executions).
    pub cases: u64,
    /// Decoder executions (inputs given to a decoder).
    pub executions: u64,
    /// Inputs the decoder under test accepted (where the harness counts them).
    pub accepted: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Largest single allocation of any case (bytes; 0 if all were below 64 KiB).
    pub peak_alloc: usize,
    /// Slowest case.
    pub slowest: Duration,
}

/// Counters a target's property updates.
#[derive(Debug, Default)]
pub struct Counters {
    cases: Cell<u64>,
    executions: Cell<u64>,
    accepted: Cell<u64>,
    peak: Cell<usize>,
    slowest: Cell<Duration>,
}

impl Counters {
    /// Adds `n` decoder executions.
    pub fn exec(&self, n: u64) {
        self.executions.set(self.executions.get() + n);
    }

    /// Counts an input the decoder accepted (the rest were refused with an error).
    pub fn accepted(&self, ok: bool) {
        self.accepted.set(self.accepted.get() + u64::from(ok));
    }
}

/// Runs `property` over `strategy` for [`cases`]`(ci)` cases, with no failure persistence (every
/// crash found becomes an explicit regression test instead), each case under a fresh allocation
/// peak checked against `alloc_limit`. Panics with proptest's minimal failing input on failure;
/// prints a one-line report (shown with `--nocapture`) and returns it otherwise.
pub fn run<S: Strategy>(
    target: &'static str,
    ci: u32,
    alloc_limit: usize,
    strategy: S,
    property: impl Fn(&Counters, S::Value) -> TestCaseResult,
) -> Report {
    let config = Config {
        cases: cases(ci),
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::default()
    };
    let counters = Counters::default();
    quiet_panics_in_targets();
    QUIET.with(|q| q.set(true));
    LIMIT.with(|l| l.set(alloc_limit));
    let mut runner = TestRunner::new(config);
    let start = Instant::now();
    let result = runner.run(&strategy, |value| {
        reset_peak();
        let t = Instant::now();
        let r = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            property(&counters, value)
        })) {
            Ok(r) => r,
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                let at = LAST_PANIC.with(|p| p.borrow().clone());
                Err(TestCaseError::fail(format!("panicked at {at}: {msg}")))
            }
        };
        let dt = t.elapsed();
        counters.cases.set(counters.cases.get() + 1);
        if dt > counters.slowest.get() {
            counters.slowest.set(dt);
        }
        let p = peak();
        if p > counters.peak.get() {
            counters.peak.set(p);
        }
        r?;
        check_peak(alloc_limit, target)
    });
    QUIET.with(|q| q.set(false));
    LIMIT.with(|l| l.set(usize::MAX));
    let report = Report {
        target,
        cases: counters.cases.get(),
        executions: counters.executions.get(),
        accepted: counters.accepted.get(),
        elapsed: start.elapsed(),
        peak_alloc: counters.peak.get(),
        slowest: counters.slowest.get(),
    };
    if let Err(e) = result {
        panic!(
            "fuzz target `{target}` failed after {} cases: {e}",
            report.cases
        );
    }
    println!(
        "fuzz target {}: {} cases, {} executions ({} accepted) in {:.1} s ({:.0} exec/s); \
         largest allocation {} bytes; slowest case {:.1} ms",
        report.target,
        report.cases,
        report.executions,
        report.accepted,
        report.elapsed.as_secs_f64(),
        report.executions as f64 / report.elapsed.as_secs_f64().max(1e-9),
        report.peak_alloc,
        report.slowest.as_secs_f64() * 1e3,
    );
    report
}

/// One edit of an input's bytes.
#[derive(Debug, Clone)]
pub enum ByteMutation {
    /// Flip one bit.
    Flip(proptest::sample::Index, u8),
    /// Overwrite one byte.
    Set(proptest::sample::Index, u8),
    /// Insert random bytes.
    Insert(proptest::sample::Index, Vec<u8>),
    /// Insert one of the target's interesting tokens.
    Token(proptest::sample::Index, proptest::sample::Index),
    /// Delete up to n bytes.
    Delete(proptest::sample::Index, u8),
    /// Cut the input.
    Truncate(proptest::sample::Index),
    /// Append a copy of up to n bytes.
    Duplicate(proptest::sample::Index, u8),
}

/// A random [`ByteMutation`].
pub fn byte_mutation() -> proptest::strategy::BoxedStrategy<ByteMutation> {
    use proptest::prelude::*;
    use proptest::sample::Index;
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| ByteMutation::Flip(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| ByteMutation::Set(i, b)),
        1 => (any::<Index>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| ByteMutation::Insert(i, b)),
        3 => (any::<Index>(), any::<Index>()).prop_map(|(i, t)| ByteMutation::Token(i, t)),
        2 => (any::<Index>(), 1u8..16).prop_map(|(i, n)| ByteMutation::Delete(i, n)),
        1 => any::<Index>().prop_map(ByteMutation::Truncate),
        1 => (any::<Index>(), 1u8..32).prop_map(|(i, n)| ByteMutation::Duplicate(i, n)),
    ]
    .boxed()
}

/// Applies `mutations` in order; `tokens` are the target's interesting byte strings.
pub fn mutate_bytes(bytes: &mut Vec<u8>, mutations: &[ByteMutation], tokens: &[&[u8]]) {
    let gap = |i: &proptest::sample::Index, len: usize| i.index(len + 1);
    for m in mutations {
        let len = bytes.len();
        match m {
            ByteMutation::Flip(i, b) if len > 0 => bytes[i.index(len)] ^= 1 << (b & 7),
            ByteMutation::Set(i, v) if len > 0 => bytes[i.index(len)] = *v,
            ByteMutation::Insert(i, b) => {
                let p = gap(i, len);
                bytes.splice(p..p, b.iter().copied());
            }
            ByteMutation::Token(i, t) if !tokens.is_empty() => {
                let p = gap(i, len);
                bytes.splice(p..p, tokens[t.index(tokens.len())].iter().copied());
            }
            ByteMutation::Delete(i, n) if len > 0 => {
                let p = i.index(len);
                bytes.drain(p..(p + *n as usize).min(len));
            }
            ByteMutation::Truncate(i) => bytes.truncate(gap(i, len)),
            ByteMutation::Duplicate(i, n) if len > 0 => {
                let p = i.index(len);
                let chunk = bytes[p..(p + *n as usize).min(len)].to_vec();
                bytes.extend(chunk);
            }
            _ => {}
        }
    }
}
