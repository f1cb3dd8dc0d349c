//! In-process tests: `run()` on loopback port 0, with real QUIC clients speaking the protocol.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use usher_directory::{Config, Listeners};
use usher_shared::codec::{
    read_frame, write_frame, FRAME_READ_TIMEOUT, MAX_DIRECTORY_FRAME, MAX_NODE_FRAME,
};
use usher_shared::identity::NodeIdentity;
use usher_shared::protocol::{
    DirectoryMessage, ErrorCode, Hello, NodeMessage, Registration, Role, FEED_FORMAT,
};
use usher_shared::quic::{client_config, Liveness, NodeCert};
use usher_shared::routes::{Change, Instance, InstanceState, RouteTable};
use usher_shared::session::{client_endpoint, open, Session};

const HEARTBEAT: Duration = Duration::from_millis(100);

struct Running {
    quic: String,
    /// The join endpoint.
    join: String,
    admin: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// Presents an agent certificate for service `web`.
    agent: quinn::Endpoint,
    /// Presents a sidecar certificate.
    sidecar: quinn::Endpoint,
    authority: usher_directory::pki::CertAuthority,
}

/// A client endpoint that presents a certificate for `identity` issued by the directory's CA.
fn endpoint_as(
    authority: &usher_directory::pki::CertAuthority,
    identity: &NodeIdentity,
) -> quinn::Endpoint {
    let (cert, key) = authority
        .issue_node(identity, Duration::from_secs(3600))
        .unwrap();
    let cert = std::sync::Arc::new(NodeCert::from_pem(cert.as_bytes(), key.as_bytes()).unwrap());
    // Each role's connections stay alive as that node's do.
    let liveness = match identity {
        NodeIdentity::Agent { .. } => Liveness::Heartbeats,
        _ => Liveness::KeepAlive,
    };
    client_endpoint(client_config(authority.ca_pem.as_bytes(), cert, liveness).unwrap()).unwrap()
}

async fn start(state_dir: &Path) -> Running {
    start_heartbeating(state_dir, HEARTBEAT).await
}

/// A directory that dictates a heartbeat every `interval`.
async fn start_heartbeating(state_dir: &Path, interval: Duration) -> Running {
    let config = Config::for_tests(state_dir, interval);
    let quic = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let join = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let quic_addr = quic.local_addr().unwrap().to_string();
    let join_addr = join.local_addr().unwrap().to_string();
    let admin_addr = admin.local_addr().unwrap().to_string();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        usher_directory::run(config, Listeners { quic, join, admin }, token)
            .await
            .unwrap()
    });
    let ca = state_dir.join("ca.pem");
    for _ in 0..200 {
        if ca.exists() && state_dir.join("ca-key.pem").exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let authority = usher_directory::pki::CertAuthority::load(state_dir).unwrap();
    let web = NodeIdentity::Agent {
        service: "web".into(),
    };
    Running {
        quic: quic_addr,
        join: join_addr,
        admin: admin_addr,
        shutdown,
        task,
        agent: endpoint_as(&authority, &web),
        sidecar: endpoint_as(&authority, &NodeIdentity::Sidecar),
        authority,
    }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("run returns after shutdown")
            .unwrap();
    }

    /// A sidecar session that has subscribed from scratch.
    async fn subscribed(&self) -> Session {
        let mut sidecar = self.session(Role::Sidecar).await;
        sidecar
            .send(&NodeMessage::Subscribe {
                epoch: None,
                revision: 0,
                feed_format: FEED_FORMAT,
                grace_upserts: false,
            })
            .await
            .unwrap();
        sidecar
    }

    async fn session(&self, role: Role) -> Session {
        let endpoint = match role {
            Role::Agent => &self.agent,
            Role::Sidecar => &self.sidecar,
        };
        open(endpoint, &self.quic, role, "test/1").await.unwrap()
    }
}

fn instance(id: &str, state: InstanceState) -> Instance {
    Instance {
        service: "web".into(),
        version: "v1".into(),
        id: id.into(),
        address: "127.0.0.1:8080".parse().unwrap(),
        capacity: 4,
        weight: 1,
        state,
        started_at_ms: usher_shared::unix_millis(),
        labels: BTreeMap::new(),
    }
}

