//! A Unix socket in the run directory through which another process reaches a
//! [`LocalBus`]: the standalone host listens, `epumgmt` connects.
//!
//! One JSON frame per line each way. The client sends a [`Frame`] and reads one
//! [`Answer`]. Messages keep their bytes and headers, so the standalone services
//! check envelopes and signatures exactly as over AMQP.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::local::{LocalBus, LocalMsg};
use super::{parse_reply, Bus, BusError, BusOptions, DeadLetter, Handler, Server};
use crate::wire::{Envelope, ErrorCode, Headers, ReplyError, RunName, Service};

/// The socket's file name inside a run directory.
pub const SOCKET_FILE: &str = "epu.sock";

/// Largest frame a peer may send (1 MiB).
const MAX_FRAME: usize = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Frame {
    Send {
        to: Service,
        payload: Vec<u8>,
        headers: Headers,
    },
    Request {
        to: Service,
        payload: Vec<u8>,
        headers: Headers,
        timeout_ms: u64,
    },
    TakeDeadLetters {
        max: usize,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Answer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reply: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dead_letters: Option<Vec<DeadLetter>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeout: Option<bool>,
}

/// The listening side, owned by the standalone host.
pub struct SocketServer {
    path: PathBuf,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl SocketServer {
    /// Binds `path` (removing a stale socket file first) with mode 0600 and serves
    /// frames into `bus` until stopped.
    pub async fn bind(path: &Path, bus: LocalBus) -> Result<Self, BusError> {
        if path.exists() {
            // A live server answers; a stale file from a crashed host does not.
            if UnixStream::connect(path).await.is_ok() {
                return Err(BusError::Io(format!(
                    "{} is in use by a running host; stop that run first",
                    path.display()
                )));
            }
            std::fs::remove_file(path).map_err(|e| {
                BusError::Io(format!("cannot remove stale {}: {e}", path.display()))
            })?;
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| BusError::Io(format!("cannot bind {}: {e}", path.display())))?;
        set_owner_only(path)?;
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop_rx.changed() => break,
                    accepted = listener.accept() => {
                        if let Ok((stream, _)) = accepted {
                            let bus = bus.clone();
                            tokio::spawn(async move { serve_conn(stream, bus).await });
                        }
                    }
                }
            }
        });
        Ok(SocketServer {
            path: path.to_path_buf(),
            stop: stop_tx,
            task,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(unix)]
fn set_owner_only(path: &Path) -> Result<(), BusError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| BusError::Io(format!("cannot chmod {}: {e}", path.display())))
}

async fn serve_conn(stream: UnixStream, bus: LocalBus) {
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd);
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(n) if n > MAX_FRAME => return,
            Ok(_) => {}
        }
        let answer = match serde_json::from_str::<Frame>(line.trim_end()) {
            Err(e) => Answer {
                error: Some(format!("unreadable frame: {e}")),
                ..Answer::default()
            },
            Ok(frame) => answer_frame(frame, &bus).await,
        };
        let Ok(mut out) = serde_json::to_vec(&answer) else {
            return;
        };
        out.push(b'\n');
        if wr.write_all(&out).await.is_err() {
            return;
        }
    }
}

async fn answer_frame(frame: Frame, bus: &LocalBus) -> Answer {
    match frame {
        Frame::Send {
            to,
            payload,
            headers,
        } => match bus.enqueue(
            to,
            LocalMsg {
                payload,
                headers,
                reply: None,
            },
        ) {
            Ok(()) => Answer::default(),
            Err(e) => Answer {
                error: Some(e.to_string()),
                ..Answer::default()
            },
        },
        Frame::Request {
            to,
            payload,
            headers,
            timeout_ms,
        } => {
            let timeout = Duration::from_millis(timeout_ms.min(600_000));
            match bus.request_raw(to, payload, headers, timeout).await {
                Ok(reply) => Answer {
                    reply: Some(reply),
                    ..Answer::default()
                },
                Err(BusError::Timeout { .. }) => Answer {
                    timeout: Some(true),
                    ..Answer::default()
                },
                Err(e) => Answer {
                    error: Some(e.to_string()),
                    ..Answer::default()
                },
            }
        }
        Frame::TakeDeadLetters { max } => match bus.take_dead_letters(max).await {
            Ok(d) => Answer {
                dead_letters: Some(d),
                ..Answer::default()
            },
            Err(e) => Answer {
                error: Some(e.to_string()),
                ..Answer::default()
            },
        },
    }
}

