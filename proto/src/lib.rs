//! The recur wire contract, generated from `proto/recur/v1/*.proto`.
//!
//! The `.proto` files are the documentation: every message and field is described there. This
//! crate only includes the generated code; conversions to domain types live in `recur-core`.

#![allow(missing_docs, clippy::all)]

/// Package `recur.v1`.
pub mod v1 {
    tonic::include_proto!("recur.v1");
    // serde for the job spec and what it holds, in the proto3 JSON mapping (field names as in the
    // .proto files; either form is read).
    include!(concat!(env!("OUT_DIR"), "/recur.v1.serde.rs"));
}

/// The type of the `bytes` fields that carry flat float vectors.
pub use prost::bytes::Bytes;

/// The encoded `FileDescriptorSet` of every recur proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("recur_descriptor");

/// Transport settings every recur component uses on its gRPC connections, so both ends of a
/// connection agree.
pub mod transport {
    use std::time::Duration;

    /// HTTP/2 flow-control window of one stream: a whole parameter or gradient vector of a large
    /// model (2 M parameters) is in flight without waiting for a window update.
    pub const STREAM_WINDOW: u32 = 8 << 20;
    /// Largest HTTP/2 frame either side accepts: a parameter vector crosses in a few frames, not
    /// in hundreds of 16 KiB ones (each a separate write and read).
    pub const MAX_FRAME_SIZE: u32 = 1 << 20;
    /// HTTP/2 flow-control window of a connection.
    pub const CONNECTION_WINDOW: u32 = 16 << 20;
    /// TCP keepalive and HTTP/2 ping period: a peer that vanished without closing (a cut link, a
    /// frozen host) is noticed.
    pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
}

/// Bearer tokens, as every component reads them from a flag or its environment variable.
pub mod token {
    /// Accepts a token value from the command line or the environment: printable ASCII without
    /// spaces (it travels in an `authorization` header), and never empty. An empty variable (a
    /// deploy file's `${TOKEN:-}`) is an error rather than "authenticate with the empty
    /// string" or "no authentication": unset the variable to run without a token.
    pub fn parse(value: &str) -> Result<String, String> {
        if value.is_empty() {
            return Err(
                "the token is empty; unset the variable (or drop the flag) to run without one"
                    .into(),
            );
        }
        if let Some(bad) = value.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(format!(
                "the token holds {bad:?}; use printable ASCII without spaces"
            ));
        }
        Ok(value.to_string())
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn empty_and_unprintable_tokens_are_refused() {
            assert!(super::parse("").unwrap_err().contains("empty"));
            assert!(super::parse("a b").unwrap_err().contains("' '"));
            assert_eq!(super::parse("s3cr3t-Token_1").unwrap(), "s3cr3t-Token_1");
        }
    }
}
