//! The CUDA backend of the fused layers (written in the next step).
