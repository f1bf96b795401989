//! Concatenating data chunks into one file while hashing it.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::io_err;
use crate::ModelError;

const BUF: usize = 1 << 20;

/// Append `chunks` to `out` in order and return the hex sha256 of everything written.
pub fn assemble_chunks(
    chunks: &[PathBuf],
    out: &mut File,
    progress: bool,
) -> Result<String, ModelError> {
    let total: u64 = chunks
        .iter()
        .map(|c| std::fs::metadata(c).map(|m| m.len()))
        .sum::<Result<u64, _>>()
        .map_err(|e| io_err("reading chunk sizes".into(), e))?;
    let bar = progress.then(|| bytes_bar(total, "assembling"));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUF];
    for chunk in chunks {
        let mut f =
            File::open(chunk).map_err(|e| io_err(format!("opening {}", chunk.display()), e))?;
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| io_err(format!("reading {}", chunk.display()), e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| io_err("writing the assembled model".into(), e))?;
            if let Some(b) = &bar {
                b.inc(n as u64);
            }
        }
    }
    out.flush()
        .map_err(|e| io_err("writing the assembled model".into(), e))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let mut f = File::open(path).map_err(|e| io_err(format!("opening {}", path.display()), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUF];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| io_err(format!("reading {}", path.display()), e))?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

pub(super) fn bytes_bar(total: u64, msg: &'static str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>12} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(msg);
    bar
}
