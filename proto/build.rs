//! Compiles `recur/v1/*.proto` with the pure-Rust `protox` (no system `protoc`) and generates
//! prost messages and tonic services. The encoded descriptor set is written to `OUT_DIR` too, for
//! server reflection, and pbjson-build derives the proto3 JSON mapping of the job spec (the
//! `recur train --spec` file).

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "recur/v1/tensor.proto",
    "recur/v1/model.proto",
    "recur/v1/job.proto",
    "recur/v1/client.proto",
    "recur/v1/worker.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protox reads the files itself, so cargo has to be told what to watch.
    println!("cargo:rerun-if-changed=recur");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = fds.encode_to_vec();
    std::fs::write(out_dir.join("recur_descriptor.bin"), &descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .preserve_proto_field_names()
        .build(&[
            ".recur.v1.JobSpec",
            ".recur.v1.ModelConfig",
            ".recur.v1.ModelKind",
            ".recur.v1.OptimizerSpec",
            ".recur.v1.ScheduleSpec",
            ".recur.v1.SeriesSpec",
            ".recur.v1.Normalization",
            ".recur.v1.Loss",
            ".recur.v1.LabelRule",
        ])?;
    tonic_prost_build::configure()
        // Flat vectors decode as one slice of the received buffer, not float by float.
        .bytes(".recur.v1.FlatVector.values")
        .bytes(".recur.v1.StepResult.grad_sum")
        .bytes(".recur.v1.StepResult.final_state")
        .bytes(".recur.v1.Step.initial_state")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
