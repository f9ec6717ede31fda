//! recur-coordinator: accepts datasets and jobs, drives workers through synchronous
//! data-parallel training, keeps checkpoints and serves predictions, over gRPC.
//!
//! The decisions live in [`scheduler`] (a synchronous state machine, no I/O); [`service`]
//! converts gRPC calls into its events and carries out its actions; [`server::run`] wires it
//! all to a listener.

#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod auth;
pub mod config;
pub mod convert;
pub mod datasets;
mod error;
pub mod grpc_metrics;
pub mod ids;
pub mod metrics;
mod predict;
pub mod scheduler;
pub mod server;
mod service;
pub mod spec;
pub mod store;
mod stream;

pub use config::CoordinatorConfig;
pub use error::{Error, Result};
pub use scheduler::PROTOCOL_VERSION;
pub use server::{run, serve};
