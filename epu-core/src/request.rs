//! Typed requests: every request body names its operation, the service that
//! serves it and the type of its answer, so a caller and a handler meet at
//! types (`epu_model::messages`) and JSON exists only on the bus itself.
//!
//! A caller: `request::call(bus, "epumgmt", &DescribeNodesRequest::default(), t)`
//! returns a `DescribeNodesReply`. A handler: `request::serve(&env, |req| …)`
//! parses the body as the request type and encodes its typed answer.

use std::future::Future;
use std::time::Duration;

use epu_model::messages::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::bus::{Bus, BusError};
use crate::wire::{Envelope, Op, ReplyError, Service};

/// A request body: its operation, the service it goes to, and its answer.
pub trait Request: Serialize + DeserializeOwned + Send + Sync {
    const OP: Op;
    const TO: Service;
    type Reply: Serialize + DeserializeOwned + Send;
}

macro_rules! requests {
    ($( $req:ty => $op:ident, $to:ident, $reply:ty; )*) => {
        $(
            impl Request for $req {
                const OP: Op = Op::$op;
                const TO: Service = Service::$to;
                type Reply = $reply;
            }
        )*
    };
}

requests! {
    ProvisionRequest => Provision, Provisioner, ProvisionReply;
    TerminateNodesRequest => TerminateNodes, Provisioner, TerminateNodesReply;
    TerminateAllRequest => TerminateAll, Provisioner, TerminateAllReply;
    EnableRequest => Enable, Provisioner, EnableReply;
    DumpStateRequest => DumpState, Provisioner, DumpStateReply;
    DescribeNodesRequest => DescribeNodes, Provisioner, DescribeNodesReply;
    DescribeIaasRequest => DescribeIaas, Provisioner, DescribeIaasReply;
    StatusRequest<ProvisionerStatus> => Status, Provisioner, ProvisionerStatus;
    ReconfigureRequest => Reconfigure, Controller, DomainSummary;
    ListDomainsRequest => ListDomains, Controller, Vec<DomainSummary>;
    DescribeDomainRequest => DescribeDomain, Controller, DomainDescription;
    RemoveDomainRequest => RemoveDomain, Controller, RemoveDomainReply;
    StatusRequest<ControllerStatus> => Status, Controller, ControllerStatus;
    Heartbeat => Heartbeat, SensorAggregator, Ack;
    DescribeSensorsRequest => DescribeSensors, SensorAggregator, DescribeSensorsReply;
    StatusRequest<AggregatorStatus> => Status, SensorAggregator, AggregatorStatus;
}

/// The envelope of a request from `sender`.
pub fn envelope<R: Request>(bus: &dyn Bus, sender: &str, req: &R) -> Result<Envelope, ReplyError> {
    Envelope::with_body(bus.run(), R::OP, sender, req)
        .map_err(|e| ReplyError::bad_request(format!("cannot encode {}: {e}", R::OP)))
}

/// Sends `req` to its service and reads the typed answer. A service's refusal,
/// a timeout and an answer that is not `R::Reply` are all `Err(ReplyError)`.
pub async fn call<R: Request>(
    bus: &dyn Bus,
    sender: &str,
    req: &R,
    timeout: Duration,
) -> Result<R::Reply, ReplyError> {
    let env = envelope(bus, sender, req)?;
    let v = bus.request(R::TO, &env, timeout).await?;
    decode_reply::<R>(v)
}

/// Reads an answer to `R` (for callers that hold the JSON already).
pub fn decode_reply<R: Request>(v: Value) -> Result<R::Reply, ReplyError> {
    serde_json::from_value(v).map_err(|e| {
        ReplyError::internal(format!(
            "unreadable answer from the {} to {}: {e}",
            R::TO,
            R::OP
        ))
    })
}

/// Sends `req` one way (no answer awaited).
pub async fn send<R: Request>(bus: &dyn Bus, sender: &str, req: &R) -> Result<(), BusError> {
    let env = Envelope::with_body(bus.run(), R::OP, sender, req)?;
    bus.send(R::TO, &env).await
}

