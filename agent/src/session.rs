//! The agent's conversation with the directory: connect, register the instance, heartbeat at
//! the rate the directory dictates (SwarmKit; an acknowledgement asked for every
//! [`HEARTBEATS_PER_ACK`]-th heartbeat, heartbeats going on while it is awaited), send
//! health changes at once, and deregister on request. Reconnects forever with
//! [`Backoff::reconnect`] (Baker: retry indefinitely; SwarmKit: exponential backoff with full
//! jitter). A conversation that ends while its QUIC connection stays open (the instance's
//! TTL lapsed and a heartbeat was refused, the directory dropped a silent stream, an
//! acknowledgement came late) registers again over that connection, on a new stream, without
//! a new handshake (SwarmKit: a node whose session ended registers again over its
//! connection): a directory that fell behind is not handed a mutual-TLS handshake per agent
//! on top of the heartbeats it is late with.
//!
//! One task runs [`run`]; the agent asks it to deregister by sending a close reason on a
//! oneshot channel, and reads whether it is connected from an [`AtomicBool`].

use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};
use usher_shared::backoff::Backoff;
use usher_shared::codec::{
    read_frame_owned, write_frame, FrameError, MAX_DIRECTORY_FRAME, MAX_NODE_FRAME,
};
use usher_shared::protocol::{
    DirectoryMessage, NodeMessage, Registration, Role, HEARTBEATS_PER_ACK,
};
use usher_shared::routes::{Instance, InstanceState};
use usher_shared::session::{open, open_on, Session, SessionError};

/// A heartbeat that asked for an acknowledgement (every [`HEARTBEATS_PER_ACK`]-th) and got
/// none within this time means the conversation is dead, and the agent registers again. The
/// agent keeps heartbeating on schedule meanwhile, so an unreachable directory is noticed by
/// QUIC (its idle timeout for agents is at least 5 s) and this catches a directory that is
/// reachable but does not answer. Measured in `docs/BENCHMARKS.md` (Stall): after a 4 s
/// pause of the directory at 3,000 agents, a 5 s wait with heartbeats on schedule made
/// 44–362 re-registrations against 1,676–1,903 with 3 s in silence, and 30% fewer
/// handshakes (medians of 13 and 11 runs).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// A registration that got no reply within this time failed; the agent tries again. While
/// it waits it can send nothing, and a wait as long as [`ACK_TIMEOUT`] lost more
/// connections after a directory stall (`docs/BENCHMARKS.md`, Stall).
pub const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(3);

/// Bound on connecting and saying hello (QUIC gives up on a silent peer after its 5 s idle
/// timeout; this also bounds name resolution).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on writing one frame (a stalled stream is a dead connection).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(3);

/// Bound on delivering `Deregister` before the connection is closed anyway.
pub const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(1);

/// Heartbeat intervals from the directory are clamped to this range, so a bad value neither
/// spins the agent nor lets the TTL lapse unnoticed.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(50);
/// See [`MIN_HEARTBEAT`].
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(60);

/// Why a connection to the directory failed or ended.
#[derive(Debug, Error)]
pub enum LinkError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("no {what} from the directory within {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("the stream to the directory is already closed")]
    StreamClosed,
}

impl From<FrameError> for LinkError {
    fn from(e: FrameError) -> Self {
        LinkError::Session(SessionError::Frame(e))
    }
}

/// What the session task needs.
pub struct SessionContext {
    pub endpoint: quinn::Endpoint,
    /// The directory's address, `host:port`.
    pub directory: String,
    /// The node name sent in the hello (`<hostname>/<pid>`).
    pub node: String,
    /// The instance to register; its `state` is replaced by the current one at each register.
    pub instance: Instance,
    /// The instance's current state; a change is sent at once.
    pub state: watch::Receiver<InstanceState>,
    /// Set while registered with the directory.
    pub connected: Arc<AtomicBool>,
}

