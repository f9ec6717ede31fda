//! recur-client: a typed client for the recur coordinator, and an embedded cluster
//! ([`local::LocalCluster`]) that runs a coordinator and workers in one process.

#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
// The CLI's output is its interface.
#![allow(clippy::print_stdout, clippy::print_stderr)]

pub mod cli;
mod client;
pub mod local;

pub use client::{Client, ClientError, DEFAULT_COORDINATOR, PredictSession};
