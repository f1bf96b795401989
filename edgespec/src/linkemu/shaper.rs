//! The pure core of one direction: when does a chunk read at `now` reach the far side?
//!
//! The link is a serialiser (one chunk on the wire at a time, at the line rate) followed by a
//! propagation delay plus jitter. Release times are monotonic, so bytes never overtake each other
//! even when jitter or a live profile change would say otherwise. Time and randomness are
//! parameters, so this is tested without sockets or clocks.

use std::time::Duration;

use tokio::time::Instant;

use super::LinkProfile;

/// Largest chunk handed through the queue (also the read buffer size).
pub(crate) const MAX_PIECE: usize = 16 * 1024;
/// Smallest piece a rate-limited write is split into (about one Ethernet payload).
const MIN_PIECE: usize = 1460;
/// Rate-limited writes are split into pieces of about this much wire time, so a big write is
/// paced rather than released in one lump at the end.
const PIECE_TIME: Duration = Duration::from_millis(1);
/// How far the reader may run ahead of the wire. Keeps the serialiser busy despite the timer's
/// millisecond granularity, while the bulk of unsent data stays in the sender's socket buffer
/// (backpressure) instead of a proxy queue.
pub(crate) const RUN_AHEAD: Duration = Duration::from_millis(5);

/// When one chunk finishes serialising and when it is handed to the far side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub tx_done: Instant,
    pub release: Instant,
}

/// Per-direction link state.
#[derive(Debug, Default, Clone)]
pub(crate) struct Shaper {
    next_free: Option<Instant>,
    last_release: Option<Instant>,
}

impl Shaper {
    /// Schedules a chunk of `len` bytes that arrived at `now`; `jitter_u` is a uniform sample
    /// from `[0, 1)` that scales the profile's jitter.
    pub fn schedule(
        &mut self,
        now: Instant,
        len: usize,
        profile: &LinkProfile,
        jitter_u: f64,
    ) -> Slot {
        let start = self.next_free.map_or(now, |free| free.max(now));
        let tx_done = start + profile.serialisation_time(len);
        self.next_free = Some(tx_done);
        let jitter = profile.jitter.mul_f64(jitter_u.clamp(0.0, 1.0));
        let earliest = tx_done + profile.one_way_delay + jitter;
        let release = self
            .last_release
            .map_or(earliest, |last| last.max(earliest));
        self.last_release = Some(release);
        Slot { tx_done, release }
    }

    /// If the wire is booked more than [`RUN_AHEAD`] past `now`, the instant to wait for before
    /// reading more.
    pub fn pace_until(&self, now: Instant) -> Option<Instant> {
        let wake = self.next_free?.checked_sub(RUN_AHEAD)?;
        (wake > now).then_some(wake)
    }
}

/// How many bytes of a read go into one scheduled piece.
pub(crate) fn piece_len(profile: &LinkProfile) -> usize {
    match profile.bandwidth_bits_per_s {
        Some(bps) => {
            let per_piece = (bps as u128 * PIECE_TIME.as_nanos() / 8 / 1_000_000_000) as usize;
            per_piece.clamp(MIN_PIECE, MAX_PIECE)
        }
        None => MAX_PIECE,
    }
}

#[cfg(test)]
mod tests {
    use rand::{rngs::StdRng, Rng, SeedableRng};

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn small_chunk_is_released_after_the_one_way_delay() {
        let t0 = Instant::now();
        let mut s = Shaper::default();
        let slot = s.schedule(t0, 10, &LinkProfile::delay(20 * MS), 0.5);
        assert_eq!(slot.release, t0 + 20 * MS);
        assert_eq!(slot.tx_done, t0);
        assert_eq!(s.pace_until(t0), None);
    }

    #[test]
    fn bandwidth_serialises_back_to_back_chunks() {
        let t0 = Instant::now();
        let p = LinkProfile::delay(10 * MS).with_bandwidth(Some(8_000_000)); // 1 byte/µs
        let mut s = Shaper::default();
        let a = s.schedule(t0, 1000, &p, 0.0);
        let b = s.schedule(t0, 1000, &p, 0.0);
        assert_eq!(a.tx_done, t0 + MS);
        assert_eq!(b.tx_done, t0 + 2 * MS);
        assert_eq!(b.release, t0 + 12 * MS);
        // An idle link does not bank credit: a later chunk starts when it arrives.
        let c = s.schedule(t0 + 100 * MS, 1000, &p, 0.0);
        assert_eq!(c.tx_done, t0 + 101 * MS);
    }

    #[test]
    fn reader_is_paced_once_the_wire_is_booked_past_run_ahead() {
        let t0 = Instant::now();
        let p = LinkProfile::ideal().with_bandwidth(Some(8_000_000));
        let mut s = Shaper::default();
        s.schedule(t0, 4000, &p, 0.0);
        assert_eq!(s.pace_until(t0), None);
        s.schedule(t0, 4000, &p, 0.0);
        assert_eq!(s.pace_until(t0), Some(t0 + 8 * MS - RUN_AHEAD));
    }

    #[test]
    fn jitter_never_reorders_and_never_undercuts_the_delay() {
        let t0 = Instant::now();
        let p = LinkProfile::delay(5 * MS).with_jitter(20 * MS);
        let mut rng = StdRng::seed_from_u64(7);
        let mut s = Shaper::default();
        let mut last = t0;
        let mut max_extra = Duration::ZERO;
        for i in 0..1000u32 {
            let now = t0 + Duration::from_micros(u64::from(i) * 100);
            let slot = s.schedule(now, 100, &p, rng.random());
            assert!(slot.release >= last, "chunk {i} overtook its predecessor");
            assert!(slot.release >= now + 5 * MS);
            max_extra = max_extra.max(slot.release - now - 5 * MS);
            last = slot.release;
        }
        assert!(max_extra > 10 * MS, "jitter had no visible effect");
    }

    #[test]
    fn shortening_the_delay_live_does_not_reorder() {
        let t0 = Instant::now();
        let mut s = Shaper::default();
        let a = s.schedule(t0, 1, &LinkProfile::delay(50 * MS), 0.0);
        let b = s.schedule(t0 + MS, 1, &LinkProfile::ideal(), 0.0);
        assert_eq!(b.release, a.release);
    }

    #[test]
    fn pieces_are_about_a_millisecond_of_wire_time_within_bounds() {
        assert_eq!(piece_len(&LinkProfile::ideal()), MAX_PIECE);
        assert_eq!(piece_len(&LinkProfile::wan(MS, 80)), 10_000);
        assert_eq!(piece_len(&LinkProfile::wan(MS, 1)), MIN_PIECE);
        assert_eq!(piece_len(&LinkProfile::wan(MS, 10_000)), MAX_PIECE);
    }
}
