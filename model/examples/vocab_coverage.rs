//! Token-frequency tools for choosing a draft head's kept vocabulary:
//!
//! ```text
//! # share of the tokens of FILEs among the first K ids, and among the K most frequent ids of RANKS
//! cargo run -p edgespec-model --example vocab_coverage -- MODEL.gguf eval [RANKS] -- FILE...
//! # count token frequencies over FILEs (paths read from stdin, one per line) and write the ids,
//! # most frequent first, as text
//! cargo run -p edgespec-model --example vocab_coverage -- MODEL.gguf rank OUT < paths
//! ```

use std::collections::HashMap;
use std::io::BufRead;

use anyhow::{bail, Context, Result};
use edgespec_model::TextTokenizer;

const KS: [usize; 8] = [8192, 16384, 24576, 32768, 40960, 49152, 65536, 98304];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: vocab_coverage MODEL.gguf eval [RANKS] -- FILE... | rank OUT < paths";
    let (model, mode) = (args.first().context(usage)?, args.get(1).context(usage)?);
    let tok = TextTokenizer::from_gguf(model)?;
    match mode.as_str() {
        "rank" => {
            let out = args.get(2).context(usage)?;
            let mut counts: HashMap<u32, u64> = HashMap::new();
            let mut total = 0usize;
            for path in std::io::stdin().lock().lines() {
                let path = path?;
                let Ok(text) = std::fs::read_to_string(&path) else {
                    continue;
                };
                for id in tok.encode(&text)? {
                    *counts.entry(id).or_default() += 1;
                    total += 1;
                }
            }
            let mut ids: Vec<(u32, u64)> = counts.into_iter().collect();
            ids.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let text: String = ids.iter().map(|(id, _)| format!("{id}\n")).collect();
            std::fs::write(out, text)?;
            println!("{total} tokens, {} distinct ids -> {out}", ids.len());
        }
        "eval" => {
            let sep = args.iter().position(|a| a == "--").context(usage)?;
            let ranks: Option<Vec<u32>> = match args.get(2).filter(|_| sep > 2) {
                Some(f) => Some(
                    std::fs::read_to_string(f)?
                        .lines()
                        .map(|l| l.parse())
                        .collect::<Result<_, _>>()?,
                ),
                None => None,
            };
            let mut ids = Vec::new();
            for f in &args[sep + 1..] {
                let text = std::fs::read_to_string(f).with_context(|| f.clone())?;
                ids.extend(tok.encode(&text)?);
            }
            let n = ids.len() as f64;
            println!("{} tokens", ids.len());
            for k in KS {
                let by_id = ids.iter().filter(|&&t| (t as usize) < k).count() as f64 / n;
                let by_rank = ranks.as_ref().map(|r| {
                    let kept: std::collections::HashSet<u32> = r.iter().take(k).copied().collect();
                    ids.iter().filter(|t| kept.contains(t)).count() as f64 / n
                });
                match by_rank {
                    Some(r) => println!("K = {k:6}: by id {by_id:.4}, by frequency {r:.4}"),
                    None => println!("K = {k:6}: by id {by_id:.4}"),
                }
            }
        }
        other => bail!("unknown mode {other}; {usage}"),
    }
    Ok(())
}
