//! Generates the Agent service's Rust types and ttrpc stubs from proto/agent.proto.

use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=proto/agent.proto");
    ttrpc_codegen::Codegen::new()
        .out_dir(&out)
        .inputs(["proto/agent.proto"])
        .include("proto")
        .rust_protobuf()
        .run()
        .expect("generating the agent protocol from proto/agent.proto");
    // The generated files start with inner attributes and doc comments, which
    // include!() cannot take inside a module; drop them (the crate sets its own).
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out.join(name);
        let text = std::fs::read_to_string(&path).expect("generated file");
        let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("#![") && !l.starts_with("//!")).collect();
        std::fs::write(&path, kept.join("\n")).expect("rewrite generated file");
    }
}
