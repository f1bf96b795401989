//! The whole system (draft node → coordinator → verify node over real gRPC, real Qwen pair)
//! produces exactly the target model's greedy output, token id for token id, while really
//! speculating (drafts accepted and rejected) — with every drafting method: the draft model,
//! prompt lookup (a node without any draft model) and hybrid.

use std::collections::HashMap;

use anyhow::Context;
use edgespec::client::{stream_chat, ChatOutcome, ChatRequest};
use edgespec::cluster::{
    ClusterOptions, DraftSpec, LocalCluster, PolicyOverrides, LOCAL_ADMIN_TOKEN,
};
use edgespec_specdec::DraftMethod;
use edgespec_testkit::reference::references;
use edgespec_tests::{qwen_pair, PROMPTS};

const MAX_TOKENS: u32 = 40;

/// Input-grounded prompts: the answer repeats part of the prompt (an edit of a quoted function,
/// a transform of a given JSON document), so prompt lookup really proposes.
const GROUNDED: [&str; 2] = [
    "Rename the variable `tmp` to `total` in this Python function. Answer with the whole \
     updated function only.\n\n```python\ndef order_value(items, discount):\n    tmp = 0\n    \
     for item in items:\n        tmp += item.price * item.quantity\n    if discount:\n        \
     tmp = tmp * (1 - discount)\n    return round(tmp, 2)\n```",
    "In this JSON document rename the key \"qty\" to \"quantity\" in every item and leave \
     everything else unchanged. Answer with the whole JSON document only.\n\n{\"order_id\": \
     4471, \"items\": [{\"sku\": \"A-100\", \"qty\": 2, \"price\": 9.5}, {\"sku\": \"B-220\", \
     \"qty\": 1, \"price\": 24.0}], \"paid\": false}",
];

async fn complete(cluster: &LocalCluster, prompt: &str) -> anyhow::Result<ChatOutcome> {
    complete_with(cluster, prompt, None).await
}

