//! The EC2 driver against moto's server (an EC2 API emulator), and its error
//! classification against a tiny HTTP server that answers EC2 error documents.
//!
//! Needs `EPU_MOTO_URL` (for example `http://127.0.0.1:5000`): install moto with
//! `python3 -m pip install 'moto[server]'`, start `moto_server -H 127.0.0.1 -p 5000` and
//! set `EPU_MOTO_URL=http://127.0.0.1:5000` — or run `bash .ci/run`, which does all that.
//! The moto test also needs RabbitMQ (see `tests/local.rs`).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{
    Filter, InstanceStateName, InstanceType, ResourceType, Tag, TagSpecification,
};
use common::{call, describe, ec2_deployable, terminate_all_until_zero, Subscriber};
use epu_core::bus::local::LocalBus;
use epu_core::clock::SystemClock;
use epu_core::config::{BusConfig, Secret};
use epu_core::store::MemStore;
use epu_core::testing::{amqp_bus, amqp_url, test_options, test_run};
use epu_core::wire::{Op, RunName};
use epu_model::messages::{Deployable, Ec2Deployable, FailReason};
use epu_model::NodeState;
use provisioner::config::Ec2DriverConfig;
use provisioner::driver::ec2::{Ec2Driver, TAG_DOMAIN, TAG_LAUNCH, TAG_NODE, TAG_RUN};
use provisioner::driver::{IaasDriver, IaasErrorKind, LaunchRequest};
use provisioner::{Drivers, Provisioner, ProvisionerConfig};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);

fn moto_url() -> String {
    match std::env::var("EPU_MOTO_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => panic!(
            "this test needs moto's EC2 server and EPU_MOTO_URL pointing at it:\n  \
             python3 -m pip install 'moto[server]'\n  \
             moto_server -H 127.0.0.1 -p 5000 &\n  \
             export EPU_MOTO_URL=http://127.0.0.1:5000\n\
             or run the whole suite with `bash .ci/run`, which does all of it"
        ),
    }
}

fn ec2_config(endpoint: &str, timeout_secs: f64) -> Ec2DriverConfig {
    Ec2DriverConfig {
        region: Some("us-east-1".into()),
        endpoint_url: Some(endpoint.to_string()),
        access_key_id: Some(Secret::new("testing")),
        secret_access_key: Some(Secret::new("testing")),
        session_token: None,
        call_timeout_secs: timeout_secs,
        worker_amqp_url: None,
    }
}

async fn driver(endpoint: &str, timeout_secs: f64) -> Ec2Driver {
    Ec2Driver::from_config(&ec2_config(endpoint, timeout_secs), &BusConfig::default())
        .await
        .expect("ec2 driver")
}

