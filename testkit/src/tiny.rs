//! Tiny synthetic models (`edgespec_model::synthetic`) written where a test or soak wants them.

use std::path::{Path, PathBuf};

use edgespec_model::forward::load_gguf;
use edgespec_model::synthetic::{write_tiny_gguf, TinySpec, TinyWeights};
use edgespec_model::{CausalLm, DeviceKind, ModelError, TextTokenizer};

/// A tiny model file in a temporary folder of its own (removed when this is dropped).
#[derive(Debug)]
pub struct TinyModel {
    _dir: tempfile::TempDir,
    /// The GGUF file.
    pub path: PathBuf,
    /// What was written.
    pub spec: TinySpec,
}

impl TinyModel {
    /// Writes `spec` (panics if it cannot: test support).
    pub fn new(spec: TinySpec) -> Self {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("tiny.gguf");
        write_tiny_gguf(&path, &spec).expect("the tiny model is written");
        Self {
            _dir: dir,
            path,
            spec,
        }
    }

    /// The default tiny model with weights from `seed`.
    pub fn seeded(seed: u64) -> Self {
        Self::new(TinySpec {
            seed,
            ..TinySpec::default()
        })
    }

    /// Loads it on the CPU.
    pub fn load(&self) -> Box<dyn CausalLm> {
        load_gguf(&self.path, DeviceKind::Cpu).expect("the tiny model loads")
    }

    /// Its tokenizer.
    pub fn tokenizer(&self) -> TextTokenizer {
        TextTokenizer::from_gguf(&self.path).expect("the tiny tokenizer loads")
    }

    /// Its model fingerprint, as the nodes compute it.
    pub fn fingerprint(&self) -> String {
        self.load().info().fingerprint.clone()
    }
}

/// Writes a target and a draft for it: the default tiny model with weights from `seed`, and the
/// same weights quantised coarser (Q4_0) — a draft that agrees with the target most of the time
/// and disagrees sometimes, so rounds mix acceptances, rejections and corrections.
pub fn write_tiny_pair(target: &Path, draft: &Path, seed: u64) -> Result<(), ModelError> {
    let spec = TinySpec {
        seed,
        ..TinySpec::default()
    };
    write_tiny_gguf(target, &spec)?;
    write_tiny_gguf(
        draft,
        &TinySpec {
            weights: TinyWeights::Q4_0,
            ..spec
        },
    )
}
