//! Group commit: the writes of concurrent callers and handlers share one transaction.
//!
//! One writer task owns the storage's write path. Every save and completion is
//! queued to it; while one batch commits, the next accumulates, so under load a
//! batch holds as many writes as arrived during the previous commit (up to
//! `max_batch`). With one caller a write commits at once: no timer, no linger.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use crate::error::StorageError;
use crate::storage::{
    Completion, CompletionOutcome, MessageStorage, NewMessage, SaveOutcome, WriteBatch,
};

enum WriteOp {
    /// Ends the writer after the writes queued before it.
    Close,
    Save(
        NewMessage,
        oneshot::Sender<Result<SaveOutcome, StorageError>>,
    ),
    Complete(
        Completion,
        oneshot::Sender<Result<CompletionOutcome, StorageError>>,
    ),
}

/// A handle to the writer task. Cloning shares the task.
#[derive(Clone)]
pub(crate) struct GroupCommit {
    tx: mpsc::UnboundedSender<WriteOp>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupCommit")
    }
}

impl GroupCommit {
    /// Starts the writer task. It ends once every handle is dropped and the
    /// queue is drained.
    pub(crate) fn start(
        storage: Arc<dyn MessageStorage>,
        max_batch: usize,
        tasks: &TaskTracker,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tasks.spawn(run(storage, rx, max_batch));
        Self { tx }
    }

    /// Stores a message.
    pub(crate) async fn save(&self, message: NewMessage) -> Result<SaveOutcome, StorageError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(WriteOp::Save(message, done))
            .map_err(|_| StorageError::Closed)?;
        wait.await.map_err(|_| StorageError::Closed)?
    }

    /// Asks the writer to stop once the writes queued so far are committed.
    pub(crate) fn close(&self) {
        let _ = self.tx.send(WriteOp::Close);
    }

    /// Records a completion.
    pub(crate) async fn complete(
        &self,
        completion: Completion,
    ) -> Result<CompletionOutcome, StorageError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(WriteOp::Complete(completion, done))
            .map_err(|_| StorageError::Closed)?;
        wait.await.map_err(|_| StorageError::Closed)?
    }
}

async fn run(
    storage: Arc<dyn MessageStorage>,
    mut rx: mpsc::UnboundedReceiver<WriteOp>,
    max_batch: usize,
) {
    let mut ops = Vec::with_capacity(max_batch);
    let batch_size = metrics::histogram!("flotilla_group_commit_batch_size");
    let mut closing = false;
    while !closing && rx.recv_many(&mut ops, max_batch).await > 0 {
        let mut batch = WriteBatch::default();
        let mut save_waiters = Vec::new();
        let mut complete_waiters = Vec::new();
        for op in ops.drain(..) {
            match op {
                WriteOp::Close => {
                    closing = true;
                    break;
                }
                WriteOp::Save(m, done) => {
                    batch.saves.push(m);
                    save_waiters.push(done);
                }
                WriteOp::Complete(c, done) => {
                    batch.completions.push(c);
                    complete_waiters.push(done);
                }
            }
        }
        batch_size.record((save_waiters.len() + complete_waiters.len()) as f64);
        match storage.write(batch).await {
            Ok(outcome) => {
                let mut saves = outcome.saves.into_iter();
                for done in save_waiters {
                    let _ = done.send(saves.next().ok_or_else(short_outcome));
                }
                let mut completions = outcome.completions.into_iter();
                for done in complete_waiters {
                    let _ = done.send(completions.next().ok_or_else(short_outcome));
                }
            }
            Err(error) => {
                tracing::warn!(%error, "group commit failed; every write of the batch is retried by its owner");
                let shared = Arc::new(error);
                for done in save_waiters {
                    let _ = done.send(Err(StorageError::Shared(shared.clone())));
                }
                for done in complete_waiters {
                    let _ = done.send(Err(StorageError::Shared(shared.clone())));
                }
            }
        }
    }
}

fn short_outcome() -> StorageError {
    StorageError::Corrupt("storage returned fewer outcomes than writes".to_owned())
}