/// Instances tagged with the run, as (id, state, tags).
async fn by_run_tag(
    client: &aws_sdk_ec2::Client,
    run: &RunName,
) -> Vec<(String, InstanceStateName, BTreeMap<String, String>)> {
    let out = client
        .describe_instances()
        .filters(
            Filter::builder()
                .name(format!("tag:{TAG_RUN}"))
                .values(run.as_str())
                .build(),
        )
        .send()
        .await
        .expect("describe");
    let mut v = Vec::new();
    for r in out.reservations() {
        for i in r.instances() {
            let tags = i
                .tags()
                .iter()
                .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                .collect();
            v.push((
                i.instance_id().unwrap_or_default().to_string(),
                i.state()
                    .and_then(|s| s.name())
                    .cloned()
                    .unwrap_or(InstanceStateName::Pending),
                tags,
            ));
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_on_moto_tags_disappearances_zombies_and_terminate_all() {
    let url = moto_url();
    let run = test_run("ec2-moto");
    let mut cfg = ProvisionerConfig::new(run.clone());
    cfg.poll_interval_secs = 0.5;
    cfg.disappear_grace_secs = 1.0;
    cfg.bus.amqp_url = amqp_url();
    cfg.drivers.local.enabled = false;
    cfg.drivers.sim.enabled = false;
    cfg.drivers.ec2 = Some(ec2_config(&url, 10.0));
    let clock = SystemClock::shared();
    let drivers = provisioner::drivers_from_config(&cfg, clock.clone())
        .await
        .expect("drivers");
    let raw = driver(&url, 10.0).await;
    let ec2 = raw.client();

    let prov_bus = amqp_bus(&run, test_options("provisioner")).await;
    let client = amqp_bus(&run, test_options("client")).await;
    let sub = Subscriber::start(&client).await;
    let prov = Provisioner::new(
        cfg,
        Arc::new(prov_bus.clone()),
        Arc::new(MemStore::new()),
        clock,
        drivers,
    )
    .expect("provisioner");
    let running = prov.start().await.expect("start");

    // Launch 5 in one batch, tagged.
    let ids: Vec<String> = (0..5).map(|i| format!("e{i}")).collect();
    call(
        &client,
        &run,
        Op::Provision,
        json!({"launch_id": "batch1", "domain": "web", "count": 5, "node_ids": ids,
               "deployable": {"driver": "ec2", "image": "ami-12345678", "instance_type": "t2.micro",
                              "tags": {"team": "epu"}, "user_data": "#!/bin/sh\n{{heartbeat}}\n"}}),
    )
    .await
    .expect("provision");
    let mut iaas = BTreeMap::new();
    for id in &ids {
        let (_, rec) = sub.wait_state(id, NodeState::Running, WAIT).await;
        iaas.insert(id.clone(), rec.iaas_id.clone().expect("instance id"));
    }
    let listed = by_run_tag(ec2, &run).await;
    assert_eq!(listed.len(), 5, "{listed:?}");
    for (inst, state, tags) in &listed {
        assert_eq!(*state, InstanceStateName::Running);
        assert_eq!(tags.get(TAG_RUN).map(String::as_str), Some(run.as_str()));
        assert_eq!(tags.get(TAG_DOMAIN).map(String::as_str), Some("web"));
        assert_eq!(tags.get(TAG_LAUNCH).map(String::as_str), Some("batch1"));
        assert_eq!(tags.get("team").map(String::as_str), Some("epu"));
        let node = tags.get(TAG_NODE).expect("node tag");
        assert_eq!(iaas.get(node), Some(inst), "node tag matches the record");
    }

    // Terminated behind the provisioner's back: reported within a poll plus the grace.
    let victim = iaas["e2"].clone();
    let t0 = Instant::now();
    ec2.terminate_instances()
        .instance_ids(&victim)
        .send()
        .await
        .expect("terminate directly");
    let (arrived, rec) = sub.wait_state("e2", NodeState::Failed, WAIT).await;
    let took = arrived.duration_since(t0);
    assert!(
        took <= Duration::from_millis(500 + 1000 + 1000),
        "reported after {took:?}"
    );
    assert_eq!(rec.reason, Some(FailReason::NodeDisappeared));

    // A zombie: tagged with the run, unknown to the store.
    let zombie = ec2
        .run_instances()
        .image_id("ami-12345678")
        .instance_type(InstanceType::T2Micro)
        .min_count(1)
        .max_count(1)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(Tag::builder().key(TAG_RUN).value(run.as_str()).build())
                .build(),
        )
        .send()
        .await
        .expect("run a stranger");
    let zombie_id = zombie.instances()[0].instance_id().expect("id").to_string();
    let deadline = Instant::now() + WAIT;
    loop {
        let state = by_run_tag(ec2, &run)
            .await
            .into_iter()
            .find(|(id, _, _)| *id == zombie_id)
            .map(|(_, s, _)| s);
        if state == Some(InstanceStateName::Terminated) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "zombie {zombie_id} not terminated: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The nodes the store knows are untouched by the zombie sweep.
    let running_now = describe(&client, &run)
        .await
        .iter()
        .filter(|n| n.state == NodeState::Running)
        .count();
    assert_eq!(running_now, 4);
    let text = prov.metrics().encode().expect("metrics");
    assert!(
        text.contains("epu_provisioner_zombies_terminated_total{driver=\"ec2\"} 1"),
        "{text}"
    );

    // terminate_all: the IaaS lists nothing of the run that is not terminated.
    terminate_all_until_zero(&client, &run, WAIT).await;
    let left: Vec<_> = by_run_tag(ec2, &run)
        .await
        .into_iter()
        .filter(|(_, s, _)| *s != InstanceStateName::Terminated)
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // describe_iaas (what `epumgmt killrun` checks) agrees with the IaaS.
    let iaas = call(&client, &run, Op::DescribeIaas, json!({}))
        .await
        .expect("describe_iaas");
    let listed = iaas["instances"].as_array().expect("instances");
    assert!(
        !listed.is_empty(),
        "terminated instances are still listed by moto: {iaas}"
    );
    assert!(
        listed
            .iter()
            .all(|i| i["alive"] == json!(false) && i["driver"] == json!("ec2")),
        "{iaas}"
    );

    running.stop().await;
    sub.stop().await;
    client.delete_topology().await.expect("cleanup");
    client.close().await;
    prov_bus.close().await;
}

// ---------------------------------------------------------------------------------------
// error classification of real SDK errors

/// What the fake endpoint answers: status and EC2 error code, or silence.
#[derive(Clone)]
enum Answer {
    Error(u16, &'static str),
    Hang,
}

struct ErrorServer {
    url: String,
    /// RunInstances requests since the last `answer`.
    requests: Arc<AtomicUsize>,
    answer: Arc<Mutex<Answer>>,
    task: tokio::task::JoinHandle<()>,
}

impl ErrorServer {
    async fn start() -> ErrorServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let requests = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(Mutex::new(Answer::Error(500, "InternalError")));
        let (r, a) = (requests.clone(), answer.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (r, a) = (r.clone(), a.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Read the head, then the body by Content-Length.
                    let body_len = loop {
                        let Ok(n) = sock.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                            let len = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break end + 4 + len;
                        }
                    };
                    while buf.len() < body_len {
                        let Ok(n) = sock.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    // Count the calls that matter here: launches.
                    if String::from_utf8_lossy(&buf).contains("Action=RunInstances") {
                        r.fetch_add(1, Ordering::SeqCst);
                    }
                    let answer = a.lock().expect("lock").clone();
                    match answer {
                        Answer::Hang => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                        }
                        Answer::Error(status, code) => {
                            let body = format!(
                                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>fake {code}</Message></Error></Errors><RequestID>req-1</RequestID></Response>"
                            );
                            let resp = format!(
                                "HTTP/1.1 {status} Error\r\nContent-Type: text/xml;charset=UTF-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            );
                            let _ = sock.write_all(resp.as_bytes()).await;
                            let _ = sock.shutdown().await;
                        }
                    }
                });
            }
        });
        ErrorServer {
            url,
            requests,
            answer,
            task,
        }
    }

    fn answer(&self, a: Answer) {
        *self.answer.lock().expect("lock") = a;
        self.requests.store(0, Ordering::SeqCst);
    }
}

