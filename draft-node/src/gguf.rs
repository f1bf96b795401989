//! The model facts a lookup-only node announces, read from GGUF metadata alone: no weights are
//! loaded and no model thread runs. The hello and the API need the model's name, tokenizer
//! fingerprint, vocabulary size and context length; a lookup node takes them from the GGUF its
//! tokenizer comes from (`model.tokenizer`, typically the target's).

use std::path::Path;

use edgespec_model::forward::{read_gguf_content, tokenizer_fingerprint};
use edgespec_model::ModelInfo;

/// [`ModelInfo`] from the metadata and tensor shapes of the GGUF at `path` (tensor data is not
/// read). `tokenizer_vocab` is the vocabulary size when the file has no embedding tensor (a
/// tokenizer-only GGUF).
pub(crate) fn model_facts(path: &Path, tokenizer_vocab: usize) -> Result<ModelInfo, String> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open {shown}: {e}"))?;
    let content =
        read_gguf_content(&mut std::io::BufReader::new(file), &shown).map_err(|e| e.to_string())?;
    let text = |key: &str| {
        content
            .metadata
            .get(key)
            .and_then(|v| v.to_string().ok())
            .cloned()
    };
    let arch = text("general.architecture")
        .ok_or_else(|| format!("{shown}: missing metadata `general.architecture`"))?;
    let context_key = format!("{arch}.context_length");
    let max_context = content
        .metadata
        .get(&context_key)
        .and_then(|v| {
            v.to_u64()
                .ok()
                .or_else(|| v.to_i64().ok().map(|x| x as u64))
        })
        .and_then(|x| usize::try_from(x).ok())
        .filter(|&x| x > 0)
        .ok_or_else(|| format!("{shown}: metadata `{context_key}` is missing or not a count"))?;
    // As the model loader counts it: the rows of the embedding (often more than the tokens).
    let vocab_size = content
        .tensor_infos
        .get("token_embd.weight")
        .and_then(|t| t.shape.dims2().ok())
        .map_or(tokenizer_vocab, |(rows, _)| rows);
    let name = text("general.name").unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    Ok(ModelInfo {
        arch,
        name,
        vocab_size,
        max_context,
        fingerprint: tokenizer_fingerprint(&content),
        kv_bytes_per_token: 0,
    })
}