async fn recv(session: &mut Session) -> DirectoryMessage {
    tokio::time::timeout(Duration::from_secs(5), session.recv())
        .await
        .expect("a frame in time")
        .unwrap()
}

async fn register(running: &Running, i: Instance) -> Session {
    register_heartbeating(running, i, HEARTBEAT).await
}

/// Registers `i` with a directory that dictates a heartbeat every `interval`: the reply
/// carries that interval (±10% jitter) and a TTL of 3 intervals.
async fn register_heartbeating(running: &Running, i: Instance, interval: Duration) -> Session {
    let mut agent = running.session(Role::Agent).await;
    agent
        .send(&NodeMessage::Register(Registration { instance: i }))
        .await
        .unwrap();
    let ms = interval.as_millis() as u64;
    match recv(&mut agent).await {
        DirectoryMessage::Registered {
            next_heartbeat_ms,
            ttl_ms,
        } => {
            assert!(
                (ms * 9 / 10..=ms * 11 / 10).contains(&next_heartbeat_ms),
                "{next_heartbeat_ms}"
            );
            assert_eq!(ttl_ms, 3 * ms);
        }
        other => panic!("expected registered, got {other:?}"),
    }
    agent
}

/// Sends a heartbeat of an `up` instance; `ack`: ask for an acknowledgement.
async fn heartbeat(agent: &mut Session, ack: bool) {
    agent
        .send(&NodeMessage::Heartbeat {
            state: InstanceState::Up,
            ack,
        })
        .await
        .unwrap();
}

/// An agent sends no keep-alives (its heartbeats keep its connection alive) and the directory's
/// idle timeout follows its heartbeat interval: an agent connection silent for longer than
/// the 5 s idle timeout of a sidecar's, but within its TTL, lives on, and heartbeats again.
/// Nor does it probe the path MTU: all it sends is small.
#[tokio::test]
async fn an_agent_connection_lives_on_its_heartbeats_alone() {
    let dir = tempfile::tempdir().unwrap();
    let interval = Duration::from_secs(2);
    let d = start_heartbeating(dir.path(), interval).await;
    let mut agent = register_heartbeating(&d, instance("a", InstanceState::Up), interval).await;
    // Longer than a heartbeat interval and than IDLE_TIMEOUT, shorter than the TTL.
    let silence = usher_shared::quic::IDLE_TIMEOUT + Duration::from_millis(500);
    tokio::time::sleep(silence).await;
    assert!(
        agent.connection.close_reason().is_none(),
        "closed after {silence:?} of silence: {:?}",
        agent.connection.close_reason()
    );
    heartbeat(&mut agent, true).await;
    assert!(matches!(
        recv(&mut agent).await,
        DirectoryMessage::HeartbeatAck { .. }
    ));
    // No keep-alive, and no path MTU probe (each a PING too).
    let stats = agent.connection.stats();
    assert_eq!(stats.frame_tx.ping, 0, "the agent sent PINGs: {stats:?}");
    d.stop().await;
}

