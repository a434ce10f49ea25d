//! The EC2 driver (feature `ec2`): EC2 or any EC2-compatible API (moto's server in
//! tests). The only module that knows the AWS SDK.
//!
//! * **Launch**: one `RunInstances` per launch with `MinCount = MaxCount = count` and
//!   `ClientToken` = the launch's stored token, so a re-driven launch returns the same
//!   reservation. Instances are tagged at launch with `epu:run`, `epu:domain`,
//!   `epu:launch` and the deployable's tags; then each gets `epu:node` and `Name` (nodes
//!   are matched to instances in `AmiLaunchIndex` order, which the token makes stable).
//!   A launch of one node is tagged `epu:node` in `RunInstances` itself. A user-data
//!   template that uses `{{node_id}}` needs per-node user data, so such a launch is one
//!   `RunInstances` per node with tokens derived from the launch token.
//! * **List**: `DescribeInstances` filtered by `tag:epu:run`.
//! * **Terminate**: `TerminateInstances`; ids EC2 does not know count as gone.
//! * **Errors**: classified by code ([`super::classify_code`]) or, without a code, by
//!   HTTP status and transport failure (timeouts, unreachable endpoint).
//!
//! **Retries**: the SDK is built with `RetryConfig::disabled()`, so every SDK call is a
//! single attempt and only the provisioner's `epu_core::backoff::retry` loop retries —
//! the two never multiply.
//!
//! Region, endpoint and credentials come from `[drivers.ec2]` when set there, otherwise
//! from the standard AWS chain (`AWS_REGION`, `AWS_ENDPOINT_URL_EC2`,
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, profiles, IMDS, …).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::config::Credentials;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, IamInstanceProfileSpecification, Instance, InstanceStateName, InstanceType,
    ResourceType, Tag, TagSpecification,
};
use aws_sdk_ec2::Client;
use epu_core::config::{BusConfig, Secret, Transport};
use epu_core::wire::RunName;
use epu_model::messages::{Deployable, Ec2Deployable};

use super::{
    render_template, uses_node_id, IaasDriver, IaasError, IaasErrorKind, InstanceRef,
    InstanceState, LaunchOutcome, LaunchRequest, LaunchedInstance, ListedInstance, TemplateContext,
    TerminateOutcome,
};
use crate::config::Ec2DriverConfig;
use crate::error::ProvisionerError;

/// Tag keys.
pub const TAG_RUN: &str = "epu:run";
pub const TAG_DOMAIN: &str = "epu:domain";
pub const TAG_NODE: &str = "epu:node";
pub const TAG_LAUNCH: &str = "epu:launch";

/// The EC2 driver. See the module docs.
#[derive(Clone, Debug)]
pub struct Ec2Driver {
    client: Client,
    worker_amqp_url: Option<Secret>,
}

