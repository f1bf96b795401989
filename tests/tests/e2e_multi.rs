//! Several draft nodes, several sessions each, over emulated WAN links of different RTTs, all
//! verified by one verify node: every answer equals target-only greedy for its prompt.
//!
//! SmolLM2-135M serves as both draft and target so the test stays fast; the Qwen pair is covered
//! by `e2e_greedy`.

use std::time::Duration;

use anyhow::Result;
use edgespec::client::{stream_chat, ChatRequest};
use edgespec::cluster::{ClusterOptions, DraftSpec, LocalCluster, PolicyOverrides};
use edgespec::linkemu::LinkProfile;
use edgespec_tests::{smollm, target_only_greedy, PROMPTS};
use futures::future::try_join_all;

const MAX_TOKENS: u32 = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draft_nodes_over_different_links_share_one_verifier() -> Result<()> {
    edgespec_tests::init_logs();
    let model = smollm()?;
    let m = model.clone();
    let references = tokio::task::spawn_blocking(move || {
        PROMPTS
            .iter()
            .map(|p| target_only_greedy(&m, p, MAX_TOKENS as usize))
            .collect::<Result<Vec<_>>>()
    })
    .await??;

    let mut opts = ClusterOptions::new(model.clone(), model);
    opts.drafts = [0u64, 20, 50]
        .iter()
        .map(|rtt| DraftSpec {
            link: Some(LinkProfile::wan(Duration::from_millis(*rtt), 20)),
            pipelined: *rtt == 50,
        })
        .collect();
    opts.policy = PolicyOverrides {
        gamma_bounds: Some((1, 6)),
        ..Default::default()
    };
    let cluster = LocalCluster::start(opts).await?;

    // Two sessions per draft node, all at once.
    let client = reqwest::Client::new();
    let jobs = cluster.drafts.iter().flat_map(|d| {
        (0..2).map(|j| {
            let base = d.openai_base();
            let client = client.clone();
            let prompt_index = (j + d.http.port() as usize) % PROMPTS.len();
            async move {
                let req = ChatRequest {
                    prompt: PROMPTS[prompt_index].to_string(),
                    max_tokens: MAX_TOKENS,
                    ..Default::default()
                };
                let out = stream_chat(&client, &base, &req, |_| {}).await?;
                Ok::<_, anyhow::Error>((prompt_index, out))
            }
        })
    });
    let results = try_join_all(jobs).await?;
    assert_eq!(results.len(), 6);
    for (i, out) in &results {
        assert_eq!(
            &out.text, &references[*i],
            "a session's output differs from target-only greedy for {:?}",
            PROMPTS[*i]
        );
    }
    // Every link really carried traffic.
    for d in &cluster.drafts {
        let stats = d.link.as_ref().expect("linked").stats();
        assert!(stats.bytes_up > 0 && stats.bytes_down > 0);
    }
    cluster.stop().await
}
