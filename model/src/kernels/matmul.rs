//! The quantized matmul over the worker pool: activations quantized once per format, weight
//! rows split into tasks of about [`SMALL_BATCH_TASK_BYTES`] (one tile of rows or fewer) or
//! [`TASK_BYTES`] (more), each task computing its rows of every output row with the kernels of
//! [`super::block`] / [`super::block_x16`].

use super::{
    block, block_x16, has_x16, pool, quantize_in, x16, ActFormat, Acts, Isa, Pool, Row, WeightRef,
    ACT_TILE,
};

/// About how many weight bytes one pool task covers (for all activation rows) when there are more
/// activation rows than one tile ([`ACT_TILE`]: prefill): a task's weights are read once per tile
/// of rows, and at this size they stay in L2 between tiles. Large enough that a thread streams
/// each task's rows as one contiguous run, which the hardware prefetcher follows (with 32 KiB
/// tasks two threads interleaving their rows decoded slower than one; with 512 KiB the 0.5B's
/// two-thread decode went from 26 to 14 ms). A layer's task count is rounded up to a multiple of
/// the pool's threads so that they finish together.
const TASK_BYTES: usize = 512 << 10;
/// The same for one tile of rows or fewer (a decode step, a verification block): every weight
/// byte is read once whatever the task size, so a task is a longer run. Every restart of a stream
/// costs its ramp-up: against 512 KiB, in alternating runs on the 1.5B with two threads
/// (medians; fast-memory phase, then slow), a decode step went 17.1 → 16.3 ms, a block of 5
/// 22.8 → 20.5 ms (1.33 → 1.26 decode steps; 27.2 → 26.5 in a slow phase) and a block of 16
/// 58.5 → 56.1 ms; on the 0.5B a block of 5 13.7 → 13.1 ms. 2 MiB was in between (21.0), 64 MiB
/// (two tasks a layer) no better than 4 MiB, 256 KiB worse (25.0). Most layers still make two
/// tasks or more, so a descheduled thread is not waited for on a whole layer, and the output
/// projection many.
const SMALL_BATCH_TASK_BYTES: usize = 4 << 20;
const MIN_TASK_ROWS: usize = 16;