/// Runs the session until asked to stop: a close reason on `stop` deregisters the instance (if
/// connected) and closes the connection with that reason; a dropped sender just closes it.
/// Returns whether the directory received the `Deregister`.
pub async fn run(mut ctx: SessionContext, mut stop: oneshot::Receiver<&'static str>) -> bool {
    let mut backoff = Backoff::reconnect();
    let mut link_log = LinkLog::default();
    // The connection of the last conversation, while it is still open.
    let mut open_connection = None;
    loop {
        debug!(attempt = backoff.attempts(), "connecting to the directory");
        let attempt = tokio::select! {
            biased;
            _ = &mut stop => return false,
            attempt = connect(&mut ctx, open_connection.take()) => attempt,
        };
        let error = match attempt {
            Ok((session, interval)) => {
                backoff.reset();
                link_log.connected(session.epoch);
                ctx.connected.store(true, Ordering::Relaxed);
                let end = heartbeat(session, interval, &mut ctx, &mut stop).await;
                ctx.connected.store(false, Ordering::Relaxed);
                match end {
                    Ok(deregistered) => return deregistered,
                    Err(Ended { error, connection }) => {
                        open_connection = connection;
                        error
                    }
                }
            }
            Err(e) => e,
        };
        link_log.failed(&error, open_connection.is_some());
        let delay = backoff.next_delay();
        tokio::select! {
            biased;
            _ = &mut stop => return false,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Logs link changes once per change, not once per retry.
#[derive(Default)]
struct LinkLog {
    /// `None` before the first attempt, then whether the last attempt ended connected.
    connected: Option<bool>,
}

impl LinkLog {
    fn connected(&mut self, epoch: u64) {
        info!(epoch, "registered with the directory");
        self.connected = Some(true);
    }

    /// A conversation failed; `connection_open`: its connection did not, and the next
    /// registration goes over it.
    fn failed(&mut self, error: &LinkError, connection_open: bool) {
        match self.connected {
            Some(true) if connection_open => {
                warn!(error = %error, "the conversation with the directory ended; registering again")
            }
            Some(true) => warn!(error = %error, "lost the directory; reconnecting"),
            None => warn!(error = %error, "cannot reach the directory; retrying"),
            Some(false) => debug!(error = %error, "directory still unreachable"),
        }
        self.connected = Some(false);
    }
}

/// Writes one frame, bounded by [`WRITE_TIMEOUT`].
async fn write_bounded(stream: &mut quinn::SendStream, msg: &NodeMessage) -> Result<(), LinkError> {
    match tokio::time::timeout(WRITE_TIMEOUT, write_frame(stream, msg, MAX_NODE_FRAME)).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(LinkError::Timeout {
            what: "room to write",
            after: WRITE_TIMEOUT,
        }),
    }
}

fn clamp_interval(ms: u64) -> Duration {
    Duration::from_millis(ms).clamp(MIN_HEARTBEAT, MAX_HEARTBEAT)
}

/// Connects (or opens a new stream on `open_connection`, the last conversation's connection,
/// while it is still open), says hello, registers; returns the session and the first
/// heartbeat interval.
async fn connect(
    ctx: &mut SessionContext,
    open_connection: Option<quinn::Connection>,
) -> Result<(Session, Duration), LinkError> {
    let opening = async {
        match open_connection.filter(|c| c.close_reason().is_none()) {
            Some(connection) => {
                debug!("registering again over the open connection");
                open_on(connection, Role::Agent, &ctx.node).await
            }
            None => open(&ctx.endpoint, &ctx.directory, Role::Agent, &ctx.node).await,
        }
    };
    let mut session = tokio::time::timeout(CONNECT_TIMEOUT, opening)
        .await
        .map_err(|_| LinkError::Timeout {
            what: "welcome",
            after: CONNECT_TIMEOUT,
        })??;
    let mut instance = ctx.instance.clone();
    instance.state = *ctx.state.borrow_and_update();
    let registered = async {
        write_bounded(
            &mut session.send,
            &NodeMessage::Register(Registration { instance }),
        )
        .await?;
        let reply = tokio::time::timeout(REGISTRATION_TIMEOUT, session.recv())
            .await
            .map_err(|_| LinkError::Timeout {
                what: "registration reply",
                after: REGISTRATION_TIMEOUT,
            })??;
        match reply {
            DirectoryMessage::Registered {
                next_heartbeat_ms,
                ttl_ms,
            } => {
                debug!(next_heartbeat_ms, ttl_ms, "registered");
                Ok(clamp_interval(next_heartbeat_ms))
            }
            other => Err(LinkError::Session(SessionError::Unexpected {
                expected: "registered",
                got: other.kind(),
            })),
        }
    };
    match registered.await {
        Ok(interval) => Ok((session, interval)),
        Err(e) => {
            session.close("registration failed");
            Err(e)
        }
    }
}

/// How a conversation ended without being asked to.
struct Ended {
    error: LinkError,
    /// Its connection, if still open: the next registration goes over it.
    connection: Option<quinn::Connection>,
}

/// Heartbeats until the conversation fails (`Err`) or `stop` says to leave
/// (`Ok(deregistered)`).
async fn heartbeat(
    session: Session,
    first_interval: Duration,
    ctx: &mut SessionContext,
    stop: &mut oneshot::Receiver<&'static str>,
) -> Result<bool, Ended> {
    let Session {
        connection,
        send: send_stream,
        recv,
        epoch,
    } = session;
    let mut writer = Writer {
        connection: connection.clone(),
        send: send_stream,
    };
    let mut reader = pin!(read_frame_owned(recv, MAX_DIRECTORY_FRAME));
    let mut pacer = Pacer::new(first_interval, Instant::now());
    let result = loop {
        tokio::select! {
            biased;
            reason = &mut *stop => {
                let delivered = match reason {
                    Ok(reason) => writer.deregister(reason).await,
                    Err(_) => {
                        connection.close(0u32.into(), b"agent stopping");
                        false
                    }
                };
                return Ok(delivered);
            }
            changed = ctx.state.changed() => {
                if changed.is_err() {
                    // The agent is gone without asking to deregister.
                    break Ok(false);
                }
                let state = *ctx.state.borrow_and_update();
                debug!(state = state.as_str(), "state changed; heartbeat now");
                if let Err(e) = writer.heartbeat(state, false).await {
                    break Err(e);
                }
            }
            _ = tokio::time::sleep_until(pacer.next_at) => {
                let state = *ctx.state.borrow();
                let ask = pacer.heartbeat_due(Instant::now());
                if let Err(e) = writer.heartbeat(state, ask).await {
                    break Err(e);
                }
            }
            (recv, frame) = &mut reader => {
                reader.set(read_frame_owned(recv, MAX_DIRECTORY_FRAME));
                match frame {
                    Ok(Some(DirectoryMessage::HeartbeatAck { next_heartbeat_ms })) => {
                        pacer.acknowledged(clamp_interval(next_heartbeat_ms), Instant::now());
                    }
                    Ok(Some(DirectoryMessage::Error { code, message })) => {
                        break Err(SessionError::Refused(format!("{code:?}: {message}")).into());
                    }
                    Ok(Some(other)) => {
                        break Err(SessionError::Unexpected { expected: "heartbeat_ack", got: other.kind() }.into());
                    }
                    Ok(None) => break Err(SessionError::Closed.into()),
                    Err(e) => break Err(e.into()),
                }
            }
            _ = sleep_until_opt(pacer.ack_deadline) => {
                break Err(LinkError::Timeout { what: "heartbeat acknowledgement", after: ACK_TIMEOUT });
            }
        }
    };
    // The conversation's stream ends here (quinn finishes a dropped send stream); the
    // connection too, unless the conversation failed while it stayed open.
    drop(writer);
    match result {
        Err(error) if connection.close_reason().is_none() => {
            debug!(epoch, error = %error, "conversation over; the connection stays open");
            Err(Ended {
                error,
                connection: Some(connection),
            })
        }
        result => {
            // The cause is read before closing, which would become it.
            let result = result.map_err(|e| Ended {
                error: match e {
                    LinkError::Session(e) => LinkError::Session(e.with_cause(&connection)),
                    e => e,
                },
                connection: None,
            });
            debug!(epoch, "closing the directory connection");
            connection.close(0u32.into(), b"agent reconnecting");
            result
        }
    }
}

/// When the agent heartbeats and which heartbeats ask for an acknowledgement: every
/// [`HEARTBEATS_PER_ACK`]-th one asks, and the acknowledgement dictates the interval and
/// schedules the next heartbeat from its arrival (SwarmKit: the directory dictates the rate).
/// Heartbeats go on at the last dictated interval while the acknowledgement is awaited
/// (SwarmKit's agent waits for each reply instead), asking for nothing more, so a directory
/// that fell behind finds a fresh heartbeat from every agent when it catches up.
#[derive(Debug)]
struct Pacer {
    interval: Duration,
    /// When the next heartbeat is due.
    next_at: Instant,
    /// Heartbeats sent on schedule since the last that asked for an acknowledgement, not
    /// counting those sent while it was awaited.
    unasked: u32,
    /// When the acknowledgement asked for is overdue ([`ACK_TIMEOUT`]).
    ack_deadline: Option<Instant>,
}

impl Pacer {
    fn new(interval: Duration, now: Instant) -> Self {
        Pacer {
            interval,
            next_at: now + interval,
            unasked: 0,
            ack_deadline: None,
        }
    }

    /// The scheduled heartbeat is sent now; returns whether it asks for an acknowledgement.
    fn heartbeat_due(&mut self, now: Instant) -> bool {
        self.next_at = now + self.interval;
        if self.ack_deadline.is_some() {
            return false;
        }
        self.unasked += 1;
        if self.unasked < HEARTBEATS_PER_ACK {
            return false;
        }
        self.unasked = 0;
        self.ack_deadline = Some(now + ACK_TIMEOUT);
        true
    }

    /// An acknowledgement with the interval to keep. An older directory acknowledges every
    /// heartbeat: only the one asked for (or one after it) reschedules.
    fn acknowledged(&mut self, interval: Duration, now: Instant) {
        self.interval = interval;
        if self.ack_deadline.take().is_some() {
            self.next_at = now + interval;
        }
    }
}

/// Sleeps until `at`, or forever if `None`.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The sending half of a registered connection.
struct Writer {
    connection: quinn::Connection,
    send: quinn::SendStream,
}

impl Writer {
    /// Sends a heartbeat; `ack`: ask for an acknowledgement.
    async fn heartbeat(&mut self, state: InstanceState, ack: bool) -> Result<(), LinkError> {
        write_bounded(&mut self.send, &NodeMessage::Heartbeat { state, ack }).await
    }

    /// Sends `Deregister`, finishes the stream and waits (bounded) until the directory has
    /// acknowledged every byte, then closes the connection with `reason`.
    async fn deregister(&mut self, reason: &str) -> bool {
        let delivered = tokio::time::timeout(DEREGISTER_TIMEOUT, async {
            write_bounded(&mut self.send, &NodeMessage::Deregister).await?;
            self.send.finish().map_err(|_| LinkError::StreamClosed)?;
            // Resolves once the peer acknowledged all stream data, or stopped the stream, or
            // the directory closed the connection (after handling the deregistration).
            let _ = self.send.stopped().await;
            Ok::<_, LinkError>(())
        })
        .await;
        let delivered = match delivered {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot deregister from the directory");
                false
            }
            Err(_) => {
                warn!(after = ?DEREGISTER_TIMEOUT, "the directory did not confirm the deregistration in time");
                false
            }
        };
        self.connection.close(0u32.into(), reason.as_bytes());
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fifth_heartbeat_asks_and_the_acknowledgement_reschedules() {
        let start = Instant::now();
        let second = Duration::from_secs(1);
        let mut pacer = Pacer::new(second, start);
        for n in 1..HEARTBEATS_PER_ACK {
            let now = pacer.next_at;
            assert_eq!(now, start + second * n);
            assert!(!pacer.heartbeat_due(now), "heartbeat {n} asks for nothing");
            assert_eq!(pacer.ack_deadline, None);
        }
        let now = pacer.next_at;
        assert!(pacer.heartbeat_due(now), "the fifth asks");
        assert_eq!(pacer.ack_deadline, Some(now + ACK_TIMEOUT));
        assert_eq!(
            pacer.next_at,
            now + second,
            "the schedule goes on meanwhile"
        );

        // The acknowledgement dictates a new interval and schedules the next heartbeat from
        // its arrival; the interval is kept until the next acknowledgement.
        let later = now + Duration::from_millis(20);
        pacer.acknowledged(Duration::from_millis(900), later);
        assert_eq!(pacer.ack_deadline, None);
        assert_eq!(pacer.next_at, later + Duration::from_millis(900));
        let now = pacer.next_at;
        assert!(!pacer.heartbeat_due(now));
        assert_eq!(pacer.next_at, now + Duration::from_millis(900));
    }

    #[test]
    fn heartbeats_go_on_unasked_while_an_acknowledgement_is_awaited() {
        let start = Instant::now();
        let second = Duration::from_secs(1);
        let mut pacer = Pacer::new(second, start);
        for _ in 0..HEARTBEATS_PER_ACK {
            let now = pacer.next_at;
            pacer.heartbeat_due(now);
        }
        let deadline = pacer.ack_deadline.expect("the fifth asked");
        // A directory that fell behind: heartbeats on schedule until the deadline, none of
        // them asking again or moving the deadline.
        let mut sent = 0;
        while pacer.next_at < deadline {
            let now = pacer.next_at;
            assert!(
                !pacer.heartbeat_due(now),
                "one acknowledgement awaited at a time"
            );
            assert_eq!(pacer.ack_deadline, Some(deadline));
            sent += 1;
        }
        assert_eq!(sent, 4, "one a second for the 5 s it is awaited");

        // It comes late but in time: the count starts again from it.
        pacer.acknowledged(second, deadline - Duration::from_millis(10));
        for n in 1..HEARTBEATS_PER_ACK {
            let now = pacer.next_at;
            assert!(
                !pacer.heartbeat_due(now),
                "heartbeat {n} after it asks for nothing"
            );
        }
        assert!(
            pacer.heartbeat_due(pacer.next_at),
            "the fifth after it asks"
        );
    }

    #[test]
    fn unasked_acknowledgements_from_an_older_directory_keep_the_schedule() {
        let start = Instant::now();
        let mut pacer = Pacer::new(Duration::from_secs(1), start);
        let now = pacer.next_at;
        assert!(!pacer.heartbeat_due(now));
        let scheduled = pacer.next_at;
        pacer.acknowledged(Duration::from_millis(1100), now + Duration::from_millis(5));
        assert_eq!(
            pacer.next_at, scheduled,
            "not asked for: the schedule stands"
        );
        assert_eq!(
            pacer.interval,
            Duration::from_millis(1100),
            "the interval is taken"
        );
    }

    #[test]
    fn directory_intervals_are_clamped() {
        assert_eq!(clamp_interval(1000), Duration::from_secs(1));
        assert_eq!(clamp_interval(0), MIN_HEARTBEAT);
        assert_eq!(clamp_interval(u64::MAX), MAX_HEARTBEAT);
    }
}
