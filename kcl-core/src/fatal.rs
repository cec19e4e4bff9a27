//! The first error that ends a worker, raised wherever it is seen.
//!
//! Some failures are found deep inside a task the coordinator does not wait on: a renewal or a
//! checkpoint finds the lease table gone, or a lease's counter moved under another process
//! using this worker id. Whoever sees one raises it here; the coordinator's loop watches the
//! token and ends `run` with the first error raised. Later ones are logged by their raisers
//! and dropped: the first is the cause.

use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

use crate::error::Error;

#[derive(Debug, Default)]
pub(crate) struct Fatal {
    raised: CancellationToken,
    first: Mutex<Option<Error>>,
}

impl Fatal {
    /// Records `error` if it is the first, and wakes the coordinator.
    pub(crate) fn raise(&self, error: Error) {
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() && !self.raised.is_cancelled() {
            *first = Some(error);
            self.raised.cancel();
        }
    }

    /// Cancelled once an error was raised.
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.raised
    }

    pub(crate) fn is_raised(&self) -> bool {
        self.raised.is_cancelled()
    }

    /// The first error raised, once (the coordinator returns it).
    pub(crate) fn take(&self) -> Option<Error> {
        self.first.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_error_is_kept() {
        let fatal = Fatal::default();
        assert!(!fatal.is_raised());
        fatal.raise(Error::LeaseTableNotFound {
            table: "a".into(),
            source: None,
        });
        fatal.raise(Error::LeaseTableNotFound {
            table: "b".into(),
            source: None,
        });
        assert!(fatal.token().is_cancelled());
        assert!(
            matches!(fatal.take(), Some(Error::LeaseTableNotFound { table, .. }) if table == "a")
        );
        assert!(fatal.take().is_none());
    }
}
