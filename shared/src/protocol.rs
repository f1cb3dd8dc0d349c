//! The control-plane messages (Baker's discovery protocol, carried over QUIC streams).
//!
//! Every stream starts with [`NodeMessage::Hello`] from the node; the directory answers
//! [`DirectoryMessage::Welcome`] or [`DirectoryMessage::Error`] and closes the stream.
//!
//! Agent stream: `Hello`, `Register`, then `Heartbeat` at the interval the directory dictates
//! in `Registered` and each `HeartbeatAck` (SwarmKit: the manager sets the rate, with jitter),
//! at once on a health change, and `Deregister` on a clean shutdown. The agent asks for an
//! acknowledgement every [`HEARTBEATS_PER_ACK`]-th heartbeat only, not every one.
//!
//! Sidecar stream: `Hello`, `Subscribe` with the (epoch, revision) it holds; the directory
//! answers with the missed `Deltas` or a full snapshot (`SnapshotChunk`s), then batched
//! `Deltas` (SwarmKit: 100 changes or 100 ms). On the same stream the sidecar sends a
//! `LoadReport` every second (Waiter/WSO2: the autoscaler's signal).

use serde::{Deserialize, Serialize};

use crate::routes::{Change, Instance, InstanceState, ServiceVersion};

/// The protocol version this build speaks; a peer with another version is refused.
pub const PROTOCOL_VERSION: u16 = 1;

/// The compact layout of the route-table feed this build reads and writes: a sidecar sends it
/// in [`NodeMessage::Subscribe`], and a directory of the same layout then writes that
/// subscription's `SnapshotChunk`s and `Deltas` with [`crate::codec::Encoding::Compact`].
/// Named fields cost bytes on every delivery: a batch of 10 changes took 1,293 bytes named
/// and 549 compact, so it needed two 1,200-byte QUIC datagrams (and the sidecar's immediate
/// ACK of the pair) where one does (docs/BENCHMARKS.md). Bump it whenever `Instance`,
/// `Change`, `ServiceVersion` or those two messages gain, lose or reorder a field: a
/// directory and a sidecar that disagree fall back to named fields, which both read.
pub const FEED_FORMAT: u16 = 1;

/// The encoding a directory writes a subscription's feed in, from the `feed_format` the
/// sidecar sent: compact for this build's [`FEED_FORMAT`], named fields for any other (0 from
/// sidecars that predate it).
pub fn feed_encoding(feed_format: u16) -> crate::codec::Encoding {
    if feed_format == FEED_FORMAT {
        crate::codec::Encoding::Compact
    } else {
        crate::codec::Encoding::Named
    }
}

/// An agent asks for a [`DirectoryMessage::HeartbeatAck`] with every fifth heartbeat
/// ([`NodeMessage::Heartbeat`]`{ ack: true }`), and keeps the interval of the last one in
/// between. Over QUIC an acknowledgement costs the directory two datagrams beyond the
/// heartbeat (the acknowledgement out, the agent's QUIC ACK of it in), so acknowledging every
/// heartbeat tripled the datagrams of the fleet's largest flow; with one in five, five
/// heartbeats cost 11 datagrams instead of 15. The TTL is unchanged (heartbeats still come at
/// the interval); an agent notices a dead conversation within five intervals plus its
/// acknowledgement timeout, and a dead directory or path sooner through QUIC itself (a
/// stateless reset after a restart, the idle timeout otherwise).
pub const HEARTBEATS_PER_ACK: u32 = 5;

fn yes() -> bool {
    true
}

/// What a node is, as it says in its hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Agent,
    Sidecar,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Agent => "agent",
            Role::Sidecar => "sidecar",
        })
    }
}

/// The first frame on every stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u16,
    pub role: Role,
    /// A name for logs: host name and process id of the node.
    pub node: String,
}

/// What an agent says about its instance when registering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub instance: Instance,
}