/// A client bus for another process: everything but `serve` goes through the socket.
#[derive(Clone)]
pub struct SocketBus {
    path: PathBuf,
    run: RunName,
    opts: Arc<BusOptions>,
}

impl SocketBus {
    pub fn new(path: &Path, run: RunName, opts: BusOptions) -> Self {
        SocketBus {
            path: path.to_path_buf(),
            run,
            opts: Arc::new(opts),
        }
    }

    async fn call(&self, frame: &Frame, timeout: Duration) -> Result<Answer, BusError> {
        let fut = async {
            let stream = UnixStream::connect(&self.path).await.map_err(|e| {
                BusError::Connect(format!(
                    "cannot connect to {}: {e} (is the standalone run up? see `epumgmt list-runs`)",
                    self.path.display()
                ))
            })?;
            let (rd, mut wr) = stream.into_split();
            let mut out = serde_json::to_vec(frame).map_err(|e| BusError::Io(e.to_string()))?;
            out.push(b'\n');
            wr.write_all(&out)
                .await
                .map_err(|e| BusError::Io(e.to_string()))?;
            let mut line = String::new();
            BufReader::new(rd)
                .read_line(&mut line)
                .await
                .map_err(|e| BusError::Io(e.to_string()))?;
            if line.is_empty() {
                return Err(BusError::Io(
                    "the host closed the socket without answering".into(),
                ));
            }
            serde_json::from_str::<Answer>(&line)
                .map_err(|e| BusError::Io(format!("unreadable answer from host: {e}")))
        };
        let answer =
            tokio::time::timeout(timeout, fut)
                .await
                .map_err(|_| BusError::Timeout {
                    what: format!("call to {}", self.path.display()),
                    after: timeout,
                })??;
        if let Some(e) = answer.error {
            return Err(BusError::Io(e));
        }
        Ok(answer)
    }
}

#[async_trait]
impl Bus for SocketBus {
    fn run(&self) -> &RunName {
        &self.run
    }

    async fn send(&self, to: Service, envelope: &Envelope) -> Result<(), BusError> {
        let payload = envelope.to_bytes()?;
        let headers = self.opts.headers_for(envelope.op, &payload);
        self.publish_raw(to, payload, headers).await
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
        let frame = Frame::Request {
            to,
            payload,
            headers,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        let answer = self.call(&frame, timeout + Duration::from_secs(1)).await?;
        if answer.timeout == Some(true) {
            return Err(BusError::Timeout {
                what: format!("{} request to {to}", envelope.op),
                after: timeout,
            }
            .into());
        }
        let reply = answer
            .reply
            .ok_or_else(|| ReplyError::internal("the host answered without a reply"))?;
        parse_reply(&self.run, &reply)
    }

    async fn publish_raw(
        &self,
        to: Service,
        payload: Vec<u8>,
        headers: Headers,
    ) -> Result<(), BusError> {
        let frame = Frame::Send {
            to,
            payload,
            headers,
        };
        self.call(&frame, self.opts.publish_timeout)
            .await
            .map(|_| ())
    }

    async fn serve(&self, _: Service, _: Arc<dyn Handler>) -> Result<Server, BusError> {
        Err(BusError::Unsupported(
            "serve a queue through the socket; services run inside the standalone host",
        ))
    }

    async fn take_dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, BusError> {
        let answer = self
            .call(&Frame::TakeDeadLetters { max }, self.opts.publish_timeout)
            .await?;
        Ok(answer.dead_letters.unwrap_or_default())
    }
}
