//! What a link looks like: per-direction delay, jitter and bandwidth, and the emulator's config.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::LinkError;

/// How one direction of a link shapes traffic.
///
/// Serialised with humantime durations: `{ one_way_delay = "20ms", jitter = "2ms",
/// bandwidth_bits_per_s = 50000000 }`; missing keys mean "no impairment".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkProfile {
    /// Propagation delay added to every chunk.
    #[serde(with = "humantime_serde")]
    pub one_way_delay: Duration,
    /// Extra delay drawn uniformly from `[0, jitter]` per chunk. Never reorders bytes: a chunk is
    /// never released before the one read ahead of it, so jitter shows up as bunching.
    #[serde(with = "humantime_serde")]
    pub jitter: Duration,
    /// Line rate; `None` is unlimited. `Some(0)` is rejected by [`LinkConfig::validate`].
    pub bandwidth_bits_per_s: Option<u64>,
}

impl LinkProfile {
    /// No delay, no jitter, unlimited bandwidth: a plain TCP proxy.
    pub const fn ideal() -> Self {
        Self {
            one_way_delay: Duration::ZERO,
            jitter: Duration::ZERO,
            bandwidth_bits_per_s: None,
        }
    }

    /// Only a fixed one-way delay.
    pub const fn delay(one_way_delay: Duration) -> Self {
        Self {
            one_way_delay,
            jitter: Duration::ZERO,
            bandwidth_bits_per_s: None,
        }
    }

    /// A WAN path with round-trip time `rtt` (split evenly between the directions) and
    /// `mbit_per_s` megabits (10^6 bits) per second in this direction.
    pub const fn wan(rtt: Duration, mbit_per_s: u64) -> Self {
        Self {
            one_way_delay: Duration::from_nanos((rtt.as_nanos() / 2) as u64),
            jitter: Duration::ZERO,
            bandwidth_bits_per_s: Some(mbit_per_s.saturating_mul(1_000_000)),
        }
    }

    pub const fn with_jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    pub const fn with_bandwidth(mut self, bits_per_s: Option<u64>) -> Self {
        self.bandwidth_bits_per_s = bits_per_s;
        self
    }

    /// Time to put `len` bytes on the wire at this profile's line rate.
    pub fn serialisation_time(&self, len: usize) -> Duration {
        match self.bandwidth_bits_per_s {
            Some(bps) if bps > 0 => {
                let nanos = (len as u128 * 8 * 1_000_000_000).div_ceil(bps as u128);
                Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
            }
            _ => Duration::ZERO,
        }
    }

    pub(crate) fn validate(&self, direction: Direction) -> Result<(), LinkError> {
        if self.bandwidth_bits_per_s == Some(0) {
            return Err(LinkError::ZeroBandwidth { direction });
        }
        Ok(())
    }
}

/// Which way bytes flow through the emulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client → upstream.
    Up,
    /// Upstream → client.
    Down,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Up => "up",
            Direction::Down => "down",
        })
    }
}

/// How [`LinkControl::cut`](super::LinkControl::cut) makes peers notice the outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CutMode {
    /// Connections are reset (RST) at once; new ones are accepted and reset.
    #[default]
    Reset,
    /// Connections go silent: nothing is forwarded and nothing is closed, so peers only notice
    /// through their own timeouts or keepalives. New ones are accepted and held silent. When the
    /// link is restored, every connection held this way is reset (its state was lost).
    Blackhole,
}

/// Everything [`LinkEmulator::spawn`](super::LinkEmulator::spawn) needs besides the sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkConfig {
    /// Client → upstream.
    pub up: LinkProfile,
    /// Upstream → client.
    pub down: LinkProfile,
    /// What a plain `cut()` does.
    pub cut_mode: CutMode,
    /// Seeds the jitter RNG (each connection and direction derives its own stream).
    pub seed: u64,
    /// Connections (forwarding or held by a blackhole) beyond this wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self::symmetric(LinkProfile::ideal())
    }
}

impl From<LinkProfile> for LinkConfig {
    fn from(profile: LinkProfile) -> Self {
        Self::symmetric(profile)
    }
}

impl LinkConfig {
    /// The same profile both ways.
    pub const fn symmetric(profile: LinkProfile) -> Self {
        Self::asymmetric(profile, profile)
    }

    pub const fn asymmetric(up: LinkProfile, down: LinkProfile) -> Self {
        Self {
            up,
            down,
            cut_mode: CutMode::Reset,
            seed: 0,
            max_connections: 1024,
        }
    }

    pub fn validate(&self) -> Result<(), LinkError> {
        self.up.validate(Direction::Up)?;
        self.down.validate(Direction::Down)?;
        if self.max_connections == 0 {
            return Err(LinkError::ZeroMaxConnections);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde::de::{value::MapDeserializer, IntoDeserializer};

    use super::*;

    #[test]
    fn wan_splits_rtt_and_scales_megabits() {
        let p = LinkProfile::wan(Duration::from_millis(40), 50);
        assert_eq!(p.one_way_delay, Duration::from_millis(20));
        assert_eq!(p.bandwidth_bits_per_s, Some(50_000_000));
    }

    #[test]
    fn serialisation_time_is_bits_over_rate() {
        let p = LinkProfile::ideal().with_bandwidth(Some(8_000));
        assert_eq!(p.serialisation_time(1_000), Duration::from_secs(1));
        assert_eq!(
            LinkProfile::ideal().serialisation_time(1 << 30),
            Duration::ZERO
        );
    }

    #[test]
    fn zero_bandwidth_and_zero_connections_are_rejected() {
        let mut c = LinkConfig::symmetric(LinkProfile::ideal().with_bandwidth(Some(0)));
        assert!(matches!(
            c.validate(),
            Err(LinkError::ZeroBandwidth {
                direction: Direction::Up
            })
        ));
        c = LinkConfig::default();
        c.max_connections = 0;
        assert!(c.validate().is_err());
        assert!(LinkConfig::default().validate().is_ok());
    }

    #[test]
    fn profile_deserialises_humantime_and_defaults_missing_keys() {
        let fields = vec![("one_way_delay", "25ms"), ("jitter", "1ms")];
        let de: MapDeserializer<'_, _, serde::de::value::Error> =
            MapDeserializer::new(fields.into_iter().map(|(k, v)| (k, v.into_deserializer())));
        let p = LinkProfile::deserialize(de).expect("valid profile");
        assert_eq!(
            p,
            LinkProfile::delay(Duration::from_millis(25)).with_jitter(Duration::from_millis(1))
        );
    }
}