/// The requests of one service version at one sidecar (WSO2: requests in flight).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionLoad {
    pub service: String,
    pub version: String,
    /// Requests sent to an instance and not yet finished.
    pub in_flight: u32,
    /// Requests waiting for a free slot.
    pub queued: u32,
    /// The instances with requests in flight, busiest first, at most
    /// [`MAX_REPORTED_INSTANCES`]; an instance left out has none. The autoscaler stops the
    /// idlest instances first (Waiter: scale down kills idle instances). Absent in reports
    /// from older sidecars.
    #[serde(default)]
    pub instances: Vec<InstanceLoad>,
}

/// The requests one sidecar has in flight on one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceLoad {
    /// The instance id, as registered.
    pub id: String,
    pub in_flight: u32,
}

/// Most versions one load report may carry (keeps the frame far below 64 KiB).
pub const MAX_REPORTED_VERSIONS: usize = 512;

/// Most instance entries one load report may carry over all its versions.
pub const MAX_REPORTED_INSTANCES: usize = 256;

/// Bytes a load report's names may take in all (service, version and instance ids), so the
/// encoded frame stays below [`crate::codec::MAX_NODE_FRAME`] (64 KiB) whatever the names.
pub const MAX_LOAD_REPORT_NAME_BYTES: usize = 40 * 1024;

/// Cuts `versions` (ordered most important first) to what one load report may carry: at most
/// [`MAX_REPORTED_VERSIONS`] versions, [`MAX_REPORTED_INSTANCES`] instance entries and
/// [`MAX_LOAD_REPORT_NAME_BYTES`] of names. Versions are kept whole or, past the budget,
/// dropped; instance entries past the budget are dropped (those instances count as idle).
pub fn fit_load_report(versions: &mut Vec<VersionLoad>) {
    let mut names = 0usize;
    let mut instances = 0usize;
    let mut kept = 0usize;
    for v in versions.iter_mut() {
        let cost = v.service.len() + v.version.len();
        if kept == MAX_REPORTED_VERSIONS || names + cost > MAX_LOAD_REPORT_NAME_BYTES {
            break;
        }
        names += cost;
        kept += 1;
        let mut fit = 0;
        for i in &v.instances {
            if instances == MAX_REPORTED_INSTANCES
                || names + i.id.len() > MAX_LOAD_REPORT_NAME_BYTES
            {
                break;
            }
            names += i.id.len();
            instances += 1;
            fit += 1;
        }
        v.instances.truncate(fit);
    }
    versions.truncate(kept);
}

/// Why the directory refuses a load report (it keeps the sidecar's previous one).
pub fn check_load_report(versions: &[VersionLoad]) -> Result<(), String> {
    if versions.len() > MAX_REPORTED_VERSIONS {
        return Err(format!(
            "a load report may name at most {MAX_REPORTED_VERSIONS} versions, not {}",
            versions.len()
        ));
    }
    let instances: usize = versions.iter().map(|v| v.instances.len()).sum();
    if instances > MAX_REPORTED_INSTANCES {
        return Err(format!(
            "a load report may name at most {MAX_REPORTED_INSTANCES} instances, not {instances}"
        ));
    }
    Ok(())
}

/// Frames from agents and sidecars to the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeMessage {
    Hello(Hello),
    /// Agent: add (or re-add, after a reconnect) this instance to the route table.
    Register(Registration),
    /// Agent: "still here", with the instance's current state (a change is sent at once).
    /// `ack`: answer with a [`DirectoryMessage::HeartbeatAck`] (see [`HEARTBEATS_PER_ACK`]);
    /// absent, as from older agents, it means yes.
    Heartbeat {
        state: InstanceState,
        #[serde(default = "yes")]
        ack: bool,
    },
    /// Agent: remove the instance now (clean shutdown).
    Deregister,
    /// Sidecar: stream me the route table; I hold `epoch`/`revision` (`None` when empty).
    /// `feed_format`: the compact feed layout the sidecar reads ([`FEED_FORMAT`]), 0 (absent,
    /// as from older sidecars) for named fields only. `grace_upserts`: the sidecar reads
    /// [`DirectoryMessage::GraceUpserts`] (absent, as from older sidecars: it does not, and
    /// gets nothing during a grace period).
    Subscribe {
        epoch: Option<u64>,
        revision: u64,
        #[serde(default)]
        feed_format: u16,
        #[serde(default)]
        grace_upserts: bool,
    },
    /// Sidecar, on its subscription stream: its load per service version, every second and at
    /// once when a request waits for a version with no instance (cold start). Each report
    /// replaces the sidecar's previous one; versions it leaves out have no load.
    LoadReport {
        versions: Vec<VersionLoad>,
    },
}