/// Reads frames into `table` until `done` holds.
async fn follow(sidecar: &mut Session, table: &mut RouteTable, done: impl Fn(&RouteTable) -> bool) {
    let mut chunks: Vec<Instance> = Vec::new();
    while !done(table) {
        match recv(sidecar).await {
            DirectoryMessage::SnapshotChunk {
                epoch,
                revision,
                instances,
                last,
                ..
            } => {
                chunks.extend(instances);
                if last {
                    *table =
                        RouteTable::from_snapshot(epoch, revision, std::mem::take(&mut chunks));
                }
            }
            DirectoryMessage::Deltas {
                epoch,
                from_revision,
                to_revision,
                changes,
            } => table
                .apply_deltas(epoch, from_revision, to_revision, &changes)
                .unwrap(),
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn state_of(table: &RouteTable, id: &str) -> Option<InstanceState> {
    table.instances().find(|i| i.id == id).map(|i| i.state)
}

#[tokio::test]
async fn agents_register_sidecars_follow_and_silence_expires() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path()).await;
    let mut agent = register(&d, instance("a", InstanceState::Starting)).await;

    let mut sidecar = d.subscribed().await;
    let mut table = RouteTable::default();
    follow(&mut sidecar, &mut table, |t| {
        state_of(t, "a") == Some(InstanceState::Starting)
    })
    .await;
    assert_eq!(table.epoch, sidecar.epoch);

    // A health change reaches the sidecar as a delta. Only the heartbeat that asks for an
    // acknowledgement gets one.
    for ack in [false, true] {
        heartbeat(&mut agent, ack).await;
    }
    assert!(matches!(
        recv(&mut agent).await,
        DirectoryMessage::HeartbeatAck { .. }
    ));
    assert!(
        tokio::time::timeout(Duration::from_millis(50), agent.recv())
            .await
            .is_err(),
        "one acknowledgement for the one heartbeat that asked"
    );
    follow(&mut sidecar, &mut table, |t| {
        state_of(t, "a") == Some(InstanceState::Up)
    })
    .await;

    // The admin API shows it.
    let body = admin_get(&d.admin, "/v1/routes").await;
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["instances"][0]["state"], "up");
    assert_eq!(doc["instances"][0]["id"], "a");

    // Silence: the TTL (300 ms) lapses and the instance is withdrawn.
    let started = std::time::Instant::now();
    follow(&mut sidecar, &mut table, |t| t.is_empty()).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // Its heartbeat is now refused: it must register again.
    heartbeat(&mut agent, true).await;
    assert!(agent.recv().await.is_err());
    d.stop().await;
}

#[tokio::test]
async fn deregister_withdraws_at_once_and_resume_gets_only_deltas() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path()).await;
    let mut agent = register(&d, instance("a", InstanceState::Up)).await;
    let mut sidecar = d.subscribed().await;
    let mut table = RouteTable::default();
    follow(&mut sidecar, &mut table, |t| t.len() == 1).await;
    sidecar.close("test");

    // Changes while the sidecar is away.
    let _b = register(&d, instance("b", InstanceState::Up)).await;
    agent.send(&NodeMessage::Deregister).await.unwrap();
    let _ = agent.send.finish();

    let mut sidecar = d.session(Role::Sidecar).await;
    sidecar
        .send(&NodeMessage::Subscribe {
            epoch: Some(table.epoch),
            revision: table.revision,
            feed_format: 0,
            grace_upserts: false,
        })
        .await
        .unwrap();
    // Only deltas (a snapshot would panic in apply_deltas' place: follow accepts both, so
    // check the first frame explicitly).
    match recv(&mut sidecar).await {
        DirectoryMessage::Deltas {
            epoch,
            from_revision,
            to_revision,
            changes,
        } => {
            assert_eq!(from_revision, table.revision);
            table
                .apply_deltas(epoch, from_revision, to_revision, &changes)
                .unwrap();
        }
        other => panic!("expected deltas, got {other:?}"),
    }
    follow(&mut sidecar, &mut table, |t| {
        state_of(t, "a").is_none() && state_of(t, "b").is_some()
    })
    .await;
    d.stop().await;
}

