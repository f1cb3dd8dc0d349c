//! End-to-end security tests (issue 4; claims and threat model in docs/SECURITY.md): the real
//! `usher-directory`, `usher-agent` and `usher-sidecar` binaries on loopback. Every legitimate
//! node joins with a token made by `usher-directory token create`. Each intruder (no
//! certificate, a certificate from another CA, an expired, revoked or wrong-role token, an agent
//! registering another service, an agent certificate subscribing) is refused, the directory's
//! route table stays exactly as it was, and the legitimate sidecar keeps answering requests
//! from the legitimate instance.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use usher_shared::protocol::Role;
use usher_tests::{
    admin_json, bin, free_tcp_port, http, wait_for_up, wait_until, Load, Mesh, Process,
    SidecarAddrs,
};

/// How long an intruder is given to do harm before the route table is checked.
const INTRUSION: Duration = Duration::from_secs(3);

/// A directory, the legitimate agent `web-1` of `web` and a sidecar routing to it.
struct Secured {
    directory: Process,
    agent: Process,
    sidecar: Process,
    sidecar_addrs: SidecarAddrs,
    /// The directory's route table once the legitimate nodes are up: `service/version/id@address`.
    baseline: BTreeSet<String>,
    /// Last: its folder (with the logs) outlives the processes, which print them on failure.
    mesh: Mesh,
}

/// The instances of a `/v1/routes` document as `service/version/id@address state`.
fn routes_of(doc: &Value) -> BTreeSet<String> {
    usher_tests::instances(doc)
        .iter()
        .map(|i| {
            format!(
                "{}/{}/{}@{} {}",
                i["service"].as_str().unwrap_or("?"),
                i["version"].as_str().unwrap_or("?"),
                i["id"].as_str().unwrap_or("?"),
                i["address"].as_str().unwrap_or("?"),
                i["state"].as_str().unwrap_or("?"),
            )
        })
        .collect()
}

async fn secured_with(toml: &str) -> Secured {
    let mesh = Mesh::new().unwrap();
    let directory = mesh
        .start_directory_with_config("directory", toml)
        .await
        .unwrap();
    let agent = mesh.start_agent("web-1", "web", &[]).unwrap();
    let sidecar_addrs = mesh.sidecar_addrs("a");
    let sidecar = mesh.start_sidecar("sidecar", &sidecar_addrs).await.unwrap();
    wait_for_up(&sidecar_addrs.admin(), "web", 1, Duration::from_secs(20))
        .await
        .unwrap();
    let baseline = routes_of(
        &admin_json(&mesh.directory.admin(), "/v1/routes")
            .await
            .unwrap(),
    );
    assert_eq!(baseline.len(), 1, "{baseline:?}");
    Secured {
        directory,
        agent,
        sidecar,
        sidecar_addrs,
        baseline,
        mesh,
    }
}

async fn secured() -> Secured {
    secured_with("").await
}

impl Secured {
    /// The directory's security counters (`GET /v1/security`).
    async fn security(&self) -> Value {
        admin_json(&self.mesh.directory.admin(), "/v1/security")
            .await
            .unwrap()
    }

    /// Waits until the counter `name` reaches at least `n`.
    async fn wait_for_counter(&self, name: &str, n: u64) {
        let admin = self.mesh.directory.admin();
        wait_until(
            Duration::from_secs(15),
            &format!("{name} >= {n}"),
            || async {
                admin_json(&admin, "/v1/security")
                    .await
                    .map(|s| s[name].as_u64().unwrap_or(0) >= n)
                    .unwrap_or(false)
            },
        )
        .await
        .unwrap();
    }

