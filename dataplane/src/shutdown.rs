//! The shutdown signal every long-running task of the sidecar watches: a
//! `tokio::sync::watch<bool>` flipped once by [`crate::Sidecar::shutdown`]
//! (SIGTERM / Ctrl-C in the binary). A dropped sender counts as shutdown,
//! so no task outlives its owner.

use std::time::Duration;

use tokio::sync::watch;

/// A cloneable receiver of the shutdown signal.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// The sending side.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// A new signal, not yet triggered.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    /// Tells every [`Shutdown`] to stop (idempotent).
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }

    /// A new receiver.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// True once triggered (or the trigger was dropped).
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }

    /// Resolves once triggered (or the trigger was dropped).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|v| *v).await;
    }

    /// Sleeps `d`; returns true if shutdown came first.
    pub async fn sleep(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => self.is_triggered(),
            _ = self.wait() => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn trigger_and_drop_both_stop() {
        let (t, mut s) = channel();
        assert!(!s.is_triggered());
        assert!(!s.sleep(Duration::from_millis(1)).await);
        t.trigger();
        s.wait().await;
        assert!(s.is_triggered());

        let (t, mut s) = channel();
        drop(t);
        assert!(s.is_triggered());
        assert!(s.sleep(Duration::from_secs(60)).await);
    }
}
