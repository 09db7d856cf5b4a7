//! Benchmarks and reference-connector engines.
pub mod connector;
pub mod s3;