/// The instances of the one-chunk snapshot of this run's table that `sidecar` receives next.
async fn new_table(sidecar: &mut Session) -> Vec<Instance> {
    match recv(sidecar).await {
        DirectoryMessage::SnapshotChunk {
            epoch,
            instances,
            last: true,
            ..
        } => {
            assert_eq!(epoch, sidecar.epoch);
            instances
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

/// Runs a directory in `state_dir` with one instance, `a`, until a sidecar holds its table;
/// stops it and returns that table.
async fn table_of_a_stopped_run(state_dir: &Path) -> RouteTable {
    let d = start(state_dir).await;
    let _agent = register(&d, instance("a", InstanceState::Up)).await;
    let mut sidecar = d.subscribed().await;
    let mut table = RouteTable::default();
    follow(&mut sidecar, &mut table, |t| t.len() == 1).await;
    d.stop().await;
    table
}

#[tokio::test]
async fn a_restart_keeps_the_ca_and_holds_updates_for_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let table = table_of_a_stopped_run(dir.path()).await;
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();

    let d = start(dir.path()).await;
    assert_eq!(
        std::fs::read(dir.path().join("ca.pem")).unwrap(),
        ca,
        "CA reused"
    );
    let mut sidecar = d.session(Role::Sidecar).await;
    assert_ne!(sidecar.epoch, table.epoch);
    let asked = std::time::Instant::now();
    sidecar
        .send(&NodeMessage::Subscribe {
            epoch: Some(table.epoch),
            revision: table.revision,
            feed_format: 0,
            grace_upserts: false,
        })
        .await
        .unwrap();
    // The old table's instance has not rejoined; the sidecar hears nothing until the grace
    // period (600 ms) ends, then gets the (empty) new table.
    assert!(new_table(&mut sidecar).await.is_empty());
    let waited = asked.elapsed();
    assert!(
        waited >= Duration::from_millis(450),
        "snapshot after {waited:?}"
    );
    d.stop().await;
}

#[tokio::test]
async fn a_sidecar_that_asks_gets_the_new_instances_during_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let table = table_of_a_stopped_run(dir.path()).await;

    let d = start(dir.path()).await;
    // "b" registers with the new directory before the sidecar subscribes; "a" never rejoins.
    let _b = register(&d, instance("b", InstanceState::Up)).await;
    let mut sidecar = d.session(Role::Sidecar).await;
    let asked = std::time::Instant::now();
    sidecar
        .send(&NodeMessage::Subscribe {
            epoch: Some(table.epoch),
            revision: table.revision,
            feed_format: FEED_FORMAT,
            grace_upserts: true,
        })
        .await
        .unwrap();
    let ids = |changes: &[Change]| -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                Change::Upsert(i) => i.id.clone(),
                other => panic!("only upserts are sent during the grace period, got {other:?}"),
            })
            .collect()
    };
    // At once: what registered so far, as upserts into the table the sidecar holds.
    match recv(&mut sidecar).await {
        DirectoryMessage::GraceUpserts { epoch, changes } => {
            assert_eq!(epoch, sidecar.epoch);
            assert_eq!(ids(&changes), ["b"]);
        }
        other => panic!("expected grace upserts, got {other:?}"),
    }
    // Then each instance as it registers, within a batch period.
    let _c = register(&d, instance("c", InstanceState::Up)).await;
    match recv(&mut sidecar).await {
        DirectoryMessage::GraceUpserts { changes, .. } => assert_eq!(ids(&changes), ["c"]),
        other => panic!("expected grace upserts, got {other:?}"),
    }
    assert!(
        asked.elapsed() < Duration::from_millis(450),
        "before the grace period (600 ms) ends: {:?}",
        asked.elapsed()
    );
    // When it ends, the new table replaces the old one: "a", which never rejoined, is gone
    // (and so are "b" and "c", whose sessions here send no heartbeats, once their TTL
    // lapsed: removals wait for the snapshot too).
    let instances = new_table(&mut sidecar).await;
    assert!(instances.iter().all(|i| i.id != "a"), "{instances:?}");
    d.stop().await;
}

