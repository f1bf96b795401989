//! Several draft nodes, several sessions each, over emulated WAN links of different RTTs, all
//! verified by one verify node: every answer's token ids equal target-only greedy for its prompt,
//! while every draft node's drafts were both accepted and rejected (the verify node's corrections
//! crossed the links).
//!
//! SmolLM2-135M is the target, so the test stays fast; the draft is SmolLM2-135M with its RMS-norm
//! epsilon raised from 1e-5 to 1e-2 (same weights and tokenizer, a slightly different function:
//! it agrees with the target on roughly four greedy tokens in five). The Qwen pair is covered by
//! `e2e_greedy`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use edgespec::client::{stream_chat, ChatRequest};
use edgespec::cluster::{ClusterOptions, DraftSpec, LocalCluster, PolicyOverrides};
use edgespec::linkemu::LinkProfile;
use edgespec_testkit::reference::references;
use edgespec_tests::{smollm, PROMPTS};
use futures::future::try_join_all;

const MAX_TOKENS: u32 = 24;

/// GGUF metadata value type of a 32-bit float.
const GGUF_F32: u32 = 6;

/// Writes a copy of the GGUF `model` to `out` with the f32 metadata value `key` replaced by
/// `value` (the file keeps its size and every tensor; only that value changes).
fn with_f32_metadata(model: &Path, key: &str, value: f32, out: &Path) -> Result<()> {
    let mut bytes = std::fs::read(model)?;
    // In the header: key length (u64), key, value type (u32), value.
    let mut needle = (key.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(key.as_bytes());
    needle.extend_from_slice(&GGUF_F32.to_le_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .with_context(|| format!("no f32 `{key}` in {}", model.display()))?
        + needle.len();
    let old = f32::from_le_bytes(bytes[at..at + 4].try_into()?);
    ensure!(old != value, "`{key}` is already {value}");
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(out, bytes)?;
    Ok(())
}

/// SmolLM2 with a larger RMS-norm epsilon: a draft that often, but not always, disagrees.
fn disagreeing_draft(target: &Path, dir: &Path) -> Result<PathBuf> {
    let out = dir.join("smollm2-eps1e-2.gguf");
    with_f32_metadata(target, "llama.attention.layer_norm_rms_epsilon", 1e-2, &out)?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draft_nodes_over_different_links_share_one_verifier() -> Result<()> {
    edgespec_tests::init_logs();
    let model = smollm()?;
    let dir = tempfile::tempdir()?;
    let draft = disagreeing_draft(&model, dir.path())?;
    let references = references(&model, &PROMPTS, MAX_TOKENS as usize).await?;

    let mut opts = ClusterOptions::new(model, draft);
    opts.drafts = [0u64, 20, 50]
        .iter()
        .map(|rtt| DraftSpec {
            link: Some(LinkProfile::wan(Duration::from_millis(*rtt), 20)),
            pipelined: *rtt == 50,
            ..Default::default()
        })
        .collect();
    opts.policy = PolicyOverrides {
        gamma_bounds: Some((1, 6)),
        ..Default::default()
    };
    let cluster = LocalCluster::start(opts).await?;

    // Two sessions per draft node, all at once.
    let client = reqwest::Client::new();
    let jobs = cluster.drafts.iter().enumerate().flat_map(|(node, d)| {
        (0..2).map(move |j| (node, d.openai_base(), (j + node) % PROMPTS.len()))
    });
    let results = try_join_all(jobs.map(|(node, base, prompt_index)| {
        let client = client.clone();
        async move {
            let req = ChatRequest {
                prompt: PROMPTS[prompt_index].to_string(),
                max_tokens: MAX_TOKENS,
                ..Default::default()
            };
            let out = stream_chat(&client, &base, &req, |_| {}).await?;
            Ok::<_, anyhow::Error>((node, prompt_index, out))
        }
    }))
    .await?;
    assert_eq!(results.len(), 6);
    let mut per_node = vec![(0.0, 0.0); cluster.drafts.len()];
    for (node, i, out) in &results {
        assert_eq!(
            &out.token_ids, &references[*i],
            "a session's token ids differ from target-only greedy for {:?} (draft node {node})",
            PROMPTS[*i]
        );
        let (drafted, accepted) = (
            out.stat("drafted").context("no drafted statistic")?,
            out.stat("accepted").context("no accepted statistic")?,
        );
        per_node[*node].0 += drafted;
        per_node[*node].1 += accepted;
    }
    // Every draft node's drafts were verified remotely, accepted and rejected.
    for (node, (drafted, accepted)) in per_node.iter().enumerate() {
        eprintln!("draft node {node}: drafted {drafted}, accepted {accepted}");
        assert!(
            *accepted > 0.0 && accepted < drafted,
            "draft node {node} saw no acceptance or no rejection: drafted {drafted}, accepted \
             {accepted}"
        );
    }
    // Every link really carried traffic.
    for d in &cluster.drafts {
        let stats = d.link.as_ref().expect("linked").stats();
        assert!(stats.bytes_up > 0 && stats.bytes_down > 0);
    }
    cluster.stop().await
}
