//! Which share of real text's tokens fall among the first K token ids (for choosing a draft
//! head's kept vocabulary):
//!
//! ```text
//! cargo run -p edgespec-model --example vocab_coverage -- MODEL.gguf FILE...
//! ```

use anyhow::{Context, Result};
use edgespec_model::TextTokenizer as Tokenizer;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args.next().context("usage: vocab_coverage MODEL.gguf FILE...")?;
    let tok = Tokenizer::from_gguf(&model)?;
    let mut ids = Vec::new();
    for f in args {
        let text = std::fs::read_to_string(&f).with_context(|| f.clone())?;
        ids.extend(tok.encode(&text)?);
    }
    let n = ids.len() as f64;
    println!("{} tokens", ids.len());
    for k in [8192u32, 16384, 24576, 32768, 40960, 49152, 65536, 98304, 131072] {
        let inside = ids.iter().filter(|&&t| t < k).count() as f64;
        println!("K = {k:6}: {:.4}", inside / n);
    }
    Ok(())
}