/// Opens a raw stream (no session helper) to send arbitrary bytes.
async fn raw_stream(d: &Running) -> (quinn::SendStream, quinn::RecvStream) {
    let addr = d.quic.parse().unwrap();
    let conn = d
        .agent
        .connect(addr, usher_shared::quic::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    conn.open_bi().await.unwrap()
}

/// What the directory answers: an error frame's code, or `None` if it just closed.
async fn answer(recv: &mut quinn::RecvStream) -> Option<ErrorCode> {
    match tokio::time::timeout(
        Duration::from_secs(5),
        read_frame::<_, DirectoryMessage>(recv, MAX_DIRECTORY_FRAME),
    )
    .await
    .expect("the directory answers in time")
    {
        Ok(Some(DirectoryMessage::Error { code, .. })) => Some(code),
        Ok(Some(other)) => panic!("unexpected {other:?}"),
        Ok(None) | Err(_) => None,
    }
}

#[tokio::test]
async fn hostile_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path()).await;

    // Garbage instead of a frame.
    let (mut send, mut recv) = raw_stream(&d).await;
    send.write_all(b"\x00\x00\x00\x05hello").await.unwrap();
    assert_eq!(answer(&mut recv).await, Some(ErrorCode::InvalidRequest));

    // An oversized header: refused before anything is allocated.
    let (mut send, mut recv) = raw_stream(&d).await;
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    assert_eq!(answer(&mut recv).await, Some(ErrorCode::InvalidRequest));

    // A well-formed frame of a message type the directory does not know.
    #[derive(serde::Serialize)]
    enum Unknown {
        LaunchMissiles { now: bool },
    }
    let (mut send, mut recv) = raw_stream(&d).await;
    write_frame(
        &mut send,
        &Unknown::LaunchMissiles { now: true },
        MAX_NODE_FRAME,
    )
    .await
    .unwrap();
    assert_eq!(answer(&mut recv).await, Some(ErrorCode::InvalidRequest));

    // A protocol version the directory does not speak.
    let (mut send, mut recv) = raw_stream(&d).await;
    let hello = NodeMessage::Hello(Hello {
        protocol: 99,
        role: Role::Agent,
        node: "x".into(),
    });
    write_frame(&mut send, &hello, MAX_NODE_FRAME)
        .await
        .unwrap();
    assert_eq!(
        answer(&mut recv).await,
        Some(ErrorCode::UnsupportedProtocol)
    );

    // Register before hello; subscribe as an agent; register as a sidecar.
    let (mut send, mut recv) = raw_stream(&d).await;
    let registration = NodeMessage::Register(Registration {
        instance: instance("x", InstanceState::Up),
    });
    write_frame(&mut send, &registration, MAX_NODE_FRAME)
        .await
        .unwrap();
    assert_eq!(answer(&mut recv).await, Some(ErrorCode::UnexpectedMessage));
    let mut agent = d.session(Role::Agent).await;
    agent
        .send(&NodeMessage::Subscribe {
            epoch: None,
            revision: 0,
            feed_format: FEED_FORMAT,
            grace_upserts: false,
        })
        .await
        .unwrap();
    assert!(agent.recv().await.is_err());
    let mut sidecar = d.session(Role::Sidecar).await;
    sidecar.send(&registration).await.unwrap();
    assert!(sidecar.recv().await.is_err());

    // An invalid registration.
    let mut agent = d.session(Role::Agent).await;
    let mut bad = instance("x", InstanceState::Up);
    bad.service = "Not A Label".into();
    agent
        .send(&NodeMessage::Register(Registration { instance: bad }))
        .await
        .unwrap();
    let e = agent.recv().await.unwrap_err().to_string();
    assert!(e.contains("service"), "{e}");

    // Raw UDP garbage at the QUIC port.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for size in [1usize, 100, 1200, 1500] {
        udp.send_to(&vec![0xAB; size], &d.quic).unwrap();
    }

    // Nothing changed and the directory still serves.
    let body = admin_get(&d.admin, "/v1/routes").await;
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["revision"], 0);
    assert!(doc["instances"].as_array().unwrap().is_empty());
    let _ok = register(&d, instance("good", InstanceState::Up)).await;
    d.stop().await;
}

/// A subscribed node that starts a frame and stops is refused after
/// [`FRAME_READ_TIMEOUT`] although QUIC keep-alives keep its connection up; the directory
/// goes on serving others.
#[tokio::test]
async fn a_node_that_stalls_inside_a_frame_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path()).await;
    let mut sidecar = d.subscribed().await;
    sidecar.send.write_all(&[0, 0, 0]).await.unwrap();
    let started = std::time::Instant::now();
    let refusal = loop {
        match tokio::time::timeout(FRAME_READ_TIMEOUT * 2, sidecar.recv()).await {
            Ok(Ok(_snapshot_or_delta)) => continue,
            Ok(Err(e)) => break e.to_string(),
            Err(_) => panic!("the directory kept a stalled node"),
        }
    };
    assert!(refusal.contains("started a frame"), "{refusal}");
    assert!(started.elapsed() >= FRAME_READ_TIMEOUT - Duration::from_secs(1));
    let _ok = register(&d, instance("good", InstanceState::Up)).await;
    d.stop().await;
}

