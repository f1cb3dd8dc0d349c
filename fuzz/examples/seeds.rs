//! Writes the seed corpus, `corpus/<target>/<name>`: a few valid encoded messages per target.
//! Run once from `fuzz/` (`cargo run --example seeds`) and commit the files; the fuzzer grows
//! its own corpus from them in a temporary copy (`.ci/run`).

use std::collections::BTreeMap;
use std::path::Path;

use usher_shared::codec::{encode_frame, MAX_DIRECTORY_FRAME, MAX_NODE_FRAME};
use usher_shared::join::{JoinRequest, MAX_JOIN_FRAME};
use usher_shared::protocol::{
    DirectoryMessage, Hello, InstanceLoad, NodeMessage, Registration, Role, VersionLoad,
    FEED_FORMAT, PROTOCOL_VERSION,
};
use usher_shared::routes::{Change, Instance, InstanceState};

fn instance() -> Instance {
    Instance {
        service: "web".into(),
        version: "v1".into(),
        id: "web-1".into(),
        address: "127.0.0.1:8080".parse().expect("a literal address"),
        capacity: 4,
        weight: 1,
        state: InstanceState::Up,
        started_at_ms: 1_700_000_000_000,
        labels: BTreeMap::from([("zone".into(), "a".into())]),
    }
}

fn node(messages: &[NodeMessage]) -> Vec<u8> {
    messages
        .iter()
        .flat_map(|m| encode_frame(m, MAX_NODE_FRAME).expect("a small message"))
        .collect()
}

fn hello(role: Role) -> NodeMessage {
    NodeMessage::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        role,
        node: "host-1/42".into(),
    })
}

fn main() -> std::io::Result<()> {
    let agent = node(&[
        hello(Role::Agent),
        NodeMessage::Register(Registration {
            instance: instance(),
        }),
        NodeMessage::Heartbeat {
            state: InstanceState::Up,
            ack: false,
        },
        NodeMessage::Heartbeat {
            state: InstanceState::Draining,
            ack: true,
        },
        NodeMessage::Deregister,
    ]);
    let sidecar = node(&[
        hello(Role::Sidecar),
        NodeMessage::Subscribe {
            epoch: Some(7),
            revision: 3,
            feed_format: FEED_FORMAT,
            grace_upserts: true,
        },
        NodeMessage::LoadReport {
            versions: vec![VersionLoad {
                service: "web".into(),
                version: "v1".into(),
                in_flight: 2,
                queued: 1,
                instances: vec![InstanceLoad {
                    id: "web-1".into(),
                    in_flight: 2,
                }],
            }],
        },
    ]);
    let directory: Vec<u8> = [
        DirectoryMessage::Welcome {
            protocol: PROTOCOL_VERSION,
            epoch: 7,
        },
        DirectoryMessage::SnapshotChunk {
            epoch: 7,
            revision: 3,
            instances: vec![instance()],
            declared: vec![],
            last: true,
        },
        DirectoryMessage::GraceUpserts {
            epoch: 8,
            changes: vec![Change::Upsert(instance())],
        },
    ]
    .iter()
    .flat_map(|m| encode_frame(m, MAX_DIRECTORY_FRAME).expect("a small message"))
    .collect();
    let join = encode_frame(
        &JoinRequest::Renew {
            csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n"
                .into(),
        },
        MAX_JOIN_FRAME,
    )
    .expect("a small message");

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    // The directory target's first byte picks the identity: 1 an agent of `web`, 0 a sidecar.
    let seeds: [(&str, &str, Vec<u8>); 6] = [
        ("frame_decode", "agent", agent.clone()),
        ("frame_decode", "sidecar", sidecar.clone()),
        ("frame_decode", "directory", directory),
        ("frame_decode", "join", join),
        ("directory_message", "agent", [&[1u8][..], &agent].concat()),
        (
            "directory_message",
            "sidecar",
            [&[0u8][..], &sidecar].concat(),
        ),
    ];
    for (target, name, bytes) in seeds {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), bytes)?;
    }
    Ok(())
}
