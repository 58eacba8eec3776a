//! Write batching on the leader: gathers concurrent commands into one Raft
//! entry ([`Proposal`]).
//!
//! openraft 0.9's core appends one entry per `client_write` and waits for
//! that append's flush before it takes the next message, so without
//! batching the leader does one fsync per write, whatever the load. Here a
//! task takes commands from a queue; while [`MAX_IN_FLIGHT`] proposals are
//! already on their way, new commands wait in the queue, and the next
//! proposal takes all of them (up to [`MAX_BATCH_COMMANDS`] /
//! [`MAX_BATCH_BYTES`]). A lone request is proposed at once: there is no
//! timer, so batching adds no latency when the cluster is idle.
//!
//! Each command still gets its own revision and its own response; a
//! failure of the proposal (no leader, timeout) fails all its commands with
//! the same error.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};
use trellis_raft_store::{Command, CommandResponse, Proposal, Raft};

use crate::error::ApiError;

/// Proposals in flight at once. Two lets one batch be appended while the
/// previous one replicates; more only splits the queue into smaller batches.
pub const MAX_IN_FLIGHT: usize = 2;
/// Most commands in one entry.
pub const MAX_BATCH_COMMANDS: usize = 512;
/// Most payload bytes in one entry: three quarters of sled's blob
/// threshold (`trellis_raft_store::store::SLED_BLOB_THRESHOLD_BYTES`), so
/// an entry never costs its own blob file and directory fsync; a single
/// command may exceed it alone
/// (a txn is capped at `MAX_TXN_BYTES`, a put at 1 MiB + key). With
/// `MAX_PAYLOAD_ENTRIES` per append this bounds replication messages.
pub const MAX_BATCH_BYTES: usize = trellis_raft_store::store::SLED_BLOB_THRESHOLD_BYTES * 3 / 4;
/// Commands waiting for a proposal slot before callers feel backpressure.
const QUEUE: usize = 16 * 1024;

type Reply = oneshot::Sender<Result<CommandResponse, ApiError>>;

/// Handle to the batching task.
pub struct Proposer {
    tx: mpsc::Sender<(Command, Reply)>,
    /// How long a caller waits for room in the queue.
    timeout: Duration,
}

fn size_of(cmd: &Command) -> usize {
    match cmd {
        Command::Put { key, value, .. } => key.len() + value.len(),
        Command::Delete { key, .. } => key.len(),
        Command::Txn {
            compare,
            success,
            failure,
        } => {
            use trellis_raft_store::{CompareTarget, TxnOp};
            let ops = |ops: &[TxnOp]| -> usize {
                ops.iter()
                    .map(|op| match op {
                        TxnOp::Put { key, value, .. } => key.len() + value.len(),
                        TxnOp::Delete { key } | TxnOp::Get { key } => key.len(),
                    })
                    .sum()
            };
            let compares: usize = compare
                .iter()
                .map(|c| {
                    c.key.len()
                        + match &c.target {
                            CompareTarget::Value(v) => v.len(),
                            _ => 8,
                        }
                })
                .sum();
            compares + ops(success) + ops(failure)
        }
        Command::Compact { .. } | Command::LeaseGrant { .. } | Command::LeaseRevoke { .. } => 16,
    }
}

impl Proposer {
    /// Start the batching task for `raft`; proposals give up after
    /// `timeout`.
    pub fn start(raft: Raft, timeout: Duration) -> Self {
        let queue_timeout = timeout;
        let (tx, mut rx) = mpsc::channel::<(Command, Reply)>(QUEUE);
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
            // A command that did not fit the previous batch opens the next.
            let mut carried: Option<(Command, Reply)> = None;
            loop {
                let first = match carried.take() {
                    Some(item) => item,
                    None => match rx.recv().await {
                        Some(item) => item,
                        None => return,
                    },
                };
                // Wait for a slot before draining: while slots are taken,
                // commands accumulate and the next batch carries them all.
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let mut bytes = size_of(&first.0);
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH_COMMANDS {
                    let Ok(item) = rx.try_recv() else { break };
                    let size = size_of(&item.0);
                    if bytes + size > MAX_BATCH_BYTES {
                        carried = Some(item);
                        break;
                    }
                    bytes += size;
                    batch.push(item);
                }
                let raft = raft.clone();
                tokio::spawn(async move {
                    propose(&raft, batch, timeout).await;
                    drop(permit);
                });
            }
        });
        Proposer {
            tx,
            timeout: queue_timeout,
        }
    }

    /// Propose `cmd` and wait for its result.
    pub async fn propose(&self, cmd: Command) -> Result<CommandResponse, ApiError> {
        let (reply, rx) = oneshot::channel();
        match tokio::time::timeout(self.timeout, self.tx.send((cmd, reply))).await {
            Err(_) => {
                return Err(ApiError::NoLeader(format!(
                    "the write queue stayed full for {:?}",
                    self.timeout
                )))
            }
            Ok(Err(_)) => return Err(ApiError::internal("proposer", "the proposal task stopped")),
            Ok(Ok(())) => {}
        }
        rx.await
            .map_err(|_| ApiError::internal("proposer", "the proposal was dropped"))?
    }
}

#[tracing::instrument(level = "debug", skip_all, fields(commands = batch.len()))]
async fn propose(raft: &Raft, batch: Vec<(Command, Reply)>, timeout: Duration) {
    // Callers that gave up (deadline, disconnect) are not proposed for.
    let (commands, replies): (Vec<Command>, Vec<Reply>) = batch
        .into_iter()
        .filter(|(_, reply)| !reply.is_closed())
        .unzip();
    if commands.is_empty() {
        return;
    }
    let what = match commands.as_slice() {
        [one] => one.kind(),
        _ => "batch of writes",
    };
    let result = tokio::time::timeout(timeout, raft.client_write(Proposal { commands })).await;
    let answers: Result<Vec<CommandResponse>, ApiError> = match result {
        Err(_) => Err(ApiError::Timeout {
            what,
            after: timeout,
        }),
        Ok(Ok(resp)) => Ok(resp.data.responses),
        Ok(Err(e)) => Err(ApiError::from(e)),
    };
    match answers {
        Ok(responses) if responses.len() == replies.len() => {
            for (reply, resp) in replies.into_iter().zip(responses) {
                let _ = reply.send(Ok(resp));
            }
        }
        Ok(responses) => {
            let n = responses.len();
            for reply in replies {
                let _ = reply.send(Err(ApiError::internal(
                    "proposer",
                    format!("the state machine answered {n} responses to a batch"),
                )));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