/// The certificate, not the hello, decides: a hello claiming the other role, an agent
/// registering another service, and a certificate without an usher identity are refused,
/// counted, and change nothing.
#[tokio::test]
async fn certificates_decide_what_a_node_may_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path()).await;

    // A sidecar certificate saying "agent" in its hello.
    let e = open(&d.sidecar, &d.quic, Role::Agent, "liar/1")
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("not authorised"), "{e}");
    // An agent certificate saying "sidecar".
    assert!(open(&d.agent, &d.quic, Role::Sidecar, "liar/2")
        .await
        .is_err());

    // The agent of `web` registering `db`.
    let mut agent = d.session(Role::Agent).await;
    let mut other = instance("db-1", InstanceState::Up);
    other.service = "db".into();
    agent
        .send(&NodeMessage::Register(Registration { instance: other }))
        .await
        .unwrap();
    let e = agent.recv().await.unwrap_err().to_string();
    assert!(e.contains("not authorised") && e.contains("db"), "{e}");

    // A certificate from this CA that names no usher identity: the connection is closed.
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["someone".into()]).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.path().join("ca-key.pem")).unwrap())
            .unwrap();
    let ca_cert = rcgen::CertificateParams::from_ca_cert_pem(&d.authority.ca_pem)
        .unwrap()
        .self_signed(&ca_key)
        .unwrap();
    let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
    let anonymous = client_endpoint(
        client_config(
            d.authority.ca_pem.as_bytes(),
            std::sync::Arc::new(
                NodeCert::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap(),
            ),
            Liveness::KeepAlive,
        )
        .unwrap(),
    )
    .unwrap();
    assert!(open(&anonymous, &d.quic, Role::Sidecar, "anon/1")
        .await
        .is_err());

    let routes: serde_json::Value =
        serde_json::from_str(&admin_get(&d.admin, "/v1/routes").await).unwrap();
    assert!(routes["instances"].as_array().unwrap().is_empty());
    let security: serde_json::Value =
        serde_json::from_str(&admin_get(&d.admin, "/v1/security").await).unwrap();
    assert_eq!(security["messages_refused"], 3, "{security}");
    assert_eq!(security["identities_refused"], 1, "{security}");

    // The legitimate agent beside them still registers.
    let _ok = register(&d, instance("good", InstanceState::Up)).await;
    d.stop().await;
}

/// A node whose stored certificate is due for renewal renews it with itself as proof and
/// does not spend its join token, which may have expired meanwhile (SwarmKit: renew with the
/// current certificate).
#[tokio::test]
async fn a_certificate_due_for_renewal_is_renewed_with_itself() {
    use usher_shared::enrolment::{obtain, store, NodeTls, NODE_CERT_FILE};
    use usher_shared::files::Durability;
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path()).await;
    let node = dir.path().join("node");
    // Issued 100 s ago for 120 s: two thirds have passed, it is still valid.
    let key = rcgen::KeyPair::generate().unwrap();
    let issued = std::time::SystemTime::now() - Duration::from_secs(100);
    let old = d
        .authority
        .issue_for_key(
            &NodeIdentity::Sidecar,
            &key,
            Duration::from_secs(120),
            issued,
        )
        .unwrap();
    store(
        &node,
        &old,
        &key.serialize_pem(),
        &d.authority.ca_pem,
        Durability::Durable,
    )
    .unwrap();
    let tls = NodeTls {
        identity: NodeIdentity::Sidecar,
        ca: None,
        cert: None,
        // A token this directory does not know: refused if it were tried.
        join_token: Some(usher_shared::identity::JoinToken::generate(
            &d.authority.fingerprint,
        )),
        join_address: d.join.clone(),
        state_dir: node.clone(),
    };
    let creds = obtain(&tls).await.unwrap();
    let now = (usher_shared::unix_millis() / 1000) as i64;
    assert!(creds.info.valid_at(now) && !creds.info.renewal_due(now));
    assert_ne!(
        std::fs::read_to_string(node.join(NODE_CERT_FILE)).unwrap(),
        old
    );
    let security: serde_json::Value =
        serde_json::from_str(&admin_get(&d.admin, "/v1/security").await).unwrap();
    assert_eq!(security["certificates_issued"], 1, "{security}");
    assert_eq!(security["joins_refused"], 0, "{security}");
    // The renewed certificate is accepted on the control plane.
    let endpoint =
        usher_shared::session::node_endpoint(&creds, usher_shared::quic::Liveness::KeepAlive)
            .unwrap();
    open(&endpoint, &d.quic, Role::Sidecar, "renewed/1")
        .await
        .unwrap();
    d.stop().await;
}