/// A greedy request, drafted with `method` (None: the draft node's `drafting.method`).
async fn complete_with(
    cluster: &LocalCluster,
    prompt: &str,
    method: Option<DraftMethod>,
) -> anyhow::Result<ChatOutcome> {
    let req = ChatRequest {
        prompt: prompt.to_string(),
        max_tokens: MAX_TOKENS,
        temperature: 0.0,
        seed: None,
        top_k: None,
        draft_method: method,
        ..Default::default()
    };
    stream_chat(
        &reqwest::Client::new(),
        &cluster.openai_base(),
        &req,
        |_| {},
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculative_greedy_equals_target_only_greedy_on_the_real_pair() -> anyhow::Result<()> {
    edgespec_tests::init_logs();
    let (target, draft) = qwen_pair()?;
    let references = references(&target, &PROMPTS, MAX_TOKENS as usize).await?;

    // Fixed γ = 4 so speculation really happens (the adaptive controller may pick γ = 0 on
    // one shared CPU), then the adaptive policy with pipelining.
    for (policy, pipelined) in [
        (
            PolicyOverrides {
                gamma_bounds: Some((4, 4)),
                ..Default::default()
            },
            false,
        ),
        (
            PolicyOverrides {
                pipelined: true,
                gamma_bounds: Some((1, 6)),
                ..Default::default()
            },
            true,
        ),
    ] {
        let mut opts = ClusterOptions::new(target.clone(), draft.clone());
        opts.policy = policy;
        opts.drafts[0].pipelined = pipelined;
        let cluster = LocalCluster::start(opts).await?;
        let (mut drafted, mut accepted) = (0.0, 0.0);
        for (prompt, reference) in PROMPTS.iter().zip(&references) {
            let got = complete(&cluster, prompt).await?;
            assert_eq!(
                &got.token_ids, reference,
                "speculative token ids differ from target-only greedy (pipelined={pipelined}) for {prompt:?}"
            );
            drafted += got.stat("drafted").context("no drafted statistic")?;
            accepted += got.stat("accepted").context("no accepted statistic")?;
        }
        cluster.stop().await?;
        // At a fixed γ every round speculates, and the 0.5B draft disagrees with the 1.5B
        // target now and then: both sides of the acceptance rule ran.
        if !pipelined {
            assert!(
                accepted > 0.0 && accepted < drafted,
                "fixed γ = 4 did not both accept and reject drafts: drafted {drafted}, accepted {accepted}"
            );
        }
    }
    Ok(())
}

/// The coordinator's drafted tokens by method (`edgespec_coordinator_method_drafted_tokens_total`).
async fn drafted_by_method(cluster: &LocalCluster) -> anyhow::Result<HashMap<String, f64>> {
    let text = cluster
        .admin_client()
        .get(cluster.admin_url("/metrics"))
        .bearer_auth(LOCAL_ADMIN_TOKEN)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let mut out = HashMap::new();
    for line in text.lines() {
        let Some(rest) =
            line.strip_prefix("edgespec_coordinator_method_drafted_tokens_total{method=\"")
        else {
            continue;
        };
        if let Some((method, value)) = rest.split_once("\"} ") {
            out.insert(method.to_string(), value.trim().parse()?);
        }
    }
    Ok(out)
}

/// Checks that since `before` the coordinator saw drafts of `method` and of no other method:
/// the request field (or the node's default) really chose how the blocks were drafted.
async fn drafted_only_by(
    cluster: &LocalCluster,
    before: &HashMap<String, f64>,
    method: DraftMethod,
    what: &str,
) -> anyhow::Result<()> {
    let after = drafted_by_method(cluster).await?;
    for m in DraftMethod::ALL {
        let label = m.label();
        let delta =
            after.get(label).copied().unwrap_or(0.0) - before.get(label).copied().unwrap_or(0.0);
        if m == method {
            assert!(
                delta > 0.0,
                "{what}: the coordinator saw no {label} drafts ({after:?})"
            );
        } else {
            assert_eq!(
                delta, 0.0,
                "{what}: the coordinator saw {label} drafts ({after:?})"
            );
        }
    }
    Ok(())
}

/// Drafted and accepted tokens over a method's requests.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    drafted: f64,
    accepted: f64,
}

impl Tally {
    fn add(&mut self, out: &ChatOutcome) -> anyhow::Result<()> {
        self.drafted += out.stat("drafted").context("no drafted statistic")?;
        self.accepted += out.stat("accepted").context("no accepted statistic")?;
        Ok(())
    }
}

/// Sends every grounded prompt with `method` and checks each answer's token ids against the
/// target-only reference.
async fn grounded_ids_match(
    cluster: &LocalCluster,
    method: Option<DraftMethod>,
    references: &[Vec<u32>],
    what: &str,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    for (prompt, reference) in GROUNDED.iter().zip(references) {
        let got = complete_with(cluster, prompt, method).await?;
        assert_eq!(
            &got.token_ids, reference,
            "{what}: token ids differ from target-only greedy for {prompt:?}"
        );
        tally.add(&got)?;
    }
    Ok(tally)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_drafting_method_equals_target_only_greedy_on_grounded_prompts() -> anyhow::Result<()>
{
    edgespec_tests::init_logs();
    let (target, draft) = qwen_pair()?;
    let references = references(&target, &GROUNDED, MAX_TOKENS as usize).await?;
    // Fixed γ = 4: every round with a proposal speculates (the adaptive controller could
    // switch a method off on one shared CPU, and then nothing would be verified).
    let fixed = PolicyOverrides {
        gamma_bounds: Some((4, 4)),
        ..Default::default()
    };

    // A node with the draft model, hybrid by default; model and lookup asked per request.
    let mut opts = ClusterOptions::new(target.clone(), draft.clone());
    opts.policy = fixed;
    opts.drafts = vec![DraftSpec::with_method(DraftMethod::Hybrid)];
    let cluster = LocalCluster::start(opts).await?;
    let mut tallies = Vec::new();
    for (method, what) in [
        (Some(DraftMethod::Lookup), "lookup (per request)"),
        (None, "hybrid (the node's default)"),
        (Some(DraftMethod::Model), "model (per request)"),
    ] {
        let before = drafted_by_method(&cluster).await?;
        let t = grounded_ids_match(&cluster, method, &references, what).await?;
        let used = method.unwrap_or(DraftMethod::Hybrid);
        drafted_only_by(&cluster, &before, used, what).await?;
        tallies.push((what, t));
    }
    cluster.stop().await?;

    // A lookup-only node: no draft model loaded, the tokenizer from the target's GGUF.
    let mut opts = ClusterOptions::new(target.clone(), std::path::PathBuf::new());
    opts.policy = fixed;
    opts.drafts = vec![DraftSpec::with_method(DraftMethod::Lookup)];
    let cluster = LocalCluster::start(opts).await?;
    let what = "lookup node without a draft model";
    let t = grounded_ids_match(&cluster, None, &references, what).await?;
    drafted_only_by(&cluster, &HashMap::new(), DraftMethod::Lookup, what).await?;
    tallies.push((what, t));
    cluster.stop().await?;

    // Each method really proposed on these prompts, had drafts accepted (a lookup that never
    // matched, or only proposed wrong tokens, would pass the id check vacuously) and rejected
    // (the rename makes lookup propose `tmp` where the target writes `total`).
    for (what, t) in tallies {
        eprintln!("{what}: drafted {}, accepted {}", t.drafted, t.accepted);
        assert!(
            t.drafted > 0.0 && t.accepted > 0.0 && t.accepted < t.drafted,
            "{what}: speculation did not both accept and reject drafts: drafted {}, accepted {}",
            t.drafted,
            t.accepted
        );
    }
    Ok(())
}
