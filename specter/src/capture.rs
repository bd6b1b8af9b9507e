//! The passive capture source: the TC eBPF programs, embedded in the binary.
//!
//! The object is built from `specter-ebpf` by this crate's build script. This module loads it
//! and hands each program to the kernel's verifier.

use aya::{Ebpf, programs::Program};
use thiserror::Error;

/// The eBPF object built from `specter-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/specter"));

#[derive(Debug, Error)]
pub enum CaptureError {
    #[error("cannot load the eBPF object: {0}")]
    Object(#[source] Box<aya::EbpfError>),
    #[error("the kernel rejected eBPF program {program}: {source}")]
    Verifier {
        program: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("eBPF program {program} is not a TC classifier")]
    UnexpectedProgram { program: String },
}

/// Loads the object and every program in it through the verifier; returns the object and the
/// names of the programs loaded.
pub fn load_all() -> Result<(Ebpf, Vec<String>), CaptureError> {
    let mut ebpf = Ebpf::load(EBPF_OBJECT).map_err(|e| CaptureError::Object(Box::new(e)))?;
    let mut loaded = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        match program {
            Program::SchedClassifier(classifier) => {
                classifier.load().map_err(|source| CaptureError::Verifier {
                    program: name.to_owned(),
                    source: Box::new(source),
                })?;
                loaded.push(name.to_owned());
            }
            _ => {
                return Err(CaptureError::UnexpectedProgram {
                    program: name.to_owned(),
                });
            }
        }
    }
    loaded.sort();
    Ok((ebpf, loaded))
}
