//! Graceful drain: every accepted connection holds a [`DrainToken`]; at
//! shutdown the listeners stop accepting, each connection is asked to
//! finish (HTTP/1.1: close after the response in progress; HTTP/2: GOAWAY,
//! in-flight streams complete; TCP: runs to its end), and
//! [`Drain::wait`] resolves once every token is gone or the deadline
//! passes, whichever is first.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// Counts live connections.
#[derive(Debug, Clone)]
pub struct Drain {
    tx: Arc<watch::Sender<()>>,
}

/// One live connection; dropping it ends the connection's part in the
/// drain.
#[derive(Debug)]
pub struct DrainToken(#[allow(dead_code)] watch::Receiver<()>);

impl Default for Drain {
    fn default() -> Self {
        Drain {
            tx: Arc::new(watch::channel(()).0),
        }
    }
}

impl Drain {
    /// A token for a new connection.
    pub fn token(&self) -> DrainToken {
        DrainToken(self.tx.subscribe())
    }

    /// Connections still open.
    pub fn open(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Waits until no connection is open, at most `deadline`; true if all
    /// finished in time.
    pub async fn wait(&self, deadline: Duration) -> bool {
        tokio::time::timeout(deadline, self.tx.closed())
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_tokens_up_to_the_deadline() {
        let d = Drain::default();
        assert!(d.wait(Duration::from_secs(1)).await);
        let t = d.token();
        assert_eq!(d.open(), 1);
        assert!(!d.wait(Duration::from_secs(1)).await);
        let d2 = d.clone();
        let waiter = tokio::spawn(async move { d2.wait(Duration::from_secs(60)).await });
        drop(t);
        assert!(waiter.await.unwrap());
    }
}
