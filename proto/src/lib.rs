//! The recur wire contract, generated from `proto/recur/v1/*.proto`.
//!
//! The `.proto` files are the documentation: every message and field is described there. This
//! crate only includes the generated code; conversions to domain types live in `recur-core`.

#![allow(missing_docs, clippy::all)]

/// Package `recur.v1`.
pub mod v1 {
    tonic::include_proto!("recur.v1");
}

/// The encoded `FileDescriptorSet` of every recur proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("recur_descriptor");