/// A minimal HTTP/1.0 GET against the admin port.
async fn admin_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_string()
}

#[tokio::test]
async fn sidecar_load_reports_and_subscriptions_count_until_the_sidecar_leaves() {
    use usher_shared::protocol::VersionLoad;
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path()).await;
    let _agent = register(&d, instance("a", InstanceState::Up)).await;
    let report = |in_flight, queued| NodeMessage::LoadReport {
        versions: vec![VersionLoad {
            service: "web".into(),
            version: "v1".into(),
            in_flight,
            queued,
            instances: vec![],
        }],
    };
    let mut sidecars = Vec::new();
    // A sidecar of a build before the compact feed, and one of this build.
    for (in_flight, queued, feed_format) in [(3, 1, 0), (2, 0, FEED_FORMAT)] {
        let mut s = d.session(Role::Sidecar).await;
        s.send(&NodeMessage::Subscribe {
            epoch: None,
            revision: 0,
            feed_format,
            grace_upserts: false,
        })
        .await
        .unwrap();
        s.send(&report(in_flight, queued)).await.unwrap();
        sidecars.push(s);
    }
    let web = |doc: &serde_json::Value| doc["services"][0].clone();
    let mut seen = serde_json::Value::Null;
    for _ in 0..100 {
        seen = web(&serde_json::from_str(&admin_get(&d.admin, "/v1/services").await).unwrap());
        if seen["outstanding"] == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen["service"], "web");
    assert_eq!(
        (seen["in_flight"].clone(), seen["queued"].clone()),
        (5.into(), 1.into()),
        "{seen}"
    );
    assert_eq!(seen["sidecars"], 2);
    let subscribers = || async {
        let routes: serde_json::Value =
            serde_json::from_str(&admin_get(&d.admin, "/v1/routes").await).unwrap();
        routes["subscribers"].clone()
    };
    assert_eq!(
        subscribers().await,
        serde_json::json!({"named": 1, "compact": 1})
    );
    assert_eq!(
        (seen["instances"].clone(), seen["up"].clone()),
        (1.into(), 1.into())
    );

    // A sidecar that leaves stops counting at once.
    let gone = sidecars.remove(0);
    gone.close("test");
    let mut outstanding = serde_json::Value::Null;
    for _ in 0..100 {
        outstanding =
            web(&serde_json::from_str(&admin_get(&d.admin, "/v1/services").await).unwrap())
                ["outstanding"]
                .clone();
        if outstanding == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(outstanding, 2);
    assert_eq!(
        subscribers().await,
        serde_json::json!({"named": 0, "compact": 1})
    );

    // An oversized report is refused.
    let huge = NodeMessage::LoadReport {
        versions: (0..=usher_shared::protocol::MAX_REPORTED_VERSIONS)
            .map(|i| VersionLoad {
                service: "web".into(),
                version: format!("v{i}"),
                in_flight: 1,
                queued: 0,
                instances: vec![],
            })
            .collect(),
    };
    let s = &mut sidecars[0];
    s.send(&huge).await.unwrap();
    let refused = loop {
        match tokio::time::timeout(Duration::from_secs(5), s.recv())
            .await
            .unwrap()
        {
            Err(e) => break e.to_string(),
            Ok(_) => continue,
        }
    };
    assert!(refused.contains("at most"), "{refused}");
    d.stop().await;
}
