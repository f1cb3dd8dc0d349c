//! The `kubernetes` backend: sets `spec.replicas` of the service version's Deployment through
//! its scale subresource with kube-rs (in-cluster config, or `KUBECONFIG`/`~/.kube/config`).
//!
//! Each change of the desired count: `GET .../deployments/NAME/scale`; when the Deployment has
//! more replicas than desired, the idlest instances' pods get the annotation
//! `controller.kubernetes.io/pod-deletion-cost: "-1000"` so the ReplicaSet removes them first
//! (this needs the agent started with `--id $(POD_NAME)`; an instance id that is not a pod is
//! skipped); then `PATCH .../scale` with `{"spec":{"replicas":N}}`. Kubernetes sends SIGTERM
//! to a removed pod, whose agent drains the instance first, so `terminationGracePeriodSeconds`
//! must exceed the service's `drain_time`.
//!
//! Failures are logged and retried with backoff (see [`Applier`]); every
//! [`RESYNC_INTERVAL`] the count is read again, so an edit behind the directory's back is
//! undone. A directory shutdown leaves the Deployment as it is.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use serde_json::json;
use tokio::time::Instant;
use tracing::{debug, info};

use super::{Applier, Observed, Scheduler, SchedulerError};
use crate::services::ServiceSpec;

/// How often the Deployment's replicas are read again even when nothing changed here.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(30);

/// The annotation the ReplicaSet controller reads to choose which pods to remove first
/// (lower first; Kubernetes 1.22+).
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// The field manager the directory's patches are recorded under.
const FIELD_MANAGER: &str = "usher-directory";

/// Scales one Deployment.
pub struct KubernetesScheduler {
    spec: ServiceSpec,
    namespace: String,
    deployment: String,
    /// Created on first use, so a directory starts while the API server is unreachable.
    client: Option<Client>,
    applier: Applier,
    synced_at: Option<Instant>,
}

impl std::fmt::Debug for KubernetesScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesScheduler")
            .field("namespace", &self.namespace)
            .field("deployment", &self.deployment)
            .field("applied", &self.applier.applied())
            .finish()
    }
}

fn kube_error(e: kube::Error) -> SchedulerError {
    SchedulerError::Kubernetes(e.to_string())
}

impl KubernetesScheduler {
    pub fn new(spec: &ServiceSpec, namespace: &str, deployment: &str) -> Self {
        KubernetesScheduler {
            spec: spec.clone(),
            namespace: namespace.to_string(),
            deployment: deployment.to_string(),
            client: None,
            applier: Applier::default(),
            synced_at: None,
        }
    }

    /// A scheduler that talks through `client` (tests give kube-rs's mock service).
    pub fn with_client(
        spec: &ServiceSpec,
        namespace: &str,
        deployment: &str,
        client: Client,
    ) -> Self {
        KubernetesScheduler {
            client: Some(client),
            ..Self::new(spec, namespace, deployment)
        }
    }

    async fn client(&mut self) -> Result<Client, SchedulerError> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let client = Client::try_default().await.map_err(|e| {
            SchedulerError::Kubernetes(format!(
                "no cluster configuration (in-cluster or KUBECONFIG): {e}"
            ))
        })?;
        self.client = Some(client.clone());
        Ok(client)
    }

    /// Reads the replicas, marks the pods to remove first, writes the replicas.
    async fn apply(&mut self, desired: u32, observed: &Observed) -> Result<(), SchedulerError> {
        let client = self.client().await?;
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &self.namespace);
        let scale = deployments
            .get_scale(&self.deployment)
            .await
            .map_err(kube_error)?;
        let current = scale
            .spec
            .and_then(|s| s.replicas)
            .map_or(0, |r| u32::try_from(r).unwrap_or(0));
        if current == desired {
            return Ok(());
        }
        if current > desired {
            let pods: Api<Pod> = Api::namespaced(client, &self.namespace);
            for id in observed.idlest((current - desired) as usize) {
                mark_for_removal(&pods, &id).await?;
            }
        }
        let replicas = i32::try_from(desired).unwrap_or(i32::MAX);
        deployments
            .patch_scale(
                &self.deployment,
                &patch_params(),
                &Patch::Merge(json!({ "spec": { "replicas": replicas } })),
            )
            .await
            .map_err(kube_error)?;
        info!(service = %self.spec.name, version = %self.spec.version,
              namespace = %self.namespace, deployment = %self.deployment, from = current,
              to = desired, "deployment scaled");
        Ok(())
    }
}

fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    }
}

/// Gives pod `name` the lowest deletion cost; a pod that does not exist is skipped.
async fn mark_for_removal(pods: &Api<Pod>, name: &str) -> Result<(), SchedulerError> {
    let patch = json!({ "metadata": { "annotations": { DELETION_COST: "-1000" } } });
    match pods
        .patch(name, &patch_params(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            debug!(instance = name, "instance id is not a pod here; not marked");
            Ok(())
        }
        Err(e) => Err(kube_error(e)),
    }
}

impl Scheduler for KubernetesScheduler {
    fn started(&self) -> u32 {
        self.applier.applied().unwrap_or(0)
    }

    async fn scale(&mut self, desired: u32, observed: &Observed) -> Result<(), SchedulerError> {
        let now = Instant::now();
        if self
            .synced_at
            .is_some_and(|at| now.duration_since(at) >= RESYNC_INTERVAL)
        {
            self.applier.forget();
        }
        if !self.applier.due(desired, now) {
            return Ok(());
        }
        let result = self.apply(desired, observed).await;
        if result.is_ok() {
            self.synced_at = Some(now);
        }
        self.applier.record(desired, &result, now);
        result
    }

    async fn shutdown(&mut self) {
        // The cluster's instances are the cluster's: a directory shutdown leaves them running.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::ScaleSettings;
    use crate::services::SchedulerSpec;
    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::Value;
    use tower_test::mock::Handle;

    fn spec() -> ServiceSpec {
        ServiceSpec {
            name: "web".into(),
            version: "v1".into(),
            scheduler: SchedulerSpec::Kubernetes {
                namespace: "shop".into(),
                deployment: "web-v1".into(),
            },
            health: "tcp".into(),
            drain_time: crate::services::DEFAULT_DRAIN_TIME,
            scale: ScaleSettings::default(),
        }
    }

    fn scale_body(replicas: i32) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": { "name": "web-v1", "namespace": "shop" },
            "spec": { "replicas": replicas },
            "status": { "replicas": replicas }
        }))
        .unwrap()
    }

    /// The API server's side: expects one request, checks it, answers.
    async fn expect(
        handle: &mut ApiServer,
        method: Method,
        path: &str,
        body: Option<Value>,
        status: StatusCode,
        answer: Vec<u8>,
    ) {
        let (request, respond) = handle.next_request().await.expect("a request");
        assert_eq!(request.method(), method);
        assert_eq!(request.uri().path(), path);
        let sent = request.into_body().collect_bytes().await.unwrap();
        match body {
            Some(expected) => {
                let sent: Value = serde_json::from_slice(&sent).unwrap();
                assert_eq!(sent, expected);
            }
            None => assert!(sent.is_empty()),
        }
        respond.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(answer))
                .unwrap(),
        );
    }

    fn not_found() -> Vec<u8> {
        serde_json::to_vec(&json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "pods \"web-old\" not found", "reason": "NotFound", "code": 404
        }))
        .unwrap()
    }

    type ApiServer = Handle<Request<Body>, Response<Body>>;

    /// A scheduler for `shop/web-v1` whose client talks to the returned mock API server.
    fn mocked() -> (KubernetesScheduler, ApiServer) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let k8s = KubernetesScheduler::with_client(&spec(), "shop", "web-v1", client);
        (k8s, handle)
    }

    /// Asserts that no further request reaches the mock API server.
    async fn assert_quiet(mut handle: ApiServer) {
        tokio::time::timeout(Duration::from_millis(50), handle.next_request())
            .await
            .expect_err("no further request");
    }

    const SCALE: &str = "/apis/apps/v1/namespaces/shop/deployments/web-v1/scale";

    #[tokio::test]
    async fn scaling_reads_marks_the_idlest_pods_and_patches_the_scale_subresource() {
        let (mut k8s, mut handle) = mocked();
        let server = tokio::spawn(async move {
            // Scale up from 1 to 3: read, then patch.
            expect(
                &mut handle,
                Method::GET,
                SCALE,
                None,
                StatusCode::OK,
                scale_body(1),
            )
            .await;
            let up = json!({ "spec": { "replicas": 3 } });
            expect(
                &mut handle,
                Method::PATCH,
                SCALE,
                Some(up),
                StatusCode::OK,
                scale_body(3),
            )
            .await;
            // Scale down from 3 to 1: the two idlest pods are marked, then the patch.
            expect(
                &mut handle,
                Method::GET,
                SCALE,
                None,
                StatusCode::OK,
                scale_body(3),
            )
            .await;
            let mark = json!({ "metadata": { "annotations": { DELETION_COST: "-1000" } } });
            for pod in ["web-idle", "web-old"] {
                let path = format!("/api/v1/namespaces/shop/pods/{pod}");
                let (status, answer) = if pod == "web-old" {
                    (StatusCode::NOT_FOUND, not_found())
                } else {
                    (
                        StatusCode::OK,
                        b"{\"metadata\":{\"name\":\"web-idle\"}}".to_vec(),
                    )
                };
                expect(
                    &mut handle,
                    Method::PATCH,
                    &path,
                    Some(mark.clone()),
                    status,
                    answer,
                )
                .await;
            }
            let down = json!({ "spec": { "replicas": 1 } });
            expect(
                &mut handle,
                Method::PATCH,
                SCALE,
                Some(down),
                StatusCode::OK,
                scale_body(1),
            )
            .await;
            handle
        });
        k8s.scale(3, &Observed::default()).await.unwrap();
        assert_eq!(k8s.started(), 3);
        k8s.scale(3, &Observed::default()).await.unwrap();
        let observed = Observed {
            registered: vec!["web-busy".into(), "web-idle".into(), "web-old".into()],
            busy: [("web-busy".to_string(), 4)].into(),
        };
        k8s.scale(1, &observed).await.unwrap();
        assert_eq!(k8s.started(), 1);
        // The unchanged count made no request.
        assert_quiet(server.await.unwrap()).await;
    }

    #[tokio::test]
    async fn api_errors_are_reported_and_retried_after_a_backoff() {
        let (mut k8s, mut handle) = mocked();
        let server = tokio::spawn(async move {
            let denied = serde_json::to_vec(&json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
                "message": "deployments.apps \"web-v1\" is forbidden", "reason": "Forbidden"
            }))
            .unwrap();
            expect(
                &mut handle,
                Method::GET,
                SCALE,
                None,
                StatusCode::FORBIDDEN,
                denied,
            )
            .await;
            handle
        });
        let e = k8s.scale(2, &Observed::default()).await.unwrap_err();
        assert!(e.to_string().contains("forbidden"), "{e}");
        assert_eq!(k8s.started(), 0);
        // Within the backoff nothing is sent.
        k8s.scale(2, &Observed::default()).await.unwrap();
        assert_quiet(server.await.unwrap()).await;
    }

    /// Runs only with `KUBECONFIG` set: scales `USHER_TEST_DEPLOYMENT` (default `usher-test`)
    /// in `USHER_TEST_NAMESPACE` (default `default`) of a real cluster to 2 and back to its
    /// previous count.
    #[tokio::test]
    async fn a_real_cluster_when_kubeconfig_is_set() {
        if std::env::var_os("KUBECONFIG").is_none() {
            eprintln!("KUBECONFIG is not set: skipping the real-cluster test");
            return;
        }
        let namespace = std::env::var("USHER_TEST_NAMESPACE").unwrap_or_else(|_| "default".into());
        let deployment =
            std::env::var("USHER_TEST_DEPLOYMENT").unwrap_or_else(|_| "usher-test".into());
        let client = Client::try_default()
            .await
            .expect("a cluster from KUBECONFIG");
        let api: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
        let before = api
            .get_scale(&deployment)
            .await
            .expect("the test deployment");
        let before = before.spec.and_then(|s| s.replicas).unwrap_or(0);
        let mut k8s = KubernetesScheduler::with_client(&spec(), &namespace, &deployment, client);
        k8s.scale(2, &Observed::default()).await.unwrap();
        let now = api.get_scale(&deployment).await.unwrap();
        assert_eq!(now.spec.and_then(|s| s.replicas), Some(2));
        k8s.scale(before as u32, &Observed::default())
            .await
            .unwrap();
    }
}