/// The body of `env` as the request `R`; an absent (null) body reads as `{}`.
pub fn body<R: Request>(env: &Envelope) -> Result<R, ReplyError> {
    if env.body.is_null() {
        let empty = Envelope {
            body: Value::Object(Default::default()),
            ..env.clone()
        };
        return empty.parse_body();
    }
    env.parse_body()
}

/// Encodes a typed answer to `R` as a reply body.
pub fn reply<R: Request>(answer: &R::Reply) -> Result<Value, ReplyError> {
    serde_json::to_value(answer)
        .map_err(|e| ReplyError::internal(format!("cannot encode the answer to {}: {e}", R::OP)))
}

/// Serves one request: parses the body as `R`, runs `f`, encodes its answer.
pub async fn serve<R, F, Fut>(env: &Envelope, f: F) -> Result<Value, ReplyError>
where
    R: Request,
    F: FnOnce(R) -> Fut,
    Fut: Future<Output = Result<R::Reply, ReplyError>>,
{
    let req = body::<R>(env)?;
    let answer = f(req).await?;
    reply::<R>(&answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::RunName;
    use serde_json::json;

    fn env(op: Op, body: Value) -> Envelope {
        let run = RunName::new("r").expect("run");
        Envelope::new(&run, op, "t", body)
    }

    #[tokio::test]
    async fn serve_parses_the_body_and_encodes_the_typed_answer() {
        let e = env(Op::DescribeSensors, json!({"domain": "web"}));
        let v = serve::<DescribeSensorsRequest, _, _>(&e, |req| async move {
            Ok(DescribeSensorsReply {
                run: "r".into(),
                tracked_nodes: 0,
                domains: vec![],
            })
            .map(|mut r| {
                r.run = req.domain.unwrap_or_default();
                r
            })
        })
        .await
        .expect("served");
        assert_eq!(v["run"], "web");
        let back = decode_reply::<DescribeSensorsRequest>(v).expect("typed");
        assert_eq!(back.tracked_nodes, 0);
    }

    #[test]
    fn bodies_are_checked_and_null_reads_as_empty() {
        let null = env(Op::ListDomains, Value::Null);
        assert!(body::<ListDomainsRequest>(&null).is_ok());
        let typo = env(Op::DescribeSensors, json!({"domian": "web"}));
        let e = body::<DescribeSensorsRequest>(&typo).expect_err("typo");
        assert!(e.message.contains("domian"), "{}", e.message);
        let missing = env(Op::DescribeDomain, Value::Null);
        let e = body::<DescribeDomainRequest>(&missing).expect_err("no domain");
        assert!(e.message.contains("domain"), "{}", e.message);
        let status = env(Op::Status, json!({}));
        assert!(body::<StatusRequest<ControllerStatus>>(&status).is_ok());
    }

    #[test]
    fn an_answer_of_the_wrong_shape_is_an_error_naming_the_operation() {
        let e = decode_reply::<ListDomainsRequest>(json!({"not": "a list"})).expect_err("shape");
        assert!(e.message.contains("list_domains"), "{}", e.message);
    }

    #[test]
    fn every_request_goes_to_the_service_of_its_operation() {
        fn check<R: Request>() {
            if let Some(s) = R::OP.service() {
                assert_eq!(s, R::TO, "{}", R::OP);
            }
        }
        check::<ProvisionRequest>();
        check::<TerminateNodesRequest>();
        check::<TerminateAllRequest>();
        check::<EnableRequest>();
        check::<DumpStateRequest>();
        check::<DescribeNodesRequest>();
        check::<DescribeIaasRequest>();
        check::<ReconfigureRequest>();
        check::<ListDomainsRequest>();
        check::<DescribeDomainRequest>();
        check::<RemoveDomainRequest>();
        check::<Heartbeat>();
        check::<DescribeSensorsRequest>();
    }
}