    /// Nothing changed: the directory and the sidecar hold exactly the baseline routes,
    /// requests for `web` through the sidecar are answered by `web-1`, and requests for `db`
    /// reach no instance.
    async fn assert_unchanged(&self) {
        let directory = admin_json(&self.mesh.directory.admin(), "/v1/routes")
            .await
            .unwrap();
        assert_eq!(
            routes_of(&directory),
            self.baseline,
            "directory: {directory}"
        );
        let sidecar = admin_json(&self.sidecar_addrs.admin(), "/v1/routes")
            .await
            .unwrap();
        assert_eq!(routes_of(&sidecar), self.baseline, "sidecar: {sidecar}");
        assert_eq!(sidecar["connected"], true, "{sidecar}");
        let proxy = self.sidecar_addrs.proxy();
        for _ in 0..5 {
            let r = http::get(&proxy, "web", "/").await.unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.instance().as_deref(), Some("web-1"));
        }
        let r = http::get(&proxy, "db", "/").await.unwrap();
        assert_ne!(r.status, 200, "{}", r.text());
        assert_eq!(r.instance(), None);
    }

    /// Starts an agent `name` of `service` with `credentials` instead of the harness's token.
    fn intruder(&self, name: &str, service: &str, credentials: &[String]) -> Process {
        self.mesh
            .start_agent_as(name, service, credentials, &[])
            .unwrap()
    }

    /// Starts a sidecar `name` with `credentials` instead of the harness's token.
    async fn intruding_sidecar(
        &self,
        name: &str,
        credentials: &[String],
    ) -> (Process, SidecarAddrs) {
        let addrs = self.mesh.sidecar_addrs(name);
        let process = self
            .mesh
            .start_sidecar_as(name, &addrs, credentials)
            .await
            .unwrap();
        (process, addrs)
    }

    /// The flags that make a node join with `token` at this directory.
    fn token_flags(&self, token: &str) -> Vec<String> {
        vec![
            "--join-token".into(),
            token.into(),
            "--join-address".into(),
            self.mesh.directory.join(),
        ]
    }

    /// Operator-PKI flags with the legitimate agent's stored certificate (for `web`).
    fn web_agent_flags(&self) -> Vec<String> {
        let dir = self.mesh.dir().join("agent-web-1");
        pki_flags(
            &dir.join("ca.pem"),
            &dir.join("node.pem"),
            &dir.join("node-key.pem"),
        )
    }
}

/// A node refused at the join endpoint exits 3 and says why; returns its log.
fn assert_join_refused(mut node: Process, reason: &str) -> String {
    let code = node.wait_exit(Duration::from_secs(20));
    let log = node.log();
    assert_eq!(code, Some(3), "{log}");
    assert!(
        log.contains("the directory refused to issue a certificate") && log.contains(reason),
        "the node should say {reason:?}: {log}"
    );
    log
}

/// The token id: the third field of `USHER1-<digest>-<id>-<secret>`.
fn token_id(token: &str) -> &str {
    token.split('-').nth(2).expect("a token has four fields")
}

/// `--ca CA --cert CERT --key KEY`.
fn pki_flags(ca: &Path, cert: &Path, key: &Path) -> Vec<String> {
    [("--ca", ca), ("--cert", cert), ("--key", key)]
        .into_iter()
        .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
        .collect()
}

/// A CA that is not the directory's, and a certificate from it for `uri` (`usher://...`),
/// written in `dir`: the operator-PKI flags of a node that trusts the directory's real CA
/// `trusted` but presents that certificate.
fn foreign_flags(dir: &Path, uri: &str, trusted: &Path) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "usher cluster CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("node.pem"),
        dir.join("node-key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    pki_flags(trusted, &paths.1, &paths.2)
}

/// A sidecar that was refused holds no routes: not connected, no instances, and a request for
/// `web` through it reaches no instance.
async fn assert_sidecar_got_nothing(addrs: &SidecarAddrs) {
    let routes = admin_json(&addrs.admin(), "/v1/routes").await.unwrap();
    assert_eq!(routes["connected"], false, "{routes}");
    assert!(routes_of(&routes).is_empty(), "{routes}");
    let r = http::get(&addrs.proxy(), "web", "/").await.unwrap();
    assert_ne!(r.status, 200, "{}", r.text());
    assert_eq!(r.instance(), None);
}

