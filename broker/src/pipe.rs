//! Pipelined produce: one `ProduceStream` per broker, shared by every produce sent there (the client
//! library's, and a broker's forwarding to a partition's leader).
//!
//! A request is queued on its broker's stream synchronously, in the call that sends it: no await comes
//! before its place in the queue is fixed, so produces keep the order of their calls (an await on a
//! bounded queue or a lock would let tokio's cooperative budget reorder them). Each request gets an id
//! and a waiter; the stream's task opens the stream, then hands each reply to its waiter. The queue is
//! unbounded: each request in it is one a caller is waiting on, and the broker's own limits (1,024
//! requests served per stream, HTTP/2 flow control) hold back the rest. A request on a stream that
//! never opened, or had already ended, was not sent: safe to send again. When an open stream ends, every
//! request still waiting has an unknown outcome (`TIMEOUT`), as a unary produce cut off by a lost
//! connection has.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::BrokerError;
use flotilla_proto::broker as pb;
use flotilla_proto::broker::ErrorCode;
use flotilla_proto::broker::flotilla_client::FlotillaClient;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

type Reply = Result<pb::ProduceResponse, BrokerError>;

#[derive(Default)]
struct Waiting {
    replies: HashMap<u64, oneshot::Sender<Reply>>,
    /// The stream has ended: nothing more is sent on it.
    closed: bool,
}

/// One produce stream to one broker.
struct Pipe {
    requests: mpsc::UnboundedSender<pb::ProduceStreamRequest>,
    waiting: Arc<Mutex<Waiting>>,
    next_id: AtomicU64,
}

fn lock(waiting: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    waiting.lock().unwrap_or_else(|p| p.into_inner())
}

/// Nothing was sent: a retry cannot write twice.
fn not_sent(addr: &str, why: &str) -> BrokerError {
    BrokerError::new(ErrorCode::LeaderNotAvailable, format!("no produce stream to {addr}: {why}"))
}

/// Why the stream to `addr` did not open. Opening a stream writes nothing: whatever failed, no request
/// was served, so a failure whose outcome would otherwise be unknown is one nothing was sent on.
fn open_failed(addr: &str, status: &tonic::Status) -> BrokerError {
    let e = BrokerError::from_call(addr, status);
    if e.code != ErrorCode::Timeout {
        return e;
    }
    // A transport failure's message names the broker already; `not_sent` names it once more.
    let why = e.message.strip_prefix(addr).and_then(|rest| rest.strip_prefix(": ")).unwrap_or(&e.message);
    not_sent(addr, why)
}

impl Pipe {
    /// A stream to the broker behind `client`: its queue at once, the stream opened by its task.
    fn open(addr: &str, mut client: FlotillaClient<Channel>) -> Arc<Pipe> {
        let (requests, queued) = mpsc::unbounded_channel();
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        let pipe = Arc::new(Pipe { requests, waiting: waiting.clone(), next_id: AtomicU64::new(0) });
        let addr = addr.to_owned();
        tokio::spawn(async move {
            let why = match client.produce_stream(UnboundedReceiverStream::new(queued)).await {
                Ok(replies) => Self::deliver(replies.into_inner(), &waiting).await,
                Err(status) => open_failed(&addr, &status),
            };
            let mut waiting = lock(&waiting);
            waiting.closed = true;
            for (_, waiter) in waiting.replies.drain() {
                let _ = waiter.send(Err(why.clone()));
            }
        });
        pipe
    }

    /// Hands each reply to its waiter until the stream ends; returns what a request still waiting gets.
    async fn deliver(mut replies: tonic::Streaming<pb::ProduceStreamReply>, waiting: &Mutex<Waiting>) -> BrokerError {
        let why = loop {
            match replies.message().await {
                Ok(Some(reply)) => {
                    let result = match reply.result {
                        Some(pb::produce_stream_reply::Result::Response(r)) => Ok(r),
                        Some(pb::produce_stream_reply::Result::Error(e)) => Err(BrokerError::from(e)),
                        None => Err(BrokerError::new(ErrorCode::Unspecified, "a produce reply without a result")),
                    };
                    if let Some(waiter) = lock(waiting).replies.remove(&reply.id) {
                        let _ = waiter.send(result);
                    }
                }
                Ok(None) => break "the broker ended the produce stream".to_owned(),
                Err(status) => break format!("the produce stream broke: {}", status.message()),
            }
        };
        BrokerError::new(ErrorCode::Timeout, format!("{why} with the request in flight; its outcome is unknown"))
    }

