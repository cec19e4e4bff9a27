//! A KPL aggregate encoder, so that tests and benches can put what the Kinesis Producer
//! Library puts: the magic bytes `F3 89 9A C2`, a protobuf `AggregatedRecord`, and the MD5
//! digest of that protobuf. The library's de-aggregation (`kcl-core`) is the decoder.
//!
//! The encoder is `kcl-agent`'s (`kcl_examples::kpl`, tested there against the KPL's own
//! bytes); this module keeps the names the tests and benches use.

pub use kcl_examples::kpl::{aggregate, user_records};