impl Ec2Driver {
    /// Builds the SDK client from `[drivers.ec2]` and the standard chain. `bus` gives
    /// the broker URL for user data when `worker_amqp_url` is not set.
    pub async fn from_config(
        cfg: &Ec2DriverConfig,
        bus: &BusConfig,
    ) -> Result<Self, ProvisionerError> {
        let mut loader =
            aws_config::defaults(BehaviorVersion::latest()).retry_config(RetryConfig::disabled());
        if cfg.call_timeout_secs > 0.0 {
            let t = Duration::from_secs_f64(cfg.call_timeout_secs);
            loader = loader.timeout_config(
                TimeoutConfig::builder()
                    .operation_timeout(t)
                    .operation_attempt_timeout(t)
                    .connect_timeout(t.min(Duration::from_secs(10)))
                    .build(),
            );
        }
        if let Some(region) = &cfg.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(url) = &cfg.endpoint_url {
            loader = loader.endpoint_url(url.clone());
        }
        if let (Some(ak), Some(sk)) = (&cfg.access_key_id, &cfg.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(
                ak.expose(),
                sk.expose(),
                cfg.session_token.as_ref().map(|s| s.expose().to_string()),
                None,
                "epu-provisioner-config",
            ));
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(ProvisionerError::Driver {
                driver: "ec2",
                message:
                    "no AWS region: set drivers.ec2.region (EPU_DRIVERS__EC2__REGION) or AWS_REGION"
                        .into(),
            });
        }
        let worker_amqp_url = match (&cfg.worker_amqp_url, bus.transport) {
            (Some(u), _) => Some(u.clone()),
            (None, Transport::Amqp) => Some(Secret::new(bus.amqp_url.clone())),
            (None, Transport::Local) => None,
        };
        Ok(Ec2Driver {
            client: Client::new(&sdk),
            worker_amqp_url,
        })
    }

    /// A driver over an existing client (tests).
    pub fn from_client(client: Client) -> Self {
        Ec2Driver {
            client,
            worker_amqp_url: None,
        }
    }

    /// The SDK client (tests use it to act "behind the provisioner's back").
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn heartbeat_block(&self, req: &LaunchRequest, node_id: Option<&str>) -> String {
        let mut lines = vec![
            format!("EPU_RUN={}", req.run),
            format!("EPU_DOMAIN={}", req.domain),
            format!("EPU_LAUNCH_ID={}", req.launch_id),
        ];
        if let Some(n) = node_id {
            lines.push(format!("EPU_NODE_ID={n}"));
        }
        if let Some(url) = &self.worker_amqp_url {
            lines.push("EPU_BUS__TRANSPORT=amqp".to_string());
            lines.push(format!("EPU_BUS__AMQP_URL={}", url.expose()));
        }
        lines.join("\n")
    }

    async fn run_batch(
        &self,
        req: &LaunchRequest,
        spec: &Ec2Deployable,
        nodes: &[String],
        token: &str,
    ) -> Result<Vec<LaunchedInstance>, IaasError> {
        let count = i32::try_from(nodes.len())
            .map_err(|_| IaasError::bad_request("too many nodes in one launch"))?;
        let single = if nodes.len() == 1 {
            nodes.first()
        } else {
            None
        };
        let user_data = match &spec.user_data {
            Some(t) => {
                let hb = self.heartbeat_block(req, single.map(String::as_str));
                let ctx = TemplateContext {
                    node_id: single.map(String::as_str),
                    run: req.run.as_str(),
                    domain: &req.domain,
                    launch_id: &req.launch_id,
                    heartbeat: &hb,
                    vars: Some(&req.vars),
                };
                Some(base64(
                    render_template(t, &ctx)
                        .map_err(IaasError::bad_request)?
                        .as_bytes(),
                ))
            }
            None => None,
        };
        let mut tags = vec![
            tag(TAG_RUN, req.run.as_str()),
            tag(TAG_DOMAIN, &req.domain),
            tag(TAG_LAUNCH, &req.launch_id),
        ];
        for (k, v) in &spec.tags {
            tags.push(tag(k, v));
        }
        if let Some(n) = single {
            tags.push(tag(TAG_NODE, n));
            tags.push(tag("Name", n));
        }
        let mut call = self
            .client
            .run_instances()
            .image_id(&spec.image)
            .instance_type(InstanceType::from(spec.instance_type.as_str()))
            .min_count(count)
            .max_count(count)
            .client_token(token)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .set_tags(Some(tags))
                    .build(),
            );
        if let Some(k) = &spec.key_name {
            call = call.key_name(k);
        }
        if let Some(s) = &spec.subnet {
            call = call.subnet_id(s);
        }
        if !spec.security_groups.is_empty() {
            if spec.security_groups.iter().all(|g| g.starts_with("sg-")) {
                call = call.set_security_group_ids(Some(spec.security_groups.clone()));
            } else {
                call = call.set_security_groups(Some(spec.security_groups.clone()));
            }
        }
        if let Some(p) = &spec.iam_profile {
            let prof = if p.starts_with("arn:") {
                IamInstanceProfileSpecification::builder().arn(p).build()
            } else {
                IamInstanceProfileSpecification::builder().name(p).build()
            };
            call = call.iam_instance_profile(prof);
        }
        if let Some(ud) = user_data {
            call = call.user_data(ud);
        }
        let out = call.send().await.map_err(classify_sdk_error)?;
        let mut instances: Vec<&Instance> = out.instances().iter().collect();
        instances.sort_by_key(|i| i.ami_launch_index().unwrap_or(0));
        if instances.len() != nodes.len() {
            return Err(IaasError::new(
                IaasErrorKind::Other,
                format!(
                    "RunInstances asked for {} instances and returned {}",
                    nodes.len(),
                    instances.len()
                ),
            ));
        }
        let mut launched = Vec::with_capacity(nodes.len());
        for (node, inst) in nodes.iter().zip(instances) {
            let Some(id) = inst.instance_id() else {
                return Err(IaasError::new(
                    IaasErrorKind::Other,
                    "RunInstances returned an instance without an id",
                ));
            };
            if single.is_none() {
                self.client
                    .create_tags()
                    .resources(id)
                    .tags(tag(TAG_NODE, node))
                    .tags(tag("Name", node))
                    .send()
                    .await
                    .map_err(classify_sdk_error)?;
            }
            launched.push(LaunchedInstance {
                node_id: node.clone(),
                iaas_id: id.to_string(),
                incarnation: None,
                state: map_state(inst),
                addresses: addresses(inst),
            });
        }
        Ok(launched)
    }

    async fn terminate_ids(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, TerminateOutcome>, IaasError> {
        let res = self
            .client
            .terminate_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await;
        match res {
            Ok(out) => {
                let mut map = HashMap::new();
                for change in out.terminating_instances() {
                    let Some(id) = change.instance_id() else {
                        continue;
                    };
                    let gone = change
                        .current_state()
                        .and_then(|s| s.name())
                        .is_some_and(|n| *n == InstanceStateName::Terminated);
                    map.insert(
                        id.to_string(),
                        if gone {
                            TerminateOutcome::Gone
                        } else {
                            TerminateOutcome::Stopping
                        },
                    );
                }
                Ok(map)
            }
            Err(e) => {
                let err = classify_sdk_error(e);
                let unknown_id = err.kind == IaasErrorKind::NotFound
                    || err.code.as_deref() == Some("InvalidInstanceID.Malformed");
                if unknown_id && ids.len() == 1 {
                    let mut map = HashMap::new();
                    if let Some(id) = ids.first() {
                        map.insert(id.clone(), TerminateOutcome::Gone);
                    }
                    Ok(map)
                } else if unknown_id {
                    // One unknown id fails the whole call: ask one by one.
                    let mut map = HashMap::new();
                    for id in ids {
                        let one = Box::pin(self.terminate_ids(std::slice::from_ref(id))).await?;
                        map.extend(one);
                    }
                    Ok(map)
                } else {
                    Err(err)
                }
            }
        }
    }
}

