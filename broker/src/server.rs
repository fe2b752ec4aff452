//! Serves the client API and the Raft transport on the broker's one listen address until shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tonic::transport::server::TcpIncoming;

use crate::broker::{Broker, BrokerConfig};
use crate::service::FlotillaService;

/// How long in-flight requests get to finish once the groups have stopped (every request on a stopped
/// group fails at once). A peer's idle replication stream into this node never ends by itself, so the
/// wait must be bounded.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// How long a stopping broker waits for the groups it leads to take new leaders.
const HAND_OFF_LIMIT: Duration = Duration::from_secs(2);

/// Streams a peer may reset before this server accepted them, at once, before the server drops the
/// connection (h2's guard against a rapid-reset flood; its default is 20). A peer's link carries every
/// group's Raft traffic: with a thousand groups on a loaded node, the RPCs its Raft cores give up on
/// (an election's votes, a hand-off) can pass 20, and dropping the link then fails every group's
/// replication at once, which makes more of them.
const PENDING_RESETS_MAX: usize = 1000;

/// How often the node looks for a group stopped by a storage failure.
const STORAGE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Resolves once one of the node's groups has stopped on a storage failure.
async fn storage_failed(broker: &Broker) -> (u64, String) {
    loop {
        if let Some(failure) = broker.node.storage_failure() {
            return failure;
        }
        tokio::time::sleep(STORAGE_CHECK_INTERVAL).await;
    }
}

/// Runs a broker until `shutdown` resolves, then stops every group and the server. Returns an error,
/// without the orderly stop, when the node's storage fails.
pub async fn run(config: BrokerConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen).await.with_context(|| {
        format!("cannot listen on {} (is node {} already running there?)", config.listen, config.node_id)
    })?;
    if let Some(addr) = config.metrics_listen {
        crate::metrics::install(addr)?;
    }
    let broker = Broker::open(config).await?;
    tracing::info!(node = broker.config.node_id, listen = %broker.config.listen, "broker started");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let reconciler = tokio::spawn(broker.clone().run_reconciler(stop_rx.clone()));
    let balancer = tokio::spawn(crate::balancer::run(broker.clone(), stop_rx.clone()));
    let retention = tokio::spawn(crate::retention::run(broker.clone(), stop_rx.clone()));
    let disk = tokio::spawn(crate::disk::run(broker.disk.clone(), stop_rx.clone()));
    let collector = tokio::spawn(crate::metrics::run_collector(broker.clone(), stop_rx));
    let (server_stop_tx, server_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    // The server runs as its own task: its accept loop must keep running through the controlled
    // shutdown below. A new leader elected by the hand-off may have to dial this node afresh (its
    // channel here was closed, say by an earlier restart) to tell it so; were new connections refused
    // meanwhile, this node would go on believing it leads until the hand-off limit.
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .http2_max_pending_accept_reset_streams(Some(PENDING_RESETS_MAX))
            .add_service(broker.node.transport_service())
            .add_service(FlotillaService::new(Arc::clone(&broker)).into_server())
            .serve_with_incoming_shutdown(incoming, async {
                let _ = server_stop_rx.await;
            }),
    );
    let served = tokio::select! {
        r = &mut server => served(r),
        (group, why) = storage_failed(&broker) => {
            // The store refused a write or a sync: every group shares it, and RocksDB will not take
            // writes again in this process. Exit, so that a supervisor restarts the node once the disk is
            // healthy; it then recovers from its synced WAL and catches up from its peers.
            tracing::error!(node = broker.config.node_id, group, "storage failed: {why}; the broker stops");
            server.abort();
            return Err(anyhow::anyhow!("storage failed in group {group}: {why}"));
        }
        _ = shutdown => {
            tracing::info!(node = broker.config.node_id, "shutting down");
            let _ = stop_tx.send(true);
            let _ = reconciler.await;
            let _ = balancer.await;
            let _ = collector.await;
            let _ = retention.await;
            let _ = disk.await;
            // A controlled shutdown: leaderships go to caught-up replicas first, so clients move on at
            // once instead of waiting out an election timeout.
            let (led, still) = broker.node.hand_off_leaderships(HAND_OFF_LIMIT).await;
            tracing::info!(node = broker.config.node_id, "handed off {} of {led} leaderships", led - still);
            // Stopping the groups first ends the Raft streams that keep peer connections open.
            broker.node.shutdown().await;
            let _ = server_stop_tx.send(());
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(r) => served(r),
                Err(_) => {
                    tracing::info!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
                    server.abort();
                    Ok(())
                }
            }
        }
    };
    broker.node.shutdown().await;
    tracing::info!(node = broker.config.node_id, "broker stopped");
    served
}

/// The outcome of the server task.
fn served(joined: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>) -> anyhow::Result<()> {
    match joined {
        Ok(r) => r.context("the gRPC server failed"),
        Err(e) => Err(anyhow::anyhow!("the gRPC server task failed: {e}")),
    }
}
