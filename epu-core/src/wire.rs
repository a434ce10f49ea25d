//! The wire contract: run names, queue names, the envelope, operations, replies,
//! signatures, and the one decoder every transport uses.
//!
//! This module is the only place that knows the envelope's JSON shape. Both
//! transports hand raw bytes plus headers to [`decode`]; whatever it refuses goes
//! to the dead-letter queue with the [`RejectReason`] as the reason. See
//! `PROTOCOL.md` at the repository root for the same contract in prose.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;
use uuid::Uuid;

/// The protocol version this build speaks (`v` in the envelope).
pub const PROTOCOL_VERSION: u32 = 1;
/// AMQP header carrying the hex HMAC-SHA256 of the envelope bytes.
pub const SIGNATURE_HEADER: &str = "x-epu-signature";
/// AMQP header a dead letter carries: why it was refused.
pub const REJECT_REASON_HEADER: &str = "x-epu-reject-reason";
/// AMQP header a dead letter carries: the queue it was refused on.
pub const REJECT_QUEUE_HEADER: &str = "x-epu-rejected-from";

/// A validated run name: `[a-z0-9-]{1,40}`. Everything of a run is namespaced by it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct RunName(String);

impl RunName {
    pub fn new(name: &str) -> Result<Self, WireError> {
        let ok = !name.is_empty()
            && name.len() <= 40
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(RunName(name.to_string()))
        } else {
            Err(WireError::BadRunName(name.chars().take(60).collect()))
        }
    }

    /// A fresh run name with a random suffix, for tests and ad-hoc runs.
    pub fn random(prefix: &str) -> Self {
        let suffix = Uuid::new_v4().simple().to_string();
        let keep = 40usize.saturating_sub(9).min(prefix.len());
        let name = format!("{}-{}", &prefix[..keep], &suffix[..8]);
        RunName::new(&name).unwrap_or_else(|_| RunName(format!("run-{}", &suffix[..8])))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The run's durable topic exchange, `epu.<run>`.
    pub fn exchange(&self) -> String {
        format!("epu.{}", self.0)
    }

    /// A service's durable queue, `epu.<run>.<service>`.
    pub fn queue(&self, service: Service) -> String {
        format!("epu.{}.{}", self.0, service.as_str())
    }

    /// The run's dead-letter queue, `epu.<run>.dead`.
    pub fn dead_queue(&self) -> String {
        format!("epu.{}.dead", self.0)
    }
}

impl fmt::Display for RunName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for RunName {
    type Err = WireError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunName::new(s)
    }
}

impl<'de> Deserialize<'de> for RunName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RunName::new(&s).map_err(serde::de::Error::custom)
    }
}

/// The services that own a queue on the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Service {
    Provisioner,
    Controller,
    SensorAggregator,
}

impl Service {
    pub const ALL: [Service; 3] = [
        Service::Provisioner,
        Service::Controller,
        Service::SensorAggregator,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Service::Provisioner => "provisioner",
            Service::Controller => "controller",
            Service::SensorAggregator => "sensor-aggregator",
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Service {
    type Err = WireError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Service::ALL
            .into_iter()
            .find(|svc| svc.as_str() == s)
            .ok_or_else(|| WireError::UnknownService(s.chars().take(60).collect()))
    }
}

macro_rules! ops {
    ($( $variant:ident => $name:literal, $service:ident, $signed:literal; )*) => {
        /// Every operation of protocol version 1. The names are the original EPU's.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Op { $( $variant, )* }

        impl Op {
            pub const ALL: &'static [Op] = &[ $( Op::$variant, )* ];

            pub fn as_str(self) -> &'static str {
                match self { $( Op::$variant => $name, )* }
            }

            /// The service whose queue receives this operation (`None` for replies).
            pub fn service(self) -> Option<Service> {
                ops!(@svc self, $( $variant $service, )*)
            }

            /// Control operations destroy or reconfigure capacity and must be signed.
            pub fn is_control(self) -> bool {
                match self { $( Op::$variant => $signed, )* }
            }
        }
    };
    (@svc $self:ident, $( $variant:ident $service:ident, )*) => {
        match $self { $( Op::$variant => ops!(@one $service), )* }
    };
    (@one None) => { None };
    (@one $service:ident) => { Some(Service::$service) };
}