/// Why the directory refused something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The hello carried a protocol version the directory does not speak.
    UnsupportedProtocol,
    /// The frame was not the one expected at this point of the conversation.
    UnexpectedMessage,
    /// The message was well-formed but its content is invalid (bad name, bad address...).
    InvalidRequest,
}

/// Frames from the directory to agents and sidecars.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectoryMessage {
    /// Hello accepted. `epoch` identifies this directory run.
    Welcome { protocol: u16, epoch: u64 },
    /// Agent: the instance is in the table; heartbeat again within `next_heartbeat_ms`.
    Registered { next_heartbeat_ms: u64, ttl_ms: u64 },
    /// Agent: the heartbeat that asked for it was received; send the next one in
    /// `next_heartbeat_ms` (jittered), and the ones after it at that interval until the next
    /// acknowledgement.
    HeartbeatAck { next_heartbeat_ms: u64 },
    /// Sidecar: part of a full table. Chunks of one snapshot share `epoch` and `revision`;
    /// the receiver replaces its table when the chunk with `last` arrives.
    SnapshotChunk {
        epoch: u64,
        revision: u64,
        instances: Vec<Instance>,
        /// Managed service versions (routable with no instance); sent with the last chunk.
        #[serde(default)]
        declared: Vec<ServiceVersion>,
        last: bool,
    },
    /// Sidecar: the changes that take the table from `from_revision` to `to_revision`.
    Deltas {
        epoch: u64,
        from_revision: u64,
        to_revision: u64,
        changes: Vec<Change>,
    },
    /// Sidecar, during the grace period after a directory start, to a sidecar that holds the
    /// previous run's table and asked for them (`Subscribe.grace_upserts`): instances and
    /// managed versions of this run (`epoch`) to add to (or replace in) the table it holds,
    /// only [`Change::Upsert`] and [`Change::Declare`]. Nothing is withdrawn before the grace
    /// period ends (SwarmKit), when a snapshot replaces the whole table; additions cannot
    /// make routes flap, and a cold start or a drain need not wait for it.
    GraceUpserts { epoch: u64, changes: Vec<Change> },
    /// A refusal with a reason a person can read; the stream is closed after it.
    Error { code: ErrorCode, message: String },
}

impl NodeMessage {
    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            NodeMessage::Hello(_) => "hello",
            NodeMessage::Register(_) => "register",
            NodeMessage::Heartbeat { .. } => "heartbeat",
            NodeMessage::Deregister => "deregister",
            NodeMessage::Subscribe { .. } => "subscribe",
            NodeMessage::LoadReport { .. } => "load_report",
        }
    }
}

