//! Generates the client of the node's Admin service (consensus.admin.v1), the one call the
//! etcd v3 API has no words for: replacing the voter set in one joint-consensus step.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = std::path::Path::new("../node/proto/admin/admin.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&[proto], &[std::path::Path::new("../node/proto")])?;
    Ok(())
}
