//! A shared value whose changes wake the tasks waiting on it in a fixed order.
//!
//! Tokio's `watch` channel spreads its waiters over eight queues picked at random, so tasks
//! woken by one change run in a different order on every run. That is harmless in production
//! but makes a seeded simulation irreproducible, so the worker publishes state through this
//! instead: one [`Notify`], whose waiters wake in the order they registered.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;
use tokio::sync::futures::Notified;

#[derive(Debug, Default)]
pub(crate) struct Published<T> {
    value: Mutex<Arc<T>>,
    changed: Notify,
}

impl<T> Published<T> {
    pub(crate) fn new(value: T) -> Self {
        Published {
            value: Mutex::new(Arc::new(value)),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Arc<T>> {
        // The value is replaced whole, so a panic elsewhere cannot leave it half-written.
        self.value.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current value.
    pub(crate) fn get(&self) -> Arc<T> {
        self.lock().clone()
    }

    /// Replaces the value and wakes every waiter.
    pub(crate) fn set(&self, value: T) {
        *self.lock() = Arc::new(value);
        self.changed.notify_waiters();
    }

    /// A future that completes at the next [`Published::set`]. It is registered at once, so a
    /// caller that creates it, then reads the value, then awaits it, misses no change.
    fn next_change(&self) -> std::pin::Pin<Box<Notified<'_>>> {
        let mut notified = Box::pin(self.changed.notified());
        notified.as_mut().enable();
        notified
    }

    /// Waits until the value satisfies `ready`, and returns it.
    pub(crate) async fn wait_for(&self, mut ready: impl FnMut(&T) -> bool) -> Arc<T> {
        loop {
            let change = self.next_change();
            let value = self.get();
            if ready(&value) {
                return value;
            }
            change.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waiters_see_the_change_that_satisfies_them() {
        let published = Arc::new(Published::new(0u32));
        let waiter = tokio::spawn({
            let published = published.clone();
            async move { *published.wait_for(|v| *v >= 2).await }
        });
        tokio::task::yield_now().await;
        published.set(1);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        published.set(2);
        assert_eq!(waiter.await.unwrap(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_wake_in_the_order_they_started_waiting() {
        let published = Arc::new(Published::new(false));
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..20 {
            let (published, order) = (published.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                published.wait_for(|v| *v).await;
                order.lock().unwrap().push(i);
            }));
            tokio::task::yield_now().await;
        }
        published.set(true);
        for task in tasks {
            task.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order.len(), 20);
        // One fixed order run after run (Notify wakes its list in registration order).
        assert!(
            order == sorted || order.iter().rev().eq(sorted.iter()),
            "{order:?}"
        );
    }
}
