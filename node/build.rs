//! Generates the gRPC code for the etcd v3 API, our Admin service and the peer transport
//! from node/proto.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut protos = Vec::new();
    for dir in ["proto/etcd", "proto/raft", "proto/admin"] {
        // The directory too: a new .proto file must regenerate the code.
        println!("cargo:rerun-if-changed={dir}");
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "proto") {
                println!("cargo:rerun-if-changed={}", path.display());
                protos.push(path);
            }
        }
    }
    protos.sort();
    tonic_prost_build::configure().compile_protos(&protos, &[std::path::PathBuf::from("proto")])?;
    Ok(())
}