ops! {
    Provision => "provision", Provisioner, true;
    TerminateNodes => "terminate_nodes", Provisioner, true;
    TerminateAll => "terminate_all", Provisioner, true;
    Enable => "enable", Provisioner, true;
    DumpState => "dump_state", Provisioner, false;
    DescribeNodes => "describe_nodes", Provisioner, false;
    DescribeIaas => "describe_iaas", Provisioner, false;
    InstanceInfo => "instance_info", Controller, false;
    SensorInfo => "sensor_info", Controller, false;
    Reconfigure => "reconfigure", Controller, true;
    AddDomain => "add_domain", Controller, true;
    RemoveDomain => "remove_domain", Controller, true;
    ListDomains => "list_domains", Controller, false;
    DescribeDomain => "describe_domain", Controller, false;
    Heartbeat => "heartbeat", SensorAggregator, false;
    DescribeSensors => "describe_sensors", SensorAggregator, false;
    Status => "status", None, false;
    Reply => "reply", None, false;
}

impl Op {
    /// Heartbeats are high-volume and only the latest counts: transient, unconfirmed.
    pub fn is_transient(self) -> bool {
        matches!(self, Op::Heartbeat)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Op {
    type Err = WireError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Op::ALL
            .iter()
            .copied()
            .find(|op| op.as_str() == s)
            .ok_or_else(|| WireError::UnknownOp(s.chars().take(60).collect()))
    }
}

impl Serialize for Op {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Op {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The message envelope: `{v, op, run, msg_id, sent_at, sender, body}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub v: u32,
    pub op: Op,
    pub run: RunName,
    pub msg_id: Uuid,
    pub sent_at: DateTime<Utc>,
    pub sender: String,
    pub body: Value,
}

impl Envelope {
    pub fn new(run: &RunName, op: Op, sender: &str, body: Value) -> Self {
        Envelope {
            v: PROTOCOL_VERSION,
            op,
            run: run.clone(),
            msg_id: Uuid::new_v4(),
            sent_at: Utc::now(),
            sender: sender.to_string(),
            body,
        }
    }

    /// Builds an envelope whose body is any serialisable value.
    pub fn with_body<T: Serialize>(
        run: &RunName,
        op: Op,
        sender: &str,
        body: &T,
    ) -> Result<Self, WireError> {
        let body = serde_json::to_value(body).map_err(|e| WireError::Encode(e.to_string()))?;
        Ok(Envelope::new(run, op, sender, body))
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, WireError> {
        serde_json::to_vec(self).map_err(|e| WireError::Encode(e.to_string()))
    }

    /// Parses the body into a typed request; a failure is a `bad_request`.
    pub fn parse_body<T: serde::de::DeserializeOwned>(&self) -> Result<T, ReplyError> {
        serde_json::from_value(self.body.clone()).map_err(|e| ReplyError {
            malformed: true,
            ..ReplyError::bad_request(format!("{}: invalid body: {e}", self.op))
        })
    }
}

/// Typed error codes a reply may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    BadRequest,
    UnknownOp,
    Unauthenticated,
    Conflict,
    Internal,
    /// Not sent by services: the caller's own timeout or transport failure.
    Timeout,
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Internal => "internal",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

/// An error a service answers with, or a caller-side failure of a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ReplyError {
    pub code: ErrorCode,
    pub message: String,
    /// The message itself was malformed (its body did not parse): besides any
    /// reply, the bus copies it to the dead-letter queue. Not on the wire.
    #[serde(skip)]
    pub malformed: bool,
}

impl ReplyError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ReplyError {
            code,
            message: message.into(),
            malformed: false,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

/// The body of a `reply` envelope: exactly one of `result` or `error`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ReplyBody {
    Result(Value),
    Error(ReplyError),
}

impl ReplyBody {
    pub fn from_result(r: Result<Value, ReplyError>) -> Self {
        match r {
            Ok(v) => ReplyBody::Result(v),
            Err(e) => ReplyBody::Error(e),
        }
    }
    pub fn into_result(self) -> Result<Value, ReplyError> {
        match self {
            ReplyBody::Result(v) => Ok(v),
            ReplyBody::Error(e) => Err(e),
        }
    }
}

/// Message headers as both transports carry them (string values only).
pub type Headers = BTreeMap<String, String>;

/// Why a message was refused. The `as_str` form is the `x-epu-reject-reason` header
/// prefix and the `reason` label of the rejected-messages counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RejectReason {
    NotJson(String),
    BadEnvelope(String),
    UnknownVersion(u64),
    UnknownOp(String),
    WrongRun {
        expected: String,
        got: String,
    },
    WrongService {
        op: String,
        service: String,
    },
    MissingSignature,
    BadSignature,
    NoSecretConfigured,
    /// The envelope was fine but the service could not read its body.
    BadBody(String),
}

impl RejectReason {
    /// A short stable label, used as the metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            RejectReason::NotJson(_) => "not_json",
            RejectReason::BadEnvelope(_) => "bad_envelope",
            RejectReason::UnknownVersion(_) => "unknown_version",
            RejectReason::UnknownOp(_) => "unknown_op",
            RejectReason::WrongRun { .. } => "wrong_run",
            RejectReason::WrongService { .. } => "wrong_service",
            RejectReason::MissingSignature => "missing_signature",
            RejectReason::BadSignature => "bad_signature",
            RejectReason::NoSecretConfigured => "no_secret_configured",
            RejectReason::BadBody(_) => "bad_body",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::NotJson(e) => write!(f, "not_json: {e}"),
            RejectReason::BadEnvelope(e) => write!(f, "bad_envelope: {e}"),
            RejectReason::UnknownVersion(v) => {
                write!(
                    f,
                    "unknown_version: v={v}, this service speaks v={PROTOCOL_VERSION}"
                )
            }
            RejectReason::UnknownOp(op) => write!(f, "unknown_op: {op:?}"),
            RejectReason::WrongRun { expected, got } => {
                write!(f, "wrong_run: message for run {got:?} on run {expected:?}")
            }
            RejectReason::WrongService { op, service } => {
                write!(f, "wrong_service: op {op:?} is not served by {service}")
            }
            RejectReason::MissingSignature => {
                write!(f, "missing_signature: control operation without {SIGNATURE_HEADER}")
            }
            RejectReason::BadSignature => write!(f, "bad_signature: HMAC does not match"),
            RejectReason::BadBody(e) => write!(f, "bad_body: {e}"),
            RejectReason::NoSecretConfigured => write!(
                f,
                "no_secret_configured: control operation refused because this service has no shared secret"
            ),
        }
    }
}

/// Where a decoded message is being delivered; what [`decode`] checks it against.
#[derive(Clone, Copy, Debug)]
pub struct Destination<'a> {
    pub run: &'a RunName,
    /// `None` for a caller's private reply queue (only `reply` is accepted there).
    pub service: Option<Service>,
    pub secret: Option<&'a [u8]>,
}

/// The one envelope decoder. Checks, in order: JSON, version, op, run, fields,
/// destination, signature. Never panics on any input (property-tested).
pub fn decode(
    payload: &[u8],
    headers: &Headers,
    dest: Destination<'_>,
) -> Result<Envelope, RejectReason> {
    let raw: Value =
        serde_json::from_slice(payload).map_err(|e| RejectReason::NotJson(e.to_string()))?;
    let obj = raw
        .as_object()
        .ok_or_else(|| RejectReason::BadEnvelope("the envelope must be a JSON object".into()))?;
    match obj.get("v") {
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
            Some(v) => return Err(RejectReason::UnknownVersion(v)),
            None => {
                return Err(RejectReason::BadEnvelope(format!(
                    "field v is not a version: {n}"
                )))
            }
        },
        Some(other) => {
            return Err(RejectReason::BadEnvelope(format!(
                "field v must be an integer, got {}",
                short(other)
            )))
        }
        None => return Err(RejectReason::BadEnvelope("missing field v".into())),
    }
    let op = match obj.get("op") {
        Some(Value::String(s)) => s
            .parse::<Op>()
            .map_err(|_| RejectReason::UnknownOp(s.chars().take(60).collect()))?,
        Some(other) => {
            return Err(RejectReason::BadEnvelope(format!(
                "field op must be a string, got {}",
                short(other)
            )))
        }
        None => return Err(RejectReason::BadEnvelope("missing field op".into())),
    };
    match obj.get("run") {
        Some(Value::String(r)) if r == dest.run.as_str() => {}
        Some(Value::String(r)) => {
            return Err(RejectReason::WrongRun {
                expected: dest.run.to_string(),
                got: r.chars().take(60).collect(),
            })
        }
        Some(other) => {
            return Err(RejectReason::BadEnvelope(format!(
                "field run must be a string, got {}",
                short(other)
            )))
        }
        None => return Err(RejectReason::BadEnvelope("missing field run".into())),
    }
    let env: Envelope =
        serde_json::from_value(raw).map_err(|e| RejectReason::BadEnvelope(e.to_string()))?;
    let expected_service = op.service();
    let served_here = match (dest.service, op) {
        (None, Op::Reply) => true,
        (None, _) => false,
        (Some(_), Op::Status) => true,
        (Some(svc), _) => expected_service == Some(svc),
    };
    if !served_here {
        return Err(RejectReason::WrongService {
            op: op.as_str().to_string(),
            service: dest
                .service
                .map(|s| s.as_str().to_string())
                .unwrap_or_else(|| "a reply queue".into()),
        });
    }
    if op.is_control() {
        let secret = dest.secret.ok_or(RejectReason::NoSecretConfigured)?;
        let sig = headers
            .get(SIGNATURE_HEADER)
            .ok_or(RejectReason::MissingSignature)?;
        if !verify(secret, payload, sig) {
            return Err(RejectReason::BadSignature);
        }
    }
    Ok(env)
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s
    }
}

type HmacSha256 = Hmac<Sha256>;

/// Hex HMAC-SHA256 of `payload` under `secret`.
pub fn sign(secret: &[u8], payload: &[u8]) -> String {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(payload);
    hex::encode(mac.finalize().into_bytes())
}

/// Constant-time check of a hex signature.
pub fn verify(secret: &[u8], payload: &[u8], signature_hex: &str) -> bool {
    let Ok(sig) = hex::decode(signature_hex.trim()) else {
        return false;
    };
    let Ok(mut mac) = HmacSha256::new_from_slice(secret) else {
        return false;
    };
    mac.update(payload);
    mac.verify_slice(&sig).is_ok()
}

/// Errors building or naming things on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("invalid run name {0:?}: use 1 to 40 characters of a-z, 0-9 and '-'")]
    BadRunName(String),
    #[error("unknown service {0:?}: expected provisioner, controller or sensor-aggregator")]
    UnknownService(String),
    #[error("unknown operation {0:?}")]
    UnknownOp(String),
    #[error("cannot encode message: {0}")]
    Encode(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run() -> RunName {
        RunName::new("r1").expect("valid")
    }

    fn dest<'a>(run: &'a RunName, secret: Option<&'a [u8]>) -> Destination<'a> {
        Destination {
            run,
            service: Some(Service::Provisioner),
            secret,
        }
    }

    #[test]
    fn run_names() {
        for ok in ["a", "run-1", "0", &"a".repeat(40)] {
            assert!(RunName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "A", "run_1", "run.1", "ü", &"a".repeat(41), "a b"] {
            assert!(RunName::new(bad).is_err(), "{bad}");
        }
        let r = run();
        assert_eq!(r.exchange(), "epu.r1");
        assert_eq!(
            r.queue(Service::SensorAggregator),
            "epu.r1.sensor-aggregator"
        );
        assert_eq!(r.dead_queue(), "epu.r1.dead");
        let random = RunName::random("a-very-long-prefix-for-a-test-name-that-goes-on");
        assert!(random.as_str().len() <= 40);
    }

    #[test]
    fn ops_round_trip_and_route() {
        for op in Op::ALL {
            assert_eq!(op.as_str().parse::<Op>(), Ok(*op));
        }
        assert_eq!(Op::Provision.service(), Some(Service::Provisioner));
        assert_eq!(Op::Heartbeat.service(), Some(Service::SensorAggregator));
        assert_eq!(Op::Reply.service(), None);
        let control: Vec<_> = Op::ALL
            .iter()
            .filter(|o| o.is_control())
            .map(|o| o.as_str())
            .collect();
        assert_eq!(
            control,
            [
                "provision",
                "terminate_nodes",
                "terminate_all",
                "enable",
                "reconfigure",
                "add_domain",
                "remove_domain"
            ]
        );
    }

    #[test]
    fn decodes_a_good_envelope() {
        let r = run();
        let env = Envelope::new(&r, Op::DescribeNodes, "test", json!({"count": 1}));
        let bytes = env.to_bytes().expect("encode");
        let got = decode(&bytes, &Headers::new(), dest(&r, None)).expect("decode");
        assert_eq!(got, env);
    }

    fn reject(payload: &[u8], headers: &Headers, secret: Option<&[u8]>) -> RejectReason {
        let r = run();
        match decode(payload, headers, dest(&r, secret)) {
            Ok(env) => panic!("accepted {env:?}"),
            Err(reason) => reason,
        }
    }

    #[test]
    fn refuses_what_is_wrong_and_says_why() {
        let r = run();
        let good = Envelope::new(&r, Op::DescribeNodes, "t", json!({}));
        let mut v = serde_json::to_value(&good).expect("value");
        let h = Headers::new();
        assert_eq!(reject(b"{nope", &h, None).label(), "not_json");
        assert_eq!(reject(b"[1]", &h, None).label(), "bad_envelope");
        v["v"] = json!(2);
        assert_eq!(
            reject(&serde_json::to_vec(&v).expect("x"), &h, None),
            RejectReason::UnknownVersion(2)
        );
        v["v"] = json!(1);
        v["op"] = json!("launch_rockets");
        assert_eq!(
            reject(&serde_json::to_vec(&v).expect("x"), &h, None).label(),
            "unknown_op"
        );
        v["op"] = json!("describe_nodes");
        v["run"] = json!("other");
        assert_eq!(
            reject(&serde_json::to_vec(&v).expect("x"), &h, None).label(),
            "wrong_run"
        );
        v["run"] = json!("r1");
        v.as_object_mut().expect("obj").remove("msg_id");
        let reason = reject(&serde_json::to_vec(&v).expect("x"), &h, None);
        assert_eq!(reason.label(), "bad_envelope");
        assert!(reason.to_string().contains("msg_id"), "{reason}");
        let hb = Envelope::new(&r, Op::Heartbeat, "t", json!({}));
        assert_eq!(
            reject(&hb.to_bytes().expect("x"), &h, None).label(),
            "wrong_service"
        );
    }

    #[test]
    fn control_ops_need_a_good_signature() {
        let r = run();
        let secret = b"s3cret";
        let env = Envelope::new(&r, Op::TerminateAll, "t", json!({}));
        let bytes = env.to_bytes().expect("encode");
        let mut h = Headers::new();
        assert_eq!(
            reject(&bytes, &h, Some(secret)),
            RejectReason::MissingSignature
        );
        assert_eq!(reject(&bytes, &h, None), RejectReason::NoSecretConfigured);
        h.insert(SIGNATURE_HEADER.into(), sign(b"wrong", &bytes));
        assert_eq!(reject(&bytes, &h, Some(secret)), RejectReason::BadSignature);
        h.insert(SIGNATURE_HEADER.into(), "zz-not-hex".into());
        assert_eq!(reject(&bytes, &h, Some(secret)), RejectReason::BadSignature);
        h.insert(SIGNATURE_HEADER.into(), sign(secret, &bytes));
        assert!(decode(&bytes, &h, dest(&r, Some(secret))).is_ok());
        // A signature covers the exact bytes: any change breaks it.
        let mut tampered = bytes.clone();
        if let Some(b) = tampered.iter_mut().rev().nth(2) {
            *b = b'0';
        }
        assert!(decode(&tampered, &h, dest(&r, Some(secret))).is_err());
    }

    #[test]
    fn replies_round_trip() {
        let ok = ReplyBody::Result(json!({"n": 1}));
        let err = ReplyBody::Error(ReplyError::not_found("no such domain"));
        for body in [ok, err] {
            let s = serde_json::to_string(&body).expect("enc");
            let back: ReplyBody = serde_json::from_str(&s).expect("dec");
            assert_eq!(back, body);
        }
        let s = serde_json::to_string(&ReplyBody::Error(ReplyError::bad_request("x"))).expect("e");
        assert_eq!(s, r#"{"error":{"code":"bad_request","message":"x"}}"#);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn decoder_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let r = run();
                let _ = decode(&bytes, &Headers::new(), dest(&r, Some(b"k")));
            }

            #[test]
            fn decoder_never_panics_on_json_shapes(
                v in prop_oneof![Just(json!(1)), Just(json!(2)), Just(json!("1")), Just(json!(null)), Just(json!(-1)), Just(json!(1.5))],
                op in prop_oneof![Just("provision".to_string()), Just("terminate_all".to_string()), "[a-z_]{0,12}"],
                run_name in prop_oneof![Just("r1".to_string()), "[ -~]{0,12}"],
                msg_id in prop_oneof![Just(Uuid::nil().to_string()), "[ -~]{0,40}"],
                sig in proptest::option::of("[0-9a-f]{0,64}"),
            ) {
                let r = run();
                let doc = json!({"v": v, "op": op, "run": run_name, "msg_id": msg_id,
                    "sent_at": "2026-01-01T00:00:00Z", "sender": "p", "body": {}});
                let bytes = serde_json::to_vec(&doc).expect("enc");
                let mut h = Headers::new();
                if let Some(s) = sig { h.insert(SIGNATURE_HEADER.into(), s); }
                let got = decode(&bytes, &h, dest(&r, Some(b"k")));
                // Accepted only if every field was right and the op is not control.
                if let Ok(env) = got {
                    prop_assert_eq!(env.run.as_str(), "r1");
                    prop_assert!(!env.op.is_control());
                }
            }
        }
    }
}