fn tag(k: &str, v: &str) -> Tag {
    Tag::builder().key(k).value(v).build()
}

fn tag_value<'a>(inst: &'a Instance, key: &str) -> Option<&'a str> {
    inst.tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

fn map_state(inst: &Instance) -> InstanceState {
    match inst.state().and_then(|s| s.name()) {
        Some(InstanceStateName::Pending) => InstanceState::Pending,
        Some(InstanceStateName::Running) => InstanceState::Running,
        Some(InstanceStateName::ShuttingDown)
        | Some(InstanceStateName::Stopping)
        | Some(InstanceStateName::Stopped) => InstanceState::Stopping,
        Some(InstanceStateName::Terminated) => InstanceState::Terminated,
        _ => InstanceState::Pending,
    }
}

fn addresses(inst: &Instance) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(a) = inst.private_ip_address() {
        out.push(a.to_string());
    }
    if let Some(a) = inst.public_ip_address() {
        out.push(a.to_string());
    }
    out
}

/// A stable short hash (FNV-1a) for per-node tokens.
fn fnv64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Standard base64 with padding (EC2 wants user data encoded).
pub fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Classifies an SDK error: by the service's error code, else by HTTP status, else by
/// the transport failure. The message carries the code and EC2's message only.
pub fn classify_sdk_error<E>(err: SdkError<E, aws_sdk_ec2::config::http::HttpResponse>) -> IaasError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    if let Some(code) = err.code() {
        let message = err.message().unwrap_or("(no message)").to_string();
        return IaasError::from_code(code, message);
    }
    match &err {
        SdkError::TimeoutError(_) => {
            IaasError::new(IaasErrorKind::Timeout, "the EC2 call timed out")
        }
        SdkError::DispatchFailure(d) => {
            let kind = if d.is_timeout() {
                IaasErrorKind::Timeout
            } else if d.is_io() {
                IaasErrorKind::Unavailable
            } else {
                IaasErrorKind::Other
            };
            IaasError::new(
                kind,
                format!(
                    "cannot reach the EC2 endpoint: {}",
                    DisplayErrorContext(&err)
                ),
            )
        }
        SdkError::ConstructionFailure(_) => IaasError::bad_request(format!(
            "cannot build the EC2 request: {}",
            DisplayErrorContext(&err)
        )),
        SdkError::ResponseError(r) => {
            let status = r.raw().status().as_u16();
            IaasError::new(
                status_kind(status),
                format!("unreadable EC2 response (HTTP {status})"),
            )
        }
        SdkError::ServiceError(s) => {
            let status = s.raw().status().as_u16();
            IaasError::new(status_kind(status), format!("EC2 error (HTTP {status})"))
        }
        _ => IaasError::new(IaasErrorKind::Other, DisplayErrorContext(&err).to_string()),
    }
}

