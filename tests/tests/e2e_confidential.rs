//! Confidentiality: a full generation through coordinator, verify node and draft node, with every
//! component logging at TRACE level on every thread (tokio workers, the model threads, the test
//! itself), leaves no prompt text, completion text, prompt token ids or completion token ids in
//! the logs or in panic messages; and the model's error for an out-of-vocabulary token does not
//! echo the id.
//!
//! This file is its own test binary, so it installs one global subscriber (and a panic hook)
//! that every thread of the process reports to.

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use anyhow::{ensure, Result};
use edgespec::client::{stream_chat, ChatOutcome, ChatRequest};
use edgespec::cluster::{ClusterOptions, LocalCluster};
use edgespec_model::forward::load_gguf;
use edgespec_model::synthetic::{write_tiny_gguf, TinySpec};
use edgespec_model::{ChatMessage, DeviceKind, SeqRequest, TextTokenizer};
use edgespec_testkit::tiny::write_tiny_pair;
use tracing_subscriber::fmt::format::FmtSpan;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn bytes(&self) -> MutexGuard<'_, Vec<u8>> {
        // A panic elsewhere never leaves the buffer half-written; keep reading after one.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bytes().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The process-wide capture: a global TRACE subscriber (span creation and close included, with
/// thread names; `log` records are bridged into it) and a panic hook that records every panic
/// message of every thread before the default hook prints it.
fn capture() -> &'static Captured {
    static CAPTURED: OnceLock<Captured> = OnceLock::new();
    CAPTURED.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_thread_names(true)
            .with_span_events(FmtSpan::NEW | FmtSpan::CLOSE)
            .with_writer(move || writer.clone())
            .try_init()
            .expect("no other global subscriber in this test binary");
        let sink = captured.clone();
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = writeln!(sink.clone(), "PANIC {info}");
            default_hook(info);
        }));
        captured
    })
}

const SECRET: &str = "quarterly-merger-codename-bluefin";
const CANARY: char = '\u{A66E}'; // ꙮ

/// Length of the id runs looked for: a leak of any `RUN` consecutive ids of a sequence, printed
/// with any separators, is found; shorter coincidences with counters in the logs are not.
const RUN: usize = 4;

/// Every line holding `RUN` consecutive ids of `ids` as consecutive numbers (in any format:
/// `[1, 2, 3, 4]`, `1 2 3 4`, `tokens=1,2,3,4`).
fn lines_with_id_run<'a>(logs: &'a str, ids: &[u32]) -> Vec<&'a str> {
    let runs: Vec<&[u32]> = ids.windows(RUN).collect();
    logs.lines()
        .filter(|line| {
            let numbers: Vec<u64> = line
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .filter_map(|s| s.parse().ok())
                .collect();
            numbers.windows(RUN).any(|w| {
                runs.iter()
                    .any(|r| r.iter().zip(w).all(|(&a, &b)| u64::from(a) == b))
            })
        })
        .collect()
}

/// The logs have a line in span `name` of `target` (its creation, its close, or an event in it).
fn has_span(logs: &str, target: &str, name: &str) -> bool {
    logs.lines().any(|l| {
        l.contains(target) && (l.contains(&format!("{name}{{")) || l.contains(&format!("{name}:")))
    })
}

/// The name of the thread the test tokenizes its own copy of the prompt on (to know the ids to
/// look for): the tokenizer library's own TRACE output there is the test's, not a node's.
const REFERENCE_THREAD: &str = "reference-tokenizer";

