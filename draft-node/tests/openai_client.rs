//! The official `openai` Python client against a running draft node: models, completions, chat,
//! streaming with usage, and the error mapping. The client is installed on first use into
//! `$HOME/.cache/edgespec/python-openai` (with pip, from the package registry) unless the
//! interpreter already has it.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::Harness;

const PROMPT: &str = "def fib(n): the answer is";
const USER: &str = "write the fib function";

fn python() -> String {
    std::env::var("EDGESPEC_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn has_openai(pythonpath: Option<&Path>) -> bool {
    let mut cmd = Command::new(python());
    cmd.args(["-c", "import openai"]);
    if let Some(p) = pythonpath {
        cmd.env("PYTHONPATH", p);
    }
    cmd.output().is_ok_and(|o| o.status.success())
}

/// A PYTHONPATH under which `import openai` works (`None`: the interpreter has it already).
fn openai_path() -> Option<PathBuf> {
    if has_openai(None) {
        return None;
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    let dir = PathBuf::from(home).join(".cache/edgespec/python-openai");
    if has_openai(Some(&dir)) {
        return Some(dir);
    }
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let out = Command::new(python())
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&tmp)
        .arg("openai")
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "installing the openai client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).expect("moving the installed client into place");
    assert!(has_openai(Some(&dir)), "openai still not importable");
    Some(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_client_works_against_the_node() {
    let pythonpath = tokio::task::spawn_blocking(openai_path).await.unwrap();
    let h = Harness::start(|_, _| {}).await;
    let (completion, n, finish) = h.expected(PROMPT, 24);
    let (chat, chat_n, chat_finish) = h.expected_ids(&h.chat_prompt(USER), 24);

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_client.py");
    let base = format!("http://{}/v1", h.node.addr);
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(python());
        cmd.arg(script).args([&base, "tiny", PROMPT, USER, "24"]);
        if let Some(p) = pythonpath {
            cmd.env("PYTHONPATH", p);
        }
        cmd.output().expect("python3 runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "the client script failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("the script prints JSON");
    assert_eq!(v["models"], serde_json::json!(["tiny"]));
    assert_eq!(v["completion"], completion);
    assert_eq!(v["completion_finish"], finish);
    assert_eq!(v["completion_usage"], n);
    assert_eq!(v["completion_stream"], completion);
    assert_eq!(v["chat"], chat);
    assert_eq!(v["chat_role"], "assistant");
    assert_eq!(v["chat_stream"], chat);
    assert_eq!(v["chat_stream_finish"], chat_finish);
    assert_eq!(v["chat_stream_usage"], chat_n);
    assert_eq!(v["unknown_model_error"], 404);
}
