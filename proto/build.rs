//! Generates the gRPC code from proto/edgespec/v1 with a vendored protoc, so a fresh clone builds
//! with cargo alone.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // The build script is single-threaded; tonic-prost-build reads PROTOC from the environment.
    std::env::set_var("PROTOC", protoc);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let files = [
        "edgespec/v1/common.proto",
        "edgespec/v1/verifier.proto",
        "edgespec/v1/coordinator.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("edgespec_v1_descriptor.bin"))
        .compile_protos(&files, &["."])?;
    Ok(())
}
