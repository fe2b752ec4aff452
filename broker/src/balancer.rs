//! Leader balancing: leadership goes back to each partition's preferred leader (its first replica) once
//! that replica has caught up, so every node leads an even share of partitions (placement gives each node
//! an equal share of preferred leaderships).
//!
//! Each broker looks only at the partitions it leads, so no coordination is needed: the current leader
//! hands over. The decision is a pure function ([`plan`]); [`run`] applies it every few seconds, a few
//! transfers at a time so a returning node does not trigger an election storm.

use std::sync::Arc;
use std::time::Duration;

use flotilla_raft_store::keys::GroupId;
use flotilla_raft_store::types::NodeId;

use crate::broker::Broker;

/// How often leaders look for partitions to hand back.
const BALANCE_INTERVAL: Duration = Duration::from_secs(5);
/// Leadership transfers a node starts per round.
const TRANSFERS_PER_ROUND_MAX: usize = 8;

/// A partition this node leads, as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Led {
    pub group: GroupId,
    pub preferred: NodeId,
    /// Replicas the leader sees as caught up.
    pub in_sync: Vec<NodeId>,
}

/// The transfers `me` should start: partitions it leads whose preferred leader is another replica that
/// has caught up. At most [`TRANSFERS_PER_ROUND_MAX`].
pub fn plan(me: NodeId, led: &[Led]) -> Vec<(GroupId, NodeId)> {
    led.iter()
        .filter(|l| l.preferred != me && l.in_sync.contains(&l.preferred))
        .map(|l| (l.group, l.preferred))
        .take(TRANSFERS_PER_ROUND_MAX)
        .collect()
}

/// Hands leaderships back to preferred leaders until `stop` fires.
pub async fn run(broker: Arc<Broker>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let me = broker.config.node_id;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(BALANCE_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        let mut led = Vec::new();
        for topic in broker.topics() {
            for p in topic.partitions {
                let Some(group) = broker.node.group(p.group_id) else { continue };
                if !group.is_leader(me) {
                    continue;
                }
                let (_, in_sync) = group.replica_status();
                let preferred = p.replicas.first().copied().unwrap_or(me);
                led.push(Led { group: p.group_id, preferred, in_sync });
            }
        }
        for (group_id, to) in plan(me, &led) {
            if let Some(group) = broker.node.group(group_id) {
                tracing::info!(group = group_id, to, "handing leadership back to the preferred leader");
                if let Err(e) = group.transfer_leader(to).await {
                    tracing::warn!(group = group_id, to, "leader transfer failed: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn led(group: GroupId, preferred: NodeId, in_sync: &[NodeId]) -> Led {
        Led { group, preferred, in_sync: in_sync.to_vec() }
    }

    #[test]
    fn hands_back_only_to_caught_up_preferred_leaders() {
        let me = 1;
        let plan = plan(
            me,
            &[
                led(10, 1, &[1, 2, 3]), // already the preferred leader
                led(11, 2, &[1, 2, 3]), // preferred 2 caught up: hand back
                led(12, 3, &[1, 2]),    // preferred 3 still behind: keep
            ],
        );
        assert_eq!(plan, vec![(11, 2)]);
    }

    #[test]
    fn transfers_per_round_are_bounded() {
        let many: Vec<Led> = (0..100).map(|g| led(g, 2, &[1, 2])).collect();
        assert_eq!(plan(1, &many).len(), TRANSFERS_PER_ROUND_MAX);
    }
}
