//! Confidentiality: a full generation through coordinator, verify node and draft node, with every
//! component logging at TRACE level, leaves no prompt or completion text in the logs.

use std::io::Write;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use edgespec::client::{stream_chat, ChatRequest};
use edgespec::cluster::{ClusterOptions, LocalCluster};
use edgespec_model::synthetic::{write_tiny_gguf, TinySpec};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const SECRET: &str = "quarterly-merger-codename-bluefin";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_of_every_node_hold_no_prompt_or_completion_text() -> Result<()> {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir()?;
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&model, &TinySpec::default())?;
    let cluster = LocalCluster::start(ClusterOptions::new(model.clone(), model)).await?;
    let req = ChatRequest {
        prompt: format!("Summarise the plan for {SECRET} in one line."),
        max_tokens: 16,
        ..Default::default()
    };
    let out = stream_chat(
        &reqwest::Client::new(),
        &cluster.openai_base(),
        &req,
        |_| {},
    )
    .await?;
    cluster.stop().await?;

    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).to_string();
    assert!(
        logs.len() > 1000,
        "expected real TRACE logs, got {} bytes",
        logs.len()
    );
    assert!(
        !logs.contains(SECRET),
        "the prompt text leaked into the logs"
    );
    let completion = out.text.trim();
    if completion.chars().count() >= 8 {
        assert!(
            !logs.contains(completion),
            "the completion text leaked into the logs"
        );
    }
    Ok(())
}