fn status_kind(status: u16) -> IaasErrorKind {
    match status {
        401 | 403 => IaasErrorKind::Auth,
        408 | 504 => IaasErrorKind::Timeout,
        429 => IaasErrorKind::Throttled,
        500..=599 => IaasErrorKind::Unavailable,
        400..=499 => IaasErrorKind::BadRequest,
        _ => IaasErrorKind::Other,
    }
}

#[async_trait]
impl IaasDriver for Ec2Driver {
    fn name(&self) -> &str {
        "ec2"
    }

    async fn launch(&self, req: &LaunchRequest) -> Result<LaunchOutcome, IaasError> {
        let Deployable::Ec2(spec) = &req.deployable else {
            return Err(IaasError::bad_request(
                "the ec2 driver launches ec2 deployables only",
            ));
        };
        let per_node =
            req.node_ids.len() > 1 && spec.user_data.as_deref().is_some_and(uses_node_id);
        if !per_node {
            let instances = self.run_batch(req, spec, &req.node_ids, &req.token).await?;
            return Ok(LaunchOutcome {
                instances,
                failed: Vec::new(),
            });
        }
        let mut out = LaunchOutcome::default();
        for node in &req.node_ids {
            let token = format!("{}-{:016x}", req.token, fnv64(node));
            match self
                .run_batch(req, spec, std::slice::from_ref(node), &token)
                .await
            {
                Ok(mut i) => out.instances.append(&mut i),
                // The retry asks again for every node; tokens make the done ones no-ops.
                Err(e) if e.is_retryable() => return Err(e),
                Err(e) => out.failed.push((node.clone(), e)),
            }
        }
        Ok(out)
    }

    async fn terminate(
        &self,
        instances: &[InstanceRef],
    ) -> Result<Vec<TerminateOutcome>, IaasError> {
        let ids: Vec<String> = instances.iter().map(|r| r.iaas_id.clone()).collect();
        let mut map = HashMap::new();
        for chunk in ids.chunks(500) {
            map.extend(self.terminate_ids(chunk).await?);
        }
        Ok(ids
            .iter()
            .map(|id| map.get(id).cloned().unwrap_or(TerminateOutcome::Stopping))
            .collect())
    }

    async fn list(&self, run: &RunName) -> Result<Vec<ListedInstance>, IaasError> {
        let mut out = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let page = self
                .client
                .describe_instances()
                .filters(
                    Filter::builder()
                        .name(format!("tag:{TAG_RUN}"))
                        .values(run.as_str())
                        .build(),
                )
                .set_next_token(next.take())
                .send()
                .await
                .map_err(classify_sdk_error)?;
            for res in page.reservations() {
                for inst in res.instances() {
                    let Some(id) = inst.instance_id() else {
                        continue;
                    };
                    out.push(ListedInstance {
                        iaas_id: id.to_string(),
                        incarnation: None,
                        node_id: tag_value(inst, TAG_NODE).map(str::to_string),
                        launch_id: tag_value(inst, TAG_LAUNCH).map(str::to_string),
                        state: map_state(inst),
                        addresses: addresses(inst),
                        failure: None,
                    });
                }
            }
            match page.next_token() {
                Some(t) if !t.is_empty() => next = Some(t.to_string()),
                _ => break,
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(b"#!/bin/sh\n"), "IyEvYmluL3NoCg==");
    }

    #[test]
    fn statuses_classify() {
        assert_eq!(status_kind(403), IaasErrorKind::Auth);
        assert_eq!(status_kind(503), IaasErrorKind::Unavailable);
        assert_eq!(status_kind(400), IaasErrorKind::BadRequest);
        assert_eq!(fnv64("a"), fnv64("a"));
        assert_ne!(fnv64("a"), fnv64("b"));
    }
}