impl DirectoryMessage {
    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            DirectoryMessage::Welcome { .. } => "welcome",
            DirectoryMessage::Registered { .. } => "registered",
            DirectoryMessage::HeartbeatAck { .. } => "heartbeat_ack",
            DirectoryMessage::SnapshotChunk { .. } => "snapshot_chunk",
            DirectoryMessage::Deltas { .. } => "deltas",
            DirectoryMessage::GraceUpserts { .. } => "grace_upserts",
            DirectoryMessage::Error { .. } => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_frame, encode_frame, MAX_NODE_FRAME};

    #[test]
    fn a_heartbeat_from_an_older_agent_asks_for_an_acknowledgement() {
        /// The heartbeat as agents before `ack` existed encode it.
        #[derive(Serialize)]
        #[serde(rename_all = "snake_case")]
        enum OlderNodeMessage {
            Heartbeat { state: InstanceState },
        }
        let older = OlderNodeMessage::Heartbeat {
            state: InstanceState::Up,
        };
        let frame = encode_frame(&older, MAX_NODE_FRAME).unwrap();
        let decoded: NodeMessage =
            decode_frame(&mut bytes::BytesMut::from(&frame[..]), MAX_NODE_FRAME)
                .unwrap()
                .unwrap();
        assert_eq!(
            decoded,
            NodeMessage::Heartbeat {
                state: InstanceState::Up,
                ack: true
            }
        );
    }

    #[test]
    fn feed_formats_are_understood_across_builds() {
        use crate::codec::Encoding;
        /// The subscription as sidecars before `feed_format` existed encode it, and as
        /// directories before it decode it.
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        enum OlderNodeMessage {
            Subscribe { epoch: Option<u64>, revision: u64 },
        }
        let roundtrip = |frame: Vec<u8>| bytes::BytesMut::from(&frame[..]);

        // An older sidecar: named fields for it.
        let older = OlderNodeMessage::Subscribe {
            epoch: Some(7),
            revision: 3,
        };
        let frame = encode_frame(&older, MAX_NODE_FRAME).unwrap();
        let decoded: NodeMessage = decode_frame(&mut roundtrip(frame), MAX_NODE_FRAME)
            .unwrap()
            .unwrap();
        let NodeMessage::Subscribe {
            feed_format,
            grace_upserts,
            ..
        } = decoded
        else {
            panic!("{decoded:?}")
        };
        assert_eq!(feed_encoding(feed_format), Encoding::Named);
        assert!(!grace_upserts, "an older sidecar reads no grace upserts");

        // An older directory skips the field it does not know (and so writes named fields).
        let newer = NodeMessage::Subscribe {
            epoch: Some(7),
            revision: 3,
            feed_format: FEED_FORMAT,
            grace_upserts: true,
        };
        let frame = encode_frame(&newer, MAX_NODE_FRAME).unwrap();
        let decoded: OlderNodeMessage = decode_frame(&mut roundtrip(frame), MAX_NODE_FRAME)
            .unwrap()
            .unwrap();
        assert_eq!(decoded, older);

        assert_eq!(feed_encoding(FEED_FORMAT), Encoding::Compact);
        assert_eq!(
            feed_encoding(FEED_FORMAT + 1),
            Encoding::Named,
            "a layout this build does not write"
        );
    }

    fn version(name: &str, instances: usize) -> VersionLoad {
        VersionLoad {
            service: name.to_string(),
            version: "v".repeat(63),
            in_flight: 1,
            queued: 0,
            instances: (0..instances)
                .map(|i| InstanceLoad {
                    id: format!("{i:0>128}"),
                    in_flight: 1,
                })
                .collect(),
        }
    }

    #[test]
    fn a_fitted_load_report_always_encodes_within_the_frame_limit() {
        let mut versions: Vec<_> = (0..2000)
            .map(|i| version(&format!("{i:s>63}"), 40))
            .collect();
        fit_load_report(&mut versions);
        assert!(check_load_report(&versions).is_ok());
        assert!(!versions.is_empty());
        let frame = encode_frame(&NodeMessage::LoadReport { versions }, MAX_NODE_FRAME);
        assert!(frame.is_ok(), "{frame:?}");
    }

    #[test]
    fn a_small_report_is_kept_whole_and_oversized_ones_are_refused() {
        let mut versions = vec![version("web", 3), version("api", 0)];
        let before = versions.clone();
        fit_load_report(&mut versions);
        assert_eq!(versions, before);

        let too_many: Vec<_> = (0..=MAX_REPORTED_VERSIONS)
            .map(|_| version("web", 0))
            .collect();
        assert!(check_load_report(&too_many).is_err());
        let too_busy = vec![version("web", MAX_REPORTED_INSTANCES + 1)];
        assert!(check_load_report(&too_busy).is_err());
    }
}
