//! The `quicmesh` package: the CLI's demo and the sample services it runs (also used by the
//! end-to-end tests and benchmarks as real backends).
#![forbid(unsafe_code)]

pub mod demo;
pub mod live;
pub mod samples;
pub mod tap;
pub mod top;
