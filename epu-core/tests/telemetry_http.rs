//! The telemetry HTTP endpoint: /metrics, /healthz, /readyz, and clean shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use epu_core::telemetry::{serve_http, spawn_http, Health, Metrics, TelemetryError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// Bounds every network step so a broken server fails the test instead of hanging it.
const STEP: Duration = Duration::from_secs(10);

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

/// A minimal HTTP/1.1 GET with `Connection: close`.
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<Reply> {
    let mut stream = tokio::time::timeout(STEP, TcpStream::connect(addr)).await??;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(Reply {
        status,
        headers: head.to_ascii_lowercase(),
        body: body.to_owned(),
    })
}

#[tokio::test]
async fn endpoints_answer_and_shutdown_stops_the_server() {
    let metrics = Metrics::new();
    let launches = prometheus::IntCounter::new("epu_launches_total", "instances launched").unwrap();
    metrics.register(Box::new(launches.clone())).unwrap();
    launches.inc_by(7);
    let health = Health::new();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(serve_http(
        listener,
        metrics.clone(),
        health.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));

    let reply = get(addr, "/metrics").await.unwrap();
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .headers
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        reply.headers
    );
    assert!(
        reply.body.contains("epu_launches_total 7"),
        "{}",
        reply.body
    );
    assert!(
        reply
            .body
            .contains("# HELP epu_launches_total instances launched"),
        "{}",
        reply.body
    );

    let reply = get(addr, "/healthz").await.unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "ok"));

    let reply = get(addr, "/readyz").await.unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (503, "not ready"));
    health.set_ready(true);
    let reply = get(addr, "/readyz").await.unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "ready"));
    health.set_ready(false);
    assert_eq!(get(addr, "/readyz").await.unwrap().status, 503);

    assert_eq!(get(addr, "/nope").await.unwrap().status, 404);

    // Metrics registered after the server started show up too.
    let gauge =
        prometheus::IntGauge::new("epu_domain_instances", "instances in the domain").unwrap();
    metrics.register(Box::new(gauge.clone())).unwrap();
    gauge.set(3);
    assert!(get(addr, "/metrics")
        .await
        .unwrap()
        .body
        .contains("epu_domain_instances 3"));

    stop_tx.send(()).unwrap();
    let result = tokio::time::timeout(STEP, server)
        .await
        .expect("server stops within 10 s");
    result.unwrap().unwrap();

    // Nothing listens there any more.
    assert!(get(addr, "/healthz").await.is_err());
}

#[tokio::test]
async fn spawn_http_reports_the_bound_port() {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (addr, task) = spawn_http(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Metrics::new(),
        Health::new(),
        async move {
            let _ = stop_rx.await;
        },
    )
    .await
    .unwrap();
    assert_ne!(addr.port(), 0);
    assert_eq!(get(addr, "/healthz").await.unwrap().status, 200);

    // A second server on the same port is a bind error that names the address.
    let err = spawn_http(addr, Metrics::new(), Health::new(), std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(err, TelemetryError::Bind { .. }), "{err:?}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");

    stop_tx.send(()).unwrap();
    tokio::time::timeout(STEP, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