fn launch_req(run: &RunName) -> LaunchRequest {
    LaunchRequest {
        run: run.clone(),
        launch_id: "l".into(),
        token: "token-1".into(),
        domain: "d".into(),
        node_ids: vec!["n1".into()],
        deployable: Deployable::Ec2(Ec2Deployable {
            image: "ami-12345678".into(),
            instance_type: "t3.micro".into(),
            key_name: None,
            subnet: None,
            security_groups: vec![],
            iam_profile: None,
            user_data: None,
            tags: BTreeMap::new(),
        }),
        vars: BTreeMap::new(),
    }
}

#[tokio::test]
async fn real_sdk_errors_are_classified_and_only_our_loop_retries() {
    let server = ErrorServer::start().await;
    let drv = driver(&server.url, 1.0).await;
    let run = test_run("ec2-errors");
    let req = launch_req(&run);
    for (answer, kind) in [
        (
            Answer::Error(500, "InsufficientInstanceCapacity"),
            IaasErrorKind::Capacity,
        ),
        (
            Answer::Error(400, "InstanceLimitExceeded"),
            IaasErrorKind::Capacity,
        ),
        (
            Answer::Error(503, "RequestLimitExceeded"),
            IaasErrorKind::Throttled,
        ),
        (Answer::Error(401, "AuthFailure"), IaasErrorKind::Auth),
        (
            Answer::Error(400, "InvalidAMIID.Malformed"),
            IaasErrorKind::BadRequest,
        ),
        (
            Answer::Error(500, "InternalError"),
            IaasErrorKind::Unavailable,
        ),
        (Answer::Hang, IaasErrorKind::Timeout),
    ] {
        server.answer(answer);
        let e = drv.launch(&req).await.expect_err("an error");
        assert_eq!(e.kind, kind, "{e}");
        assert_eq!(
            server.requests.load(Ordering::SeqCst),
            1,
            "the SDK must not retry: {e}"
        );
        assert!(
            !e.message.contains("testing"),
            "no credentials in errors: {e}"
        );
    }

    // Through the provisioner: throttling is retried by our loop only (3 tries, 3
    // requests), capacity fails the node at once.
    let mut cfg = ProvisionerConfig::new(run.clone());
    cfg.poll_interval_secs = 3600.0;
    cfg.iaas_retry.initial_ms = 1;
    cfg.iaas_retry.max_ms = 5;
    cfg.iaas_retry.max_attempts = 3;
    cfg.drivers.local.enabled = false;
    let bus = LocalBus::new(run.clone(), test_options("host"));
    let client = bus.view(test_options("client"));
    let sub = Subscriber::start(&bus.view(test_options("controller"))).await;
    let prov = Provisioner::new(
        cfg,
        Arc::new(bus.view(test_options("provisioner"))),
        Arc::new(MemStore::new()),
        SystemClock::shared(),
        Drivers::new().with(Arc::new(drv)),
    )
    .expect("provisioner");
    let running = prov.start().await.expect("start");
    for (answer, launch, reason, tries) in [
        (
            Answer::Error(503, "RequestLimitExceeded"),
            "throttled",
            FailReason::IaasRateLimited,
            3,
        ),
        (
            Answer::Error(500, "InsufficientInstanceCapacity"),
            "full",
            FailReason::IaasFull,
            1,
        ),
    ] {
        server.answer(answer);
        let v = call(
            &client,
            &run,
            Op::Provision,
            json!({"launch_id": launch, "domain": "d", "count": 2, "deployable": ec2_deployable()}),
        )
        .await
        .expect("provision");
        let node = v["nodes"][0]["node_id"].as_str().expect("id").to_string();
        let (_, rec) = sub.wait_state(&node, NodeState::Failed, WAIT).await;
        assert_eq!(rec.reason, Some(reason));
        assert_eq!(server.requests.load(Ordering::SeqCst), tries, "{launch}");
    }
    running.stop().await;
    sub.stop().await;
    server.task.abort();
}
