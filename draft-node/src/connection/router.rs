//! The connection's bookkeeping as a plain struct: which sessions are open, which block each has
//! in flight and on which stream generation it was written, and where incoming verdicts go.
//!
//! The rule that makes reconnects lossless: after every (re)connection, each session whose
//! in-flight block was not written on the new stream is asked to resend it with its full history
//! — once; the resend itself is then written on the live stream (or waits for the next one).

use std::collections::HashMap;

use edgespec_proto::domain::SessionError;
use tokio::sync::mpsc::UnboundedSender;

use super::{SessionEvent, Verdict};
use crate::error::GenError;

#[derive(Debug)]
struct InFlight {
    round: u64,
    /// Stream generation the block was written on; `None` while no stream was up.
    written: Option<u64>,
    /// A resend was requested and has not arrived yet.
    resync_asked: bool,
}

#[derive(Debug)]
struct Entry {
    events: UnboundedSender<SessionEvent>,
    in_flight: Option<InFlight>,
}

/// Session routing and in-flight tracking for the one coordinator stream.
#[derive(Debug, Default)]
pub(crate) struct Router {
    sessions: HashMap<u64, Entry>,
    generation: u64,
    connected: bool,
}

impl Router {
    /// Registers a session's event channel.
    pub fn open(&mut self, session: u64, events: UnboundedSender<SessionEvent>) {
        self.sessions.insert(
            session,
            Entry {
                events,
                in_flight: None,
            },
        );
    }

    /// Forgets a session; `true` when the coordinator should be told (stream up).
    pub fn close(&mut self, session: u64) -> bool {
        self.sessions.remove(&session).is_some() && self.connected
    }

    /// Records a block (first send or resend); `true` when it should be written now.
    pub fn on_send(&mut self, session: u64, round: u64) -> bool {
        let Some(entry) = self.sessions.get_mut(&session) else {
            return false;
        };
        entry.in_flight = Some(InFlight {
            round,
            written: self.connected.then_some(self.generation),
            resync_asked: false,
        });
        self.connected
    }

    /// A new stream is up: asks every session whose block is not on it to resend with history.
    /// Returns how many were asked.
    pub fn on_connected(&mut self) -> usize {
        self.generation += 1;
        self.connected = true;
        let generation = self.generation;
        let mut asked = 0;
        self.sessions.retain(|_, entry| {
            let Some(f) = entry.in_flight.as_mut() else {
                return true;
            };
            if f.written == Some(generation) || f.resync_asked {
                return true;
            }
            f.resync_asked = true;
            asked += 1;
            entry
                .events
                .send(SessionEvent::Resync { round: f.round })
                .is_ok()
        });
        asked
    }

    /// The stream broke.
    pub fn on_disconnected(&mut self) {
        self.connected = false;
    }

    /// Routes a verdict to its session if it answers the block in flight (stale ones are dropped).
    pub fn deliver_verdict(&mut self, v: Verdict) -> bool {
        self.deliver(v.session_id, v.round, SessionEvent::Verdict(v))
    }

    /// Routes a per-session error like a verdict.
    pub fn deliver_error(&mut self, e: SessionError) -> bool {
        self.deliver(e.session_id, e.round, SessionEvent::Error(e))
    }

    /// Fails every open session (e.g. the fleet's model changed under us).
    pub fn fail_all(&mut self, err: &GenError) {
        for entry in self.sessions.values_mut() {
            entry.in_flight = None;
            let _ = entry.events.send(SessionEvent::Fatal(err.clone()));
        }
    }

    /// Open sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    fn deliver(&mut self, session: u64, round: u64, event: SessionEvent) -> bool {
        let Some(entry) = self.sessions.get_mut(&session) else {
            return false;
        };
        match &entry.in_flight {
            Some(f) if f.round == round => {
                entry.in_flight = None;
                entry.events.send(event).is_ok()
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgespec_proto::domain::ErrorCode;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    fn verdict(session_id: u64, round: u64) -> Verdict {
        Verdict {
            session_id,
            round,
            accepted: 0,
            next_token: 7,
            committed_len: 3,
            next_gamma: 2,
            client_send_unix_ns: 0,
            coordinator_ns: 0,
            verify: Default::default(),
            verifier_id: String::new(),
            next_method: None,
        }
    }

    fn open(r: &mut Router, id: u64) -> UnboundedReceiver<SessionEvent> {
        let (tx, rx) = unbounded_channel();
        r.open(id, tx);
        rx
    }

    #[test]
    fn verdicts_reach_their_session_once_and_stale_ones_are_dropped() {
        let mut r = Router::default();
        r.on_connected();
        let mut rx = open(&mut r, 1);
        assert!(r.on_send(1, 5));
        assert!(!r.deliver_verdict(verdict(1, 4)), "wrong round");
        assert!(r.deliver_verdict(verdict(1, 5)));
        assert!(!r.deliver_verdict(verdict(1, 5)), "applied at most once");
        assert!(!r.deliver_verdict(verdict(2, 5)), "unknown session");
        assert!(matches!(rx.try_recv(), Ok(SessionEvent::Verdict(v)) if v.round == 5));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_reconnect_asks_exactly_the_unwritten_blocks_for_one_resend() {
        let mut r = Router::default();
        r.on_connected();
        let mut a = open(&mut r, 1);
        let mut b = open(&mut r, 2);
        let mut idle = open(&mut r, 3);
        assert!(r.on_send(1, 1)); // written on generation 1
        r.on_disconnected();
        assert!(!r.on_send(2, 1), "nothing is written while down");
        assert_eq!(r.on_connected(), 2);
        assert!(matches!(
            a.try_recv(),
            Ok(SessionEvent::Resync { round: 1 })
        ));
        assert!(matches!(
            b.try_recv(),
            Ok(SessionEvent::Resync { round: 1 })
        ));
        assert!(idle.try_recv().is_err());
        // Another reconnect before the resends arrive asks nobody twice.
        r.on_disconnected();
        assert_eq!(r.on_connected(), 0);
        // The resends arrive and are written on the live stream; a further reconnect asks again.
        assert!(r.on_send(1, 1));
        assert!(r.on_send(2, 1));
        assert_eq!(r.on_connected(), 2);
    }

    #[test]
    fn errors_route_like_verdicts_and_close_reports_whether_to_tell_the_coordinator() {
        let mut r = Router::default();
        let mut rx = open(&mut r, 9);
        r.on_send(9, 2);
        let e = SessionError {
            session_id: 9,
            round: 2,
            code: ErrorCode::ResyncNeeded,
            message: String::new(),
        };
        assert!(r.deliver_error(e));
        assert!(matches!(rx.try_recv(), Ok(SessionEvent::Error(_))));
        assert!(!r.close(9), "stream down: nothing to tell");
        r.on_connected();
        let _rx = open(&mut r, 10);
        assert!(r.close(10));
        assert!(!r.close(10));
        assert_eq!(r.len(), 0);
    }
}
