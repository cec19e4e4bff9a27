#![doc = include_str!("../README.md")]
#![deny(rustdoc::broken_intra_doc_links, rustdoc::bare_urls)]
#![warn(missing_docs)]

mod builder;
pub mod schema;
mod store;

pub use builder::AwsWorkerBuilder;
pub use store::DynamoLeaseStore;