    fn closed(&self) -> bool {
        lock(&self.waiting).closed
    }

    /// Queues `request` now; the future waits for its reply.
    fn send(self: Arc<Self>, addr: &str, request: pb::ProduceRequest) -> impl Future<Output = Reply> + use<> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, replied) = oneshot::channel();
        let queued = {
            let mut waiting = lock(&self.waiting);
            if waiting.closed {
                Err(not_sent(addr, "the stream has ended"))
            } else {
                waiting.replies.insert(id, reply);
                // Under the lock: the stream's task closes it under the same lock, so a request is either
                // queued before the close (and answered by it) or refused here.
                self.requests
                    .send(pb::ProduceStreamRequest { id, request: Some(request) })
                    .map_err(|_| not_sent(addr, "the stream has ended"))
            }
        };
        async move {
            queued?;
            // A caller that gives up (drops this future) leaves no waiter behind.
            let _forget = Forget { waiting: &self.waiting, id };
            match replied.await {
                Ok(result) => result,
                Err(_) => Err(BrokerError::new(ErrorCode::Timeout, "the produce stream ended; the outcome is unknown")),
            }
        }
    }
}

/// Removes a request's waiter when its sender stops waiting, however it stops.
struct Forget<'a> {
    waiting: &'a Mutex<Waiting>,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(self.waiting).replies.remove(&self.id);
    }
}

/// Produce streams, one per broker address, opened on first use and again after one ends.
#[derive(Default)]
pub struct Pipes {
    by_addr: Mutex<HashMap<String, Arc<Pipe>>>,
}

impl Pipes {
    /// Queues one produce request on the stream to the broker at `addr` (opening one if none is live)
    /// now, in this call; the future waits for the reply.
    pub fn send(
        &self,
        addr: &str,
        client: FlotillaClient<Channel>,
        request: pb::ProduceRequest,
    ) -> impl Future<Output = Reply> + use<> {
        let pipe = {
            let mut by_addr = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
            match by_addr.get(addr).filter(|p| !p.closed()) {
                Some(pipe) => pipe.clone(),
                None => {
                    let pipe = Pipe::open(addr, client);
                    by_addr.insert(addr.to_owned(), pipe.clone());
                    pipe
                }
            }
        };
        pipe.send(addr, request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_that_did_not_open_names_its_broker_once() {
        let addr = "127.0.0.1:9402";
        // A transport failure (it carries its cause, so the message names the broker) whose outcome would
        // be unknown on an open stream: nothing was sent on this one, so it is retriable.
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset by peer");
        let e = open_failed(addr, &tonic::Status::from_error(Box::new(reset)));
        assert_eq!(e.code, ErrorCode::LeaderNotAvailable, "{e}");
        assert_eq!(e.message.matches(addr).count(), 1, "{e}");
        assert!(e.message.starts_with("no produce stream to 127.0.0.1:9402: ") && e.message.contains("reset"), "{e}");
        // Without a cause the status's own words follow the address.
        let e = open_failed(addr, &tonic::Status::cancelled("the call was cancelled"));
        assert_eq!(
            (e.code, e.message.as_str()),
            (ErrorCode::LeaderNotAvailable, "no produce stream to 127.0.0.1:9402: the call was cancelled")
        );
        // A broker's own refusal keeps its code and words.
        let own = tonic::Status::from(BrokerError::new(ErrorCode::Throttled, "too many streams"));
        let e = open_failed(addr, &own);
        assert_eq!((e.code, e.message.as_str()), (ErrorCode::Throttled, "too many streams"));
    }
}