/// A QUIC client that trusts the directory's CA but presents no certificate.
fn endpoint_without_certificate(ca_pem: &[u8]) -> quinn::Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    for cert in usher_shared::quic::parse_certificates(ca_pem).unwrap() {
        roots.add(cert).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![usher_shared::quic::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    usher_shared::session::client_endpoint(quinn::ClientConfig::new(Arc::new(quic))).unwrap()
}

/// 1. A node without a certificate is refused during the handshake: it cannot even say hello,
///    as an agent or as a sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_certificate_is_refused_at_the_handshake() {
    let s = secured().await;
    let ca = std::fs::read(s.mesh.directory.ca()).unwrap();
    let endpoint = endpoint_without_certificate(&ca);
    for role in [Role::Agent, Role::Sidecar] {
        let result =
            usher_shared::session::open(&endpoint, &s.mesh.directory.quic(), role, "anonymous")
                .await;
        assert!(result.is_err(), "a {role} without a certificate said hello");
    }
    s.wait_for_counter("handshakes_refused", 2).await;
    assert!(s.directory.log().contains("handshake refused"));
    s.assert_unchanged().await;
}

/// 2. A certificate from another CA, even one naming `usher://agent/web` or `usher://sidecar`,
///    is refused during the handshake: the real agent never registers, the real sidecar never
///    gets a route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    let s = secured().await;
    let ca = s.mesh.directory.ca();
    let dir = s.mesh.dir();
    let flags = foreign_flags(&dir.join("foreign-agent"), "usher://agent/web", &ca);
    let agent = s.intruder("forger", "web", &flags);
    let flags = foreign_flags(&dir.join("foreign-sidecar"), "usher://sidecar", &ca);
    let (sidecar, addrs) = s.intruding_sidecar("forged-sidecar", &flags).await;
    s.wait_for_counter("handshakes_refused", 2).await;
    tokio::time::sleep(INTRUSION).await;
    s.assert_unchanged().await;
    assert_sidecar_got_nothing(&addrs).await;
    drop((agent, sidecar));
}

/// 3. An expired token is refused with a clear message on both sides, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused() {
    let s = secured().await;
    let token = s
        .mesh
        .create_token("agent", Some("web"), Some("1s"))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let flags = s.token_flags(&token);
    assert_join_refused(s.intruder("late", "web", &flags), "expired");
    assert!(
        s.directory.log().contains("join refused")
            && s.directory
                .log()
                .contains(&format!("join token {} expired", token_id(&token))),
        "the directory logs the refusal"
    );
    assert_eq!(s.security().await["joins_refused"], 1);
    let list = s.mesh.directory_cli(&["token", "list"]).unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    let line = list
        .lines()
        .find(|l| l.starts_with(token_id(&token)))
        .unwrap_or_else(|| panic!("token list shows the token: {list}"));
    assert!(line.contains("expired"), "{line}");
    s.assert_unchanged().await;
}

/// 4. A revoked token is refused; nodes that joined with a token keep their certificate when
///    it is revoked (SwarmKit: rotating a join token does not evict nodes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused() {
    let s = secured().await;
    let token = s.mesh.create_token("agent", Some("web"), None).unwrap();
    let id = token_id(&token);
    let out = s.mesh.directory_cli(&["token", "revoke", id]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = s.mesh.directory_cli(&["token", "list"]).unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    let line = list.lines().find(|l| l.starts_with(id)).unwrap_or_default();
    assert!(line.contains("revoked"), "token list: {list}");

    let flags = s.token_flags(&token);
    assert_join_refused(s.intruder("revoked", "web", &flags), "was revoked");
    assert_eq!(s.security().await["joins_refused"], 1);

    // Revoke the token web-1 and the sidecar joined with: they keep serving.
    for flags in [
        s.mesh.join_flags("agent", Some("web")).unwrap(),
        s.mesh.join_flags("sidecar", None).unwrap(),
    ] {
        let out = s
            .mesh
            .directory_cli(&["token", "revoke", token_id(&flags[1])])
            .unwrap();
        assert!(out.status.success());
    }
    tokio::time::sleep(INTRUSION).await;
    s.assert_unchanged().await;
}

