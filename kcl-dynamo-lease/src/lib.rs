#![doc = include_str!("../README.md")]
#![deny(rustdoc::broken_intra_doc_links, rustdoc::bare_urls)]
#![warn(missing_docs)]

mod builder;
mod capacity;
mod errors;
mod lineage_lease;
mod repair;
pub mod schema;
mod store;
mod update_expression;

pub use builder::AwsWorkerBuilder;
pub use repair::{Change, Repair, RepairError};
pub use store::DynamoLeaseStore;
