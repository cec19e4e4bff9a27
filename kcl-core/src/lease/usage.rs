//! What a lease store's calls cost: requests, items and capacity units by operation.
//!
//! DynamoDB bills a lease table by the capacity units its calls consume, and reports them when
//! asked (`ReturnConsumedCapacity=TOTAL`). A store that can count keeps a [`LeaseTableUsage`]
//! and offers it through [`LeaseStore::usage`](crate::LeaseStore::usage); the worker copies
//! it into [`WorkerStatus::lease_table_usage`](crate::WorkerStatus::lease_table_usage) and
//! the benchmarks turn it into units per lease-hour and per worker-hour.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;

/// Capacity units, kept in thousandths so that sums are exact and comparable: DynamoDB
/// reports halves (eventually consistent reads) and doubles (transactions) of whole units.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct CapacityUnits(u64);

/// Thousandths in a unit.
const MILLI: f64 = 1000.0;

impl CapacityUnits {
    /// `units` capacity units; negative or non-finite values count as zero.
    pub fn from_units(units: f64) -> Self {
        if units.is_finite() && units > 0.0 {
            CapacityUnits((units * MILLI).round() as u64)
        } else {
            CapacityUnits(0)
        }
    }

    /// The units as a number.
    pub fn units(self) -> f64 {
        self.0 as f64 / MILLI
    }
}

impl std::ops::Add for CapacityUnits {
    type Output = CapacityUnits;
    fn add(self, other: CapacityUnits) -> CapacityUnits {
        CapacityUnits(self.0.saturating_add(other.0))
    }
}

impl std::ops::AddAssign for CapacityUnits {
    fn add_assign(&mut self, other: CapacityUnits) {
        *self = *self + other;
    }
}

impl fmt::Debug for CapacityUnits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.units())
    }
}

impl fmt::Display for CapacityUnits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.units())
    }
}

/// One operation's totals.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct OperationUsage {
    /// Requests answered (a paginated scan counts each page).
    pub requests: u64,
    /// Items the requests returned or wrote.
    pub items: u64,
    /// Read capacity units consumed.
    pub read_units: CapacityUnits,
    /// Write capacity units consumed.
    pub write_units: CapacityUnits,
}

impl std::ops::AddAssign for OperationUsage {
    fn add_assign(&mut self, other: OperationUsage) {
        self.requests += other.requests;
        self.items += other.items;
        self.read_units += other.read_units;
        self.write_units += other.write_units;
    }
}

impl OperationUsage {
    /// One request that returned or wrote `items` items and consumed these units.
    pub fn request(items: u64, read_units: f64, write_units: f64) -> Self {
        OperationUsage {
            requests: 1,
            items,
            read_units: CapacityUnits::from_units(read_units),
            write_units: CapacityUnits::from_units(write_units),
        }
    }

    /// What was added since `earlier`, a snapshot of the same running totals.
    pub fn since(&self, earlier: &OperationUsage) -> OperationUsage {
        OperationUsage {
            requests: self.requests.saturating_sub(earlier.requests),
            items: self.items.saturating_sub(earlier.items),
            read_units: CapacityUnits(self.read_units.0.saturating_sub(earlier.read_units.0)),
            write_units: CapacityUnits(self.write_units.0.saturating_sub(earlier.write_units.0)),
        }
    }

    /// The sum of every operation's totals.
    pub fn total<'a>(usage: impl IntoIterator<Item = &'a OperationUsage>) -> OperationUsage {
        let mut sum = OperationUsage::default();
        for one in usage {
            sum += *one;
        }
        sum
    }
}

/// A store's running totals by operation (`"Scan"`, `"UpdateItem"`, ...), shared by its
/// clones. Only answered requests count: DynamoDB reports no capacity with an error.
#[derive(Debug, Default)]
pub struct LeaseTableUsage {
    by_operation: Mutex<BTreeMap<&'static str, OperationUsage>>,
}

impl LeaseTableUsage {
    /// Adds one answered request of `operation`.
    pub fn record(&self, operation: &'static str, usage: OperationUsage) {
        let mut by_operation = self
            .by_operation
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *by_operation.entry(operation).or_default() += usage;
    }

    /// The totals so far.
    pub fn snapshot(&self) -> BTreeMap<&'static str, OperationUsage> {
        self.by_operation
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_add_up_exactly_in_halves_and_doubles() {
        let usage = LeaseTableUsage::default();
        for _ in 0..3 {
            usage.record("Scan", OperationUsage::request(10, 0.5, 0.0));
        }
        usage.record("TransactWriteItems", OperationUsage::request(1, 0.0, 4.0));
        usage.record("UpdateItem", OperationUsage::request(1, 0.0, 1.0));
        let snapshot = usage.snapshot();
        assert_eq!(snapshot["Scan"].requests, 3);
        assert_eq!(snapshot["Scan"].items, 30);
        assert_eq!(snapshot["Scan"].read_units.units(), 1.5);
        let total = OperationUsage::total(snapshot.values());
        assert_eq!(total.requests, 5);
        assert_eq!(total.read_units, CapacityUnits::from_units(1.5));
        assert_eq!(total.write_units.units(), 5.0);
        let later = OperationUsage::request(2, 1.0, 0.0);
        let mut sum = snapshot["Scan"];
        sum += later;
        assert_eq!(sum.since(&snapshot["Scan"]), later);
    }

    #[test]
    fn nonsense_units_count_as_zero() {
        assert_eq!(CapacityUnits::from_units(-1.0), CapacityUnits::default());
        assert_eq!(
            CapacityUnits::from_units(f64::NAN),
            CapacityUnits::default()
        );
    }
}