/// 5. A token is for one role: an agent with a sidecar token is refused at the join endpoint,
///    and so are an agent whose token was made for another service and a sidecar with an
///    agent token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_token_used_by_an_agent_is_refused() {
    let s = secured().await;
    let sidecar_token = s.mesh.create_token("sidecar", None, None).unwrap();
    let flags = s.token_flags(&sidecar_token);
    assert_join_refused(
        s.intruder("wrong-role", "web", &flags),
        "was made for sidecars",
    );
    let web_token = s.mesh.create_token("agent", Some("web"), None).unwrap();
    let flags = s.token_flags(&web_token);
    assert_join_refused(s.intruder("wrong-service", "db", &flags), "is for service");
    // And a sidecar with an agent token.
    let addrs = s.mesh.sidecar_addrs("wrong-role-sidecar");
    let mut args = vec![
        "--directory".to_string(),
        s.mesh.directory.quic(),
        "--listen".into(),
        addrs.proxy(),
        "--admin".into(),
        addrs.admin(),
        "--state-dir".into(),
        addrs.state_dir.display().to_string(),
    ];
    args.extend(flags);
    let sidecar = Process::start(
        "wrong-role-sidecar",
        s.mesh.dir(),
        &bin("usher-sidecar"),
        &args,
    )
    .unwrap();
    assert_join_refused(sidecar, "was made for agents");
    assert_eq!(s.security().await["joins_refused"], 3);
    s.assert_unchanged().await;
}

/// 6. An agent's certificate names its service: an agent of `web` registering `db` is refused
///    at every attempt, logged with its peer and counted; `db` never gets a route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_register_another_service() {
    let s = secured().await;
    let agent = s.intruder("db-1", "db", &s.web_agent_flags());
    s.wait_for_counter("messages_refused", 1).await;
    tokio::time::sleep(INTRUSION).await;
    let log = s.directory.log();
    assert!(
        log.contains("not authorised") && log.contains("\"db\"") && log.contains("peer"),
        "{log}"
    );
    s.assert_unchanged().await;
    drop(agent);
}

/// 7. Only sidecars subscribe: a sidecar presenting an agent's certificate gets no route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_certificate_cannot_subscribe() {
    let s = secured().await;
    let (sidecar, addrs) = s
        .intruding_sidecar("agent-as-sidecar", &s.web_agent_flags())
        .await;
    s.wait_for_counter("messages_refused", 1).await;
    tokio::time::sleep(INTRUSION).await;
    assert_sidecar_got_nothing(&addrs).await;
    s.assert_unchanged().await;
    drop(sidecar);
}

