//! The in-process transport: the standalone mode's bus, no broker.
//!
//! Each service queue is an unbounded channel created up front, so messages sent
//! before a service starts serving wait for it, as on a durable AMQP queue. A
//! stopped server puts its receiver back, so the queue outlives the consumer.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    dead_letter_headers, parse_reply, BusError, BusOptions, DeadLetter, Dispatcher, Handler, Server,
};
use crate::bus::Bus;
use crate::wire::{Envelope, ErrorCode, Headers, ReplyError, RunName, Service};

pub(crate) struct LocalMsg {
    pub payload: Vec<u8>,
    pub headers: Headers,
    pub reply: Option<oneshot::Sender<Vec<u8>>>,
}

struct Queue {
    tx: mpsc::UnboundedSender<LocalMsg>,
    rx: Option<mpsc::UnboundedReceiver<LocalMsg>>,
}

struct Inner {
    run: RunName,
    queues: Mutex<HashMap<Service, Queue>>,
    dead: Mutex<VecDeque<(DeadLetter, Headers)>>,
}

/// The in-process bus. Cheap to clone; all clones share the queues. Each service
/// of a standalone host takes its own [`LocalBus::view`] (its sender name, its
/// signing secret) onto the same queues.
#[derive(Clone)]
pub struct LocalBus {
    inner: Arc<Inner>,
    opts: Arc<BusOptions>,
}

impl LocalBus {
    pub fn new(run: RunName, opts: BusOptions) -> Self {
        let mut queues = HashMap::new();
        for svc in Service::ALL {
            let (tx, rx) = mpsc::unbounded_channel();
            queues.insert(svc, Queue { tx, rx: Some(rx) });
        }
        LocalBus {
            inner: Arc::new(Inner {
                run,
                queues: Mutex::new(queues),
                dead: Mutex::new(VecDeque::new()),
            }),
            opts: Arc::new(opts),
        }
    }

    /// The same queues seen with other options (sender, secret, metrics).
    pub fn view(&self, opts: BusOptions) -> LocalBus {
        LocalBus {
            inner: self.inner.clone(),
            opts: Arc::new(opts),
        }
    }

    pub fn options(&self) -> &BusOptions {
        &self.opts
    }

    pub(crate) fn enqueue(&self, to: Service, msg: LocalMsg) -> Result<(), BusError> {
        let queues = lock(&self.inner.queues);
        let q = queues.get(&to).ok_or(BusError::Closed)?;
        q.tx.send(msg).map_err(|_| BusError::Closed)?;
        Ok(())
    }

    /// Sends raw bytes and waits for the raw reply bytes (used by the socket server).
    pub(crate) async fn request_raw(
        &self,
        to: Service,
        payload: Vec<u8>,
        headers: Headers,
        timeout: Duration,
    ) -> Result<Vec<u8>, BusError> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(
            to,
            LocalMsg {
                payload,
                headers,
                reply: Some(tx),
            },
        )?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(_)) => Err(BusError::Closed),
            Err(_) => Err(BusError::Timeout {
                what: format!("request to {to}"),
                after: timeout,
            }),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked while holding it; the
    // data (queues, dead letters) is still consistent for our use.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl Bus for LocalBus {
    fn run(&self) -> &RunName {
        &self.inner.run
    }

    async fn send(&self, to: Service, envelope: &Envelope) -> Result<(), BusError> {
        let payload = envelope.to_bytes()?;
        let headers = self.opts.headers_for(envelope.op, &payload);
        self.opts
            .metrics
            .published
            .with_label_values(&[envelope.op.as_str()])
            .inc();
        self.enqueue(
            to,
            LocalMsg {
                payload,
                headers,
                reply: None,
            },
        )
    }

    async fn request(
        &self,
        to: Service,
        envelope: &Envelope,
        timeout: Duration,
    ) -> Result<Value, ReplyError> {
        let payload = envelope
            .to_bytes()
            .map_err(|e| ReplyError::new(ErrorCode::BadRequest, e.to_string()))?;
        let headers = self.opts.headers_for(envelope.op, &payload);
        self.opts
            .metrics
            .published
            .with_label_values(&[envelope.op.as_str()])
            .inc();
        let bytes = self.request_raw(to, payload, headers, timeout).await?;
        parse_reply(&self.inner.run, &bytes)
    }

    async fn publish_raw(
        &self,
        to: Service,
        payload: Vec<u8>,
        headers: Headers,
    ) -> Result<(), BusError> {
        self.enqueue(
            to,
            LocalMsg {
                payload,
                headers,
                reply: None,
            },
        )
    }

    async fn serve(&self, service: Service, handler: Arc<dyn Handler>) -> Result<Server, BusError> {
        let mut rx = {
            let mut queues = lock(&self.inner.queues);
            let q = queues.get_mut(&service).ok_or(BusError::Closed)?;
            q.rx.take().ok_or(BusError::AlreadyServed(service))?
        };
        let dispatcher = Dispatcher {
            run: self.inner.run.clone(),
            service,
            opts: (*self.opts).clone(),
            handler,
        };
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let bus = self.clone();
        let task = tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    biased;
                    _ = stop_rx.changed() => break,
                    m = rx.recv() => match m { Some(m) => m, None => break },
                };
                let out = dispatcher
                    .process(&msg.payload, &msg.headers, msg.reply.is_some(), false)
                    .await;
                if let Some(dead) = out.dead {
                    let h = dead_letter_headers(&dead);
                    lock(&bus.inner.dead).push_back((dead, h));
                }
                if let (Some(reply_tx), Some(bytes)) = (msg.reply, out.reply) {
                    let _ = reply_tx.send(bytes);
                }
            }
            // Give the queue back so a later server of the same service gets what is left.
            let mut queues = lock(&bus.inner.queues);
            if let Some(q) = queues.get_mut(&service) {
                q.rx = Some(rx);
            }
        });
        Ok(Server::new(stop_tx, task))
    }

    async fn take_dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, BusError> {
        let mut dead = lock(&self.inner.dead);
        let n = max.min(dead.len());
        Ok(dead.drain(..n).map(|(d, _)| d).collect())
    }
}
