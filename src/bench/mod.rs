//! Benchmarks and reference-connector engines.
pub mod connector;