/// At most three offending lines, shortened, for a failure message.
fn sample(lines: &[&str]) -> Vec<String> {
    lines
        .iter()
        .take(3)
        .map(|l| l.chars().take(300).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_of_every_node_and_thread_hold_no_prompt_or_completion() -> Result<()> {
    let captured = capture();
    let dir = tempfile::tempdir()?;
    let target = dir.path().join("target.gguf");
    let draft = dir.path().join("draft.gguf");
    // A draft close to the target but not equal to it, so rejections and corrections run too.
    write_tiny_pair(&target, &draft, TinySpec::default().seed)?;
    // The canary is a character no log line has any reason to hold: printing the prompt in any
    // granularity (whole, word by word, character by character) shows it.
    let prompt = format!("Summarise the plan for {SECRET} {CANARY} in one line.");
    let prompt_ids = {
        let (model, prompt) = (target.clone(), prompt.clone());
        std::thread::Builder::new()
            .name(REFERENCE_THREAD.into())
            .spawn(move || {
                TextTokenizer::from_gguf(&model)?
                    .encode_chat(&[ChatMessage::new("user", &prompt)], true)
            })?
            .join()
            .expect("the reference tokenizer panicked")?
    };

    let cluster = LocalCluster::start(ClusterOptions::new(target, draft)).await?;
    let client = reqwest::Client::new();
    let mut outs: Vec<ChatOutcome> = Vec::new();
    // Greedy, then sampled (the sparse q travels and is checked too).
    for (temperature, seed) in [(0.0, None), (0.8, Some(5))] {
        let req = ChatRequest {
            prompt: prompt.clone(),
            max_tokens: 16,
            temperature,
            seed,
            top_k: None,
            ..Default::default()
        };
        outs.push(stream_chat(&client, &cluster.openai_base(), &req, |_| {}).await?);
    }
    cluster.stop().await?;

    let all = captured.text();
    assert!(
        all.len() > 1000,
        "expected real TRACE logs, got {} bytes",
        all.len()
    );
    let reference_thread = format!(" {REFERENCE_THREAD} ");
    let logs: String = all
        .lines()
        .filter(|l| !l.contains(&reference_thread))
        .flat_map(|l| [l, "\n"])
        .collect();
    // Every node's serving path reported here, from whatever thread it ran on.
    for (target, span) in [
        ("edgespec_coordinator::grpc", "drafts"),
        ("edgespec_verify_node::service", "verify"),
        ("edgespec_verify_node::batcher", "verify_batch"),
        ("edgespec_draft_node::session", "session"),
    ] {
        assert!(
            has_span(&logs, target, span),
            "no `{span}` span of {target} in the captured logs"
        );
    }
    for thread in ["model-target", "model-draft"] {
        assert!(
            logs.lines()
                .any(|l| l.contains(thread) && l.contains("model_forward")),
            "no `model_forward` span from the {thread} thread in the captured logs"
        );
    }

    // The prompt: whole, any 6 characters of the secret, or any single character of it shown
    // through the canary.
    let pieces: Vec<String> = SECRET
        .chars()
        .collect::<Vec<_>>()
        .windows(6)
        .map(|w| w.iter().collect())
        .collect();
    let leaked: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(CANARY) || pieces.iter().any(|p| l.contains(p.as_str())))
        .collect();
    assert!(
        leaked.is_empty(),
        "the prompt text leaked into {} log lines, e.g. {:?}",
        leaked.len(),
        sample(&leaked)
    );
    let leaked = lines_with_id_run(&logs, &prompt_ids);
    assert!(
        leaked.is_empty(),
        "the prompt's token ids leaked into {} log lines, e.g. {:?}",
        leaked.len(),
        sample(&leaked)
    );
    for out in &outs {
        ensure!(
            out.token_ids.len() >= RUN,
            "a completion of {} tokens is too short to check",
            out.token_ids.len()
        );
        let leaked = lines_with_id_run(&logs, &out.token_ids);
        assert!(
            leaked.is_empty(),
            "the completion's token ids leaked into {} log lines, e.g. {:?}",
            leaked.len(),
            sample(&leaked)
        );
        let completion = out.text.trim();
        if completion.chars().count() >= 8 {
            assert!(
                !logs.contains(completion),
                "the completion text leaked into the logs"
            );
        }
    }
    Ok(())
}

/// The model's error for a token outside the vocabulary says so without the id (a corrupted or
/// hostile id is still a token id of someone's request), in its message and its Debug form, from
/// the tokenizer and from the forward.
#[test]
fn out_of_vocabulary_errors_do_not_echo_the_token_id() -> Result<()> {
    let captured = capture();
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("tiny.gguf");
    let spec = TinySpec::default();
    write_tiny_gguf(&model, &spec)?;
    // Ten digits: no timestamp or counter in the logs matches it by chance.
    let bad = 3_987_654_321_u32;
    assert!(bad as usize > spec.vocab_size());
    let needle = bad.to_string();

    let tok = TextTokenizer::from_gguf(&model)?;
    let from_decode = tok
        .decode(&[5, bad])
        .expect_err("an out-of-vocabulary id decodes");
    let mut lm = load_gguf(&model, DeviceKind::Cpu)?;
    let from_forward = lm
        .forward_batch(&[SeqRequest {
            session: 1,
            start: 0,
            tokens: vec![5, bad, 7],
            logits_for_last: 1,
        }])
        .expect_err("an out-of-vocabulary id ran through the forward");
    for e in [from_decode, from_forward] {
        let (shown, debug) = (e.to_string(), format!("{e:?}"));
        tracing::error!(error = %e, ?e, "model error");
        assert!(
            shown.contains("outside the vocabulary"),
            "unexpected error: {shown}"
        );
        assert!(
            !shown.contains(&needle) && !debug.contains(&needle),
            "the error echoes the token id: {shown} / {debug}"
        );
    }
    assert!(
        !captured.text().contains(&needle),
        "the token id was logged"
    );
    Ok(())
}
