//! Graceful shutdown: a signal every listener and connection watches, and a count of
//! connections still open so the process can wait for them (up to a deadline).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::{Notify, watch};

#[derive(Clone)]
pub struct Drain {
    signal: watch::Sender<bool>,
    active: Arc<AtomicUsize>,
    idle: Arc<Notify>,
}

/// Held by a connection while it is open.
pub struct Guard {
    active: Arc<AtomicUsize>,
    idle: Arc<Notify>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            signal: watch::channel(false).0,
            active: Arc::new(AtomicUsize::new(0)),
            idle: Arc::new(Notify::new()),
        }
    }
}

impl Drain {
    pub fn start(&self) {
        self.signal.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// Resolves once draining has started.
    pub async fn signaled(&self) {
        let mut rx = self.signal.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    pub fn guard(&self) -> Guard {
        self.active.fetch_add(1, Ordering::AcqRel);
        Guard {
            active: self.active.clone(),
            idle: self.idle.clone(),
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Resolves when no guarded connection is left.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_waits_for_guards() {
        let d = Drain::default();
        d.idle().await;
        let g = d.guard();
        let d2 = d.clone();
        let waiter = tokio::spawn(async move { d2.idle().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(g);
        waiter.await.unwrap();
        assert!(!d.is_draining());
        d.start();
        d.signaled().await;
        assert!(d.is_draining());
    }
}
