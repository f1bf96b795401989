//! What the node knows about its coordinator link, as admission, `/healthz` and `/readyz` see it:
//! never connected yet, up, down since a moment, or refused (the fleet does not serve this draft
//! model). The connection task publishes it on a `watch`.

use std::time::{Duration, Instant};

/// State of the coordinator link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkStatus {
    /// No stream yet since the node started (`last_error`: why the latest attempt failed).
    Connecting {
        since: Instant,
        last_error: Option<String>,
    },
    /// A stream is up.
    Up,
    /// The stream broke at `since`; reconnecting.
    Down {
        since: Instant,
        last_error: Option<String>,
    },
    /// The coordinator refuses our model (message says why); still retrying.
    Refused(String),
}

impl LinkStatus {
    /// Not connected since start.
    pub fn connecting() -> Self {
        LinkStatus::Connecting {
            since: Instant::now(),
            last_error: None,
        }
    }

    /// How long the link has been away (`None` while up or refused).
    pub fn away_for(&self) -> Option<Duration> {
        match self {
            LinkStatus::Connecting { since, .. } | LinkStatus::Down { since, .. } => {
                Some(since.elapsed())
            }
            LinkStatus::Up | LinkStatus::Refused(_) => None,
        }
    }

    /// Records why the latest attempt failed (kept while connecting or down; a refusal stays
    /// the more useful explanation).
    pub fn note_error(&mut self, reason: &str) {
        if let LinkStatus::Connecting { last_error, .. } | LinkStatus::Down { last_error, .. } =
            self
        {
            *last_error = Some(reason.to_string());
        }
    }

    /// Why the link is not up, for an operator (`/readyz`); `None` while up.
    pub fn describe(&self, address: &str) -> Option<String> {
        let last = |e: &Option<String>| match e {
            Some(e) => format!(": {e}"),
            None => String::new(),
        };
        match self {
            LinkStatus::Up => None,
            LinkStatus::Connecting { since, last_error } => Some(format!(
                "connecting to the coordinator at {address} since {}s ago (not reached since \
                 start){}",
                since.elapsed().as_secs(),
                last(last_error)
            )),
            LinkStatus::Down { since, last_error } => Some(format!(
                "reconnecting to the coordinator at {address} (stream lost {}s ago){}",
                since.elapsed().as_secs(),
                last(last_error)
            )),
            LinkStatus::Refused(why) => Some(format!(
                "the coordinator at {address} refuses this draft model: {why}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_kept_while_away_and_described() {
        let mut s = LinkStatus::connecting();
        s.note_error("connection refused");
        let text = s.describe("https://c:50051").unwrap();
        assert!(
            text.contains("connecting") && text.contains("https://c:50051"),
            "{text}"
        );
        assert!(text.ends_with(": connection refused"), "{text}");
        assert!(s.away_for().is_some());
        let mut up = LinkStatus::Up;
        up.note_error("x");
        assert_eq!(up, LinkStatus::Up);
        assert_eq!(up.describe("a"), None);
        let mut refused = LinkStatus::Refused("model mismatch".into());
        refused.note_error("timeout");
        assert!(refused.describe("a").unwrap().contains("model mismatch"));
        assert_eq!(refused.away_for(), None);
    }
}
