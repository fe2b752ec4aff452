//! Errors a client sees: a stable [`ErrorCode`] plus a sentence, mapped to a gRPC status in one place.

use flotilla_proto::broker::{self as pb, ErrorCode};
use tonic::{Code, Status};

/// Metadata key carrying the numeric [`ErrorCode`] of a failed call.
pub const ERROR_CODE_KEY: &str = "flotilla-error";
/// Metadata key carrying the address of the current leader, when a request reached another node.
pub const LEADER_KEY: &str = "flotilla-leader";

/// A request that failed, with what the client needs to act on it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BrokerError {
    pub code: ErrorCode,
    pub message: String,
    /// Where the leader is, for `NotLeader`.
    pub leader: Option<String>,
}

impl BrokerError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), leader: None }
    }

    pub fn not_leader(what: &str, leader: Option<String>) -> Self {
        let message = match &leader {
            Some(addr) => format!("this node does not lead {what}; the leader is at {addr}"),
            None => format!("{what} has no leader right now; retry shortly"),
        };
        let code = if leader.is_some() { ErrorCode::NotLeader } else { ErrorCode::LeaderNotAvailable };
        Self { code, message, leader }
    }

    pub fn storage(e: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::StorageError, format!("storage failure: {e}"))
    }

    fn grpc_code(&self) -> Code {
        match self.code {
            ErrorCode::UnknownTopic | ErrorCode::UnknownPartition => Code::NotFound,
            ErrorCode::TopicExists => Code::AlreadyExists,
            ErrorCode::InvalidTopicName
            | ErrorCode::InvalidPartitions
            | ErrorCode::InvalidReplicationFactor
            | ErrorCode::RecordTooLarge
            | ErrorCode::EmptyBatch
            | ErrorCode::InvalidConfig
            | ErrorCode::InvalidRequest => Code::InvalidArgument,
            ErrorCode::OffsetOutOfRange => Code::OutOfRange,
            ErrorCode::NotEnoughReplicas => Code::FailedPrecondition,
            ErrorCode::NotLeader | ErrorCode::LeaderNotAvailable | ErrorCode::ClusterNotReady => Code::Unavailable,
            ErrorCode::Timeout => Code::DeadlineExceeded,
            ErrorCode::Throttled | ErrorCode::DiskFull => Code::ResourceExhausted,
            ErrorCode::StorageError | ErrorCode::Unspecified => Code::Internal,
        }
    }

    /// Reads a broker error back from a status (client side). Statuses without our metadata become
    /// `Unspecified` with the status message.
    pub fn from_status(status: &Status) -> Self {
        let code = status
            .metadata()
            .get(ERROR_CODE_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
            .and_then(|v| ErrorCode::try_from(v).ok())
            .unwrap_or_else(|| match status.code() {
                // A failed connection attempt sent nothing: safe to retry elsewhere.
                Code::Unavailable if status.message().contains("connect") => ErrorCode::LeaderNotAvailable,
                // Anything else without our code (a connection lost mid-request, a deadline) may have
                // been applied: the outcome is unknown, and retrying could write twice.
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => ErrorCode::Timeout,
                _ => ErrorCode::Unspecified,
            });
        let leader = status.metadata().get(LEADER_KEY).and_then(|v| v.to_str().ok()).map(str::to_owned);
        Self { code, message: status.message().to_owned(), leader }
    }

    /// [`BrokerError::from_status`] for a call to the broker at `addr`. A failure of the connection
    /// itself (a status tonic made from a transport error, which carries its causes) names the broker and
    /// the root cause beneath tonic's summary: "127.0.0.1:9092: tcp connect error: Connection refused (os
    /// error 111)" rather than "tcp connect error".
    pub fn from_call(addr: &str, status: &Status) -> Self {
        let mut e = Self::from_status(status);
        let Some(mut root) = std::error::Error::source(status) else { return e };
        while let Some(deeper) = root.source() {
            root = deeper;
        }
        let why = root.to_string();
        e.message = if e.message.contains(&why) {
            format!("{addr}: {}", e.message)
        } else {
            format!("{addr}: {}: {why}", e.message)
        };
        e
    }
}

impl From<BrokerError> for pb::ProduceError {
    fn from(e: BrokerError) -> pb::ProduceError {
        pb::ProduceError { code: e.code as i32, message: e.message, leader: e.leader }
    }
}

impl From<pb::ProduceError> for BrokerError {
    /// A code this client does not know reads as `Unspecified`, which nothing retries.
    fn from(e: pb::ProduceError) -> BrokerError {
        let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified);
        BrokerError { code, message: e.message, leader: e.leader }
    }
}

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Status {
        let mut status = Status::new(e.grpc_code(), e.message.clone());
        if let Ok(v) = (e.code as i32).to_string().parse() {
            status.metadata_mut().insert(ERROR_CODE_KEY, v);
        }
        if let Some(v) = e.leader.as_deref().and_then(|l| l.parse().ok()) {
            status.metadata_mut().insert(LEADER_KEY, v);
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_survive_the_trip_through_a_status() {
        let e = BrokerError::not_leader("partition orders/3", Some("127.0.0.1:9402".into()));
        let status = Status::from(e.clone());
        assert_eq!(status.code(), Code::Unavailable);
        let back = BrokerError::from_status(&status);
        assert_eq!(back.code, ErrorCode::NotLeader);
        assert_eq!(back.leader.as_deref(), Some("127.0.0.1:9402"));
        assert_eq!(back.message, e.message);
        let status = Status::from(BrokerError::new(ErrorCode::UnknownTopic, "unknown topic \"x\""));
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(BrokerError::from_status(&status).code, ErrorCode::UnknownTopic);
    }

    #[tokio::test]
    async fn a_failed_connection_names_the_broker_and_the_cause() {
        // A port nothing listens on: bind one, then close it.
        let addr = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").to_string();
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{addr}")).expect("endpoint").connect_lazy();
        let mut client = pb::flotilla_client::FlotillaClient::new(channel);
        let status =
            client.metadata(pb::MetadataRequest { forwarded: false }).await.expect_err("a closed port answered");
        let e = BrokerError::from_call(&addr, &status);
        // Nothing was sent: retriable, and it says where and why.
        assert_eq!(e.code, ErrorCode::LeaderNotAvailable, "{e}");
        assert!(e.message.starts_with(&format!("{addr}: ")), "{e}");
        assert!(e.message.to_lowercase().contains("refused"), "{e}");
        assert_eq!(e.message.matches("tcp connect error").count(), 1, "{e}");
        // A broker's own error carries no transport cause and reads as it was sent.
        let own = Status::from(BrokerError::new(ErrorCode::UnknownTopic, "unknown topic \"x\""));
        assert_eq!(BrokerError::from_call(&addr, &own).message, "unknown topic \"x\"");
    }

    #[test]
    fn errors_survive_the_trip_through_a_produce_stream_reply() {
        let e = BrokerError::not_leader("partition orders/3", Some("127.0.0.1:9402".into()));
        let back = BrokerError::from(pb::ProduceError::from(e.clone()));
        assert_eq!(
            (back.code, back.leader.as_deref(), back.message.as_str()),
            (e.code, Some("127.0.0.1:9402"), &*e.message)
        );
        let unknown = pb::ProduceError { code: 9999, message: "from a newer broker".into(), leader: None };
        assert_eq!(BrokerError::from(unknown).code, ErrorCode::Unspecified);
    }
}