/// Weight rows per task for a layer of `n` rows of `rb` bytes on `threads` threads, for `m`
/// activation rows (a multiple of 16, the interleaved group).
fn rows_per_task(n: usize, rb: usize, threads: usize, m: usize) -> usize {
    let bytes = if m <= ACT_TILE {
        SMALL_BATCH_TASK_BYTES
    } else {
        TASK_BYTES
    };
    let tasks = (n * rb).div_ceil(bytes).next_multiple_of(threads.max(1));
    n.div_ceil(tasks)
        .max(MIN_TASK_ROWS)
        .next_multiple_of(x16::ROWS)
}
/// `y_l = x · W_lᵀ` for every weight `l` (all with the same `k`), `x` being `m` rows of `k`:
/// activations are quantized once per format, then the pool computes every output row of every
/// weight. Returns each `y_l` row-major `[m, n_l]`.
pub(crate) fn matmul(isa: Isa, weights: &[WeightRef<'_>], x: &[f32], m: usize) -> Vec<Vec<f32>> {
    matmul_in(pool(), isa, weights, x, m)
}

/// [`matmul`] on a given pool.
pub(crate) fn matmul_in(
    pool: &Pool,
    isa: Isa,
    weights: &[WeightRef<'_>],
    x: &[f32],
    m: usize,
) -> Vec<Vec<f32>> {
    let Some(k) = weights.first().map(|w| w.k) else {
        return Vec::new();
    };
    assert!(weights.iter().all(|w| w.k == k && w.valid()));
    assert!(
        weights.iter().all(|w| !w.packed) || has_x16(isa),
        "interleaved weights need an interleaved kernel"
    );
    assert_eq!(x.len(), m * k, "activation shape");
    let needs = |f: ActFormat| weights.iter().any(|w| w.format.act() == f);
    let q8k = needs(ActFormat::Q8K).then(|| quantize_in(Some(pool), x, k, ActFormat::Q8K));
    let q80 = needs(ActFormat::Q8_0).then(|| quantize_in(Some(pool), x, k, ActFormat::Q8_0));
    fn rows_of(a: &Option<Acts>, m: usize) -> Vec<Row<'_>> {
        a.as_ref()
            .map_or(Vec::new(), |a| (0..m).map(|r| a.row(r)).collect())
    }
    let (rows_q8k, rows_q80) = (rows_of(&q8k, m), rows_of(&q80, m));
    // Outputs row-major `[m, n_l]`. A task owns weight rows `row0..row0 + n_rows`, that is one
    // segment of each of the `m` output rows. The interleaved kernels store into the segments
    // directly (a group's 16 values of an activation row are contiguous); the row-major ones
    // compute `[n_rows, m]` (one weight row's `m` values together) into a scratch buffer, spread
    // into the segments by the task itself. (Reordered after the pool's operation on the calling
    // thread, with the other workers idle, this was 2 % of a verification block.)
    let mut outs: Vec<Vec<f32>> = weights.iter().map(|w| vec![0f32; w.n * m]).collect();
    {
        let mut tasks: Vec<Task<'_>> = Vec::new();
        for (l, out) in outs.iter_mut().enumerate() {
            let n = weights[l].n;
            let per_task = rows_per_task(n, weights[l].row_bytes(), pool.threads(), m);
            let first = tasks.len();
            for r0 in (0..n).step_by(per_task) {
                tasks.push(Task {
                    l,
                    row0: r0,
                    n_rows: per_task.min(n - r0),
                    segs: Vec::with_capacity(m),
                });
            }
            for row in out.chunks_mut(n) {
                for (t, seg) in row.chunks_mut(per_task).enumerate() {
                    tasks[first + t].segs.push(seg);
                }
            }
        }
        pool.for_each_mut(&mut tasks, |task| {
            let w = &weights[task.l];
            let rows = match w.format.act() {
                ActFormat::Q8K => &rows_q8k,
                ActFormat::Q8_0 => &rows_q80,
            };
            // A task's rows are one byte range in either layout (an interleaved group of 16 rows
            // is 16 rows' bytes, and tasks are whole groups).
            let rb = w.row_bytes();
            let wchunk = &w.data[task.row0 * rb..(task.row0 + task.n_rows) * rb];
            if w.packed {
                let nb = k / w.format.shape().elems;
                for r0 in (0..m).step_by(ACT_TILE) {
                    let r1 = (r0 + ACT_TILE).min(m);
                    block_x16(
                        isa,
                        w.format,
                        (wchunk, nb),
                        &rows[r0..r1],
                        &mut task.segs[r0..r1],
                    );
                }
                return;
            }
            let run = |out: &mut [f32]| {
                for r0 in (0..m).step_by(ACT_TILE) {
                    let tile = &rows[r0..(r0 + ACT_TILE).min(m)];
                    block(isa, w.format, (wchunk, rb), tile, &mut out[r0..], m);
                }
            };
            if let [seg] = task.segs.as_mut_slice() {
                // One activation row: both layouts are the same.
                run(seg);
                return;
            }
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                scratch.clear();
                scratch.resize(task.n_rows * m, 0.0);
                run(&mut scratch);
                spread(&scratch, &mut task.segs);
            });
        });
    }
    outs
}

/// One pool task of [`matmul_in`]: weight rows `row0..row0 + n_rows` of weight `l`, and their
/// segment of each output row.
struct Task<'a> {
    l: usize,
    row0: usize,
    n_rows: usize,
    segs: Vec<&'a mut [f32]>,
}

thread_local! {
    /// A task's outputs in the kernels' `[n_rows, m]` layout, reused across tasks.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `[n, m]` (`a`, one weight row's `m` values together) into `m` segments of `n`: `segs[j][i] =
/// a[i * m + j]`, in blocks of [`SPREAD_BLOCK`] weight rows so that reads and writes stay in a
/// few cache lines.
fn spread(a: &[f32], segs: &mut [&mut [f32]]) {
    let m = segs.len();
    let n = a.len() / m.max(1);
    for i0 in (0..n).step_by(SPREAD_BLOCK) {
        let i1 = (i0 + SPREAD_BLOCK).min(n);
        for (j, seg) in segs.iter_mut().enumerate() {
            for (d, i) in seg[i0..i1].iter_mut().zip(i0..i1) {
                *d = a[i * m + j];
            }
        }
    }
}
const SPREAD_BLOCK: usize = 32;