/// 8. The admin API: mutations and tokens need the bearer token even on loopback; refusals are
///    counted; bound beyond loopback, reads need it too (but `/healthz`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_the_bearer_token() {
    let s = secured().await;
    let admin = s.mesh.directory.admin();
    let token = std::fs::read_to_string(s.mesh.directory.state_dir.join("admin-token")).unwrap();
    let bearer = format!("Bearer {}", token.trim());
    let send = |method: &'static str, path: &'static str, auth: Option<String>| {
        let admin = admin.clone();
        async move {
            let headers: Vec<(&str, &str)> = auth
                .as_deref()
                .map(|a| vec![("authorization", a)])
                .unwrap_or_default();
            http::request_with(&admin, method, "localhost", path, &headers)
                .await
                .unwrap()
        }
    };
    assert_eq!(send("GET", "/v1/routes", None).await.status, 200);
    for (method, path) in [
        ("POST", "/v1/tokens?role=sidecar"),
        ("GET", "/v1/tokens"),
        ("PUT", "/v1/pins/web/3"),
    ] {
        let r = send(method, path, None).await;
        assert_eq!(r.status, 401, "{method} {path}: {}", r.text());
        let r = send(method, path, Some("Bearer not-the-token".into())).await;
        assert_eq!(r.status, 401, "{method} {path}: {}", r.text());
    }
    let r = send("POST", "/v1/tokens?role=sidecar", Some(bearer.clone())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let created: Value = serde_json::from_slice(&r.body).unwrap();
    assert!(created["token"].as_str().unwrap().starts_with("USHER1-"));
    assert_eq!(s.security().await["admin_refused"], 6);
    // No token was made by the refused requests: the harness's two and this one.
    let r = send("GET", "/v1/tokens", Some(bearer)).await;
    let list: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(list["tokens"].as_array().unwrap().len(), 3, "{list}");

    // A directory whose admin port is bound beyond loopback.
    let other = Mesh::new().unwrap();
    let port = free_tcp_port();
    let state = other.dir().join("directory");
    let args: Vec<String> = vec![
        "--listen".into(),
        other.directory.quic(),
        "--join-listen".into(),
        other.directory.join(),
        "--admin".into(),
        format!("0.0.0.0:{port}"),
        "--state-dir".into(),
        state.display().to_string(),
    ];
    let _open = Process::start(
        "open-directory",
        other.dir(),
        &bin("usher-directory"),
        &args,
    )
    .unwrap();
    let addr = format!("127.0.0.1:{port}");
    wait_until(Duration::from_secs(20), "the open directory", || {
        let addr = addr.clone();
        async move {
            http::get(&addr, "localhost", "/healthz")
                .await
                .is_ok_and(|r| r.status == 200)
        }
    })
    .await
    .unwrap();
    assert_eq!(
        http::get(&addr, "localhost", "/v1/routes")
            .await
            .unwrap()
            .status,
        401
    );
    let token = std::fs::read_to_string(state.join("admin-token")).unwrap();
    let bearer = format!("Bearer {}", token.trim());
    let r = http::request_with(
        &addr,
        "GET",
        "localhost",
        "/v1/routes",
        &[("authorization", &bearer)],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

/// 9. Nodes renew their certificates before expiry without dropping their session: with 12 s
///    certificates, requests never fail and the sidecar never disconnects while both nodes
///    renew; once the first certificates have expired, a restarted directory accepts the
///    renewed ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_renewed_without_dropping_the_session() {
    let s = secured_with("node_cert_validity = \"12s\"\n").await;
    let sidecar_cert = s.sidecar_addrs.state_dir.join("node.pem");
    let agent_cert = s.mesh.dir().join("agent-web-1").join("node.pem");
    let first = (
        std::fs::read(&sidecar_cert).unwrap(),
        std::fs::read(&agent_cert).unwrap(),
    );
    let load = Load::start(
        &s.sidecar_addrs.proxy(),
        "web",
        2,
        Duration::from_millis(50),
    );
    let admin = s.sidecar_addrs.admin();
    let start = Instant::now();
    // Past the first certificates' end (12 s + 1.2 s backdating at most).
    while start.elapsed() < Duration::from_secs(15) {
        let routes = admin_json(&admin, "/v1/routes").await.unwrap();
        assert_eq!(
            routes["connected"],
            true,
            "the sidecar lost its session at {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = load.finish().await;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(report.ok > 100, "{report:?}");
    assert_ne!(
        std::fs::read(&sidecar_cert).unwrap(),
        first.0,
        "sidecar renewed"
    );
    assert_ne!(
        std::fs::read(&agent_cert).unwrap(),
        first.1,
        "agent renewed"
    );
    // Two enrolments and at least one renewal each.
    let issued = s.security().await["certificates_issued"].as_u64().unwrap();
    assert!(issued >= 4, "{issued}");

    // New handshakes use the renewed certificates: the first ones have expired.
    let epoch = admin_json(&s.sidecar_addrs.admin(), "/v1/routes")
        .await
        .unwrap()["epoch"]
        .clone();
    let Secured {
        mut directory,
        agent,
        sidecar,
        sidecar_addrs,
        mesh,
        ..
    } = s;
    directory.kill();
    let _directory = mesh
        .start_directory_with_config("directory", "node_cert_validity = \"12s\"\n")
        .await
        .unwrap();
    let admin = sidecar_addrs.admin();
    wait_until(
        Duration::from_secs(20),
        "the sidecar to reconnect to the restarted directory",
        || async {
            admin_json(&admin, "/v1/routes").await.is_ok_and(|r| {
                r["connected"] == true && r["epoch"] != epoch && routes_of(&r).len() == 1
            })
        },
    )
    .await
    .unwrap();
    let r = http::get(&sidecar_addrs.proxy(), "web", "/").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    drop((agent, sidecar));
}
