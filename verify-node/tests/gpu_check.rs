//! The GPU check's code path on the CPU: `deploy/tools/gpu-check` running the
//! `edgespec-gpu-check` binary with `--device cpu --shapes small` (what a GPU machine runs with
//! `--device cuda:0 --shapes real`), its JSON checked field by field; the time budget stopping
//! sections; and the real-shape specs' sizes.

use std::path::{Path, PathBuf};
use std::process::Command;

use edgespec_model::forward::load_gguf;
use edgespec_model::synthetic::{write_shaped_gguf, ShapeSpec};
use edgespec_model::DeviceKind;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_edgespec-gpu-check");

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn read_json(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("gpu-check.json")).expect("gpu-check.json");
    serde_json::from_str(&text).expect("valid JSON")
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn script_runs_the_small_check_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let status = Command::new("bash")
        .arg(repo_root().join("deploy/tools/gpu-check"))
        .args(["--device", "cpu", "--shapes", "small", "--budget-s", "120"])
        .arg("--out")
        .arg(&out)
        .arg("--work-dir")
        .arg(tmp.path())
        .env("GPU_CHECK_BIN", BIN)
        .status()
        .expect("running deploy/tools/gpu-check");
    assert!(status.success(), "gpu-check failed: {status}");
    for file in ["gpu-check.json", "gpu-check.md", "gpu-check.log", "env.txt"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let j = read_json(&out);
    assert_eq!(j["schema"], "edgespec-gpu-check/1");
    assert_eq!(j["device"], "cpu");
    assert_eq!(j["shapes"], "small");
    assert_eq!(j["finished"], true);
    assert_eq!(j["errors"].as_array().unwrap().len(), 0, "{}", j["errors"]);
    assert_eq!(
        j["stopped_early"].as_array().unwrap().len(),
        0,
        "{}",
        j["stopped_early"]
    );

    // Correctness on the tiny models: a second CPU load is bit-identical, greedy decoding
    // agrees, and the CPU forward is batch invariant (the project's guarantee).
    let tiny = j["correctness"].as_array().unwrap();
    assert_eq!(tiny.len(), 3);
    for c in tiny {
        assert_eq!(c["reference"], "second cpu load");
        assert_eq!(f(&c["logits_max_abs_diff"]), 0.0, "{c}");
        assert!(f(&c["logits_max_abs"]) > 0.0);
        assert_eq!(c["positions"], 12);
        assert_eq!(c["greedy_identical"], true, "{c}");
        assert_eq!(c["greedy_tokens"], 24);
        let bi = &c["batch_invariance"];
        assert_eq!(bi["exact"], true, "{c}");
        assert_eq!(bi["argmax_agree"], true);
        assert_eq!(f(&bi["max_abs_diff_block_vs_alone"]), 0.0);
        assert_eq!(f(&bi["max_abs_diff_batch_vs_alone"]), 0.0);
        assert_eq!(bi["positions"], 8);
    }

    let models = j["models"].as_array().unwrap();
    let names: Vec<&str> = models.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["small-a", "small-b"]);
    for m in models {
        assert!(f(&m["file_bytes"]) > 0.0);
        let c = &m["correctness"];
        assert_eq!(c["batch_invariance"]["exact"], true, "{c}");
        assert!(
            c["logits_max_abs_diff"].is_null(),
            "no CPU reference on the CPU"
        );

        // Verify cost: every planned cell (N ∈ {1,2,4} × k ∈ {1,2,5}) measured.
        let v = &m["verify_cost"];
        assert_eq!(v["planned_cells"], 9);
        let cells = v["cells"].as_array().unwrap();
        assert_eq!(cells.len(), 9);
        for cell in cells {
            let (n, k) = (f(&cell["sessions"]), f(&cell["k"]));
            assert_eq!(f(&cell["rows"]), n * k);
            assert!(f(&cell["ms_median"]) > 0.0 && f(&cell["ms_min"]) <= f(&cell["ms_median"]));
        }

        // Capacity: N ∈ {1, 8} × (target-only, γ = 2, γ = 4); on the CPU every stream stays on
        // the target's greedy path.
        let cap = &m["capacity"];
        assert_eq!(f(&cap["goal_n8"]), 2.5);
        let runs = cap["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 6, "{cap}");
        for r in runs {
            let (n, g) = (f(&r["streams"]), f(&r["gamma"]));
            assert!(f(&r["tokens"]) >= n * 8.0, "{r}");
            assert!(f(&r["tokens_per_s"]) > 0.0);
            assert_eq!(f(&r["off_path_streams"]), 0.0, "{r}");
            assert!(r["ratio_vs_target_only"].is_number());
            if g == 0.0 {
                assert!(r["acceptance"].is_null());
                assert_eq!(f(&r["ratio_vs_target_only"]), 1.0);
                assert_eq!(f(&r["rows_per_forward"]), n);
            } else {
                let a = f(&r["acceptance"]);
                assert!(a > 0.0 && a < 1.0, "corrupt 0.2 gives some rejections: {r}");
                assert!(f(&r["forwards"]) < 8.0, "SD needs fewer forwards: {r}");
            }
        }
        assert!(cap["best_ratio_n8"].is_number());
    }
    let md = std::fs::read_to_string(out.join("gpu-check.md")).unwrap();
    assert!(md.contains("## Correctness"));
    assert!(md.contains("### Capacity"));
    assert!(md.contains("### Verify cost"));
}

#[test]
fn an_exhausted_budget_stops_every_section_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let status = Command::new(BIN)
        .args(["--device", "cpu", "--shapes", "small", "--budget-s", "0"])
        .arg("--out")
        .arg(&out)
        .arg("--work-dir")
        .arg(tmp.path())
        .status()
        .unwrap();
    assert!(status.success());
    let j = read_json(&out);
    assert_eq!(j["finished"], true);
    let stopped: Vec<&str> = j["stopped_early"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(stopped.len() >= 5, "{stopped:?}");
    assert!(stopped.iter().all(|s| s.contains("budget")), "{stopped:?}");
    assert!(stopped.iter().any(|s| s.starts_with("correctness:")));
    assert!(stopped.iter().any(|s| s.starts_with("small-b")));
    assert_eq!(j["correctness"].as_array().unwrap().len(), 0);
    assert_eq!(j["models"].as_array().unwrap().len(), 0);
}

#[test]
fn a_cuda_device_without_cuda_is_an_error_in_the_report() {
    if cfg!(feature = "cuda") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let status = Command::new(BIN)
        .args([
            "--device",
            "cuda:0",
            "--shapes",
            "small",
            "--budget-s",
            "30",
        ])
        .args(["--models", "small-a", "--sections", "correctness"])
        .arg("--out")
        .arg(&out)
        .arg("--work-dir")
        .arg(tmp.path())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(1));
    let j = read_json(&out);
    let errors = j["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 3, "one per tiny model: {errors:?}");
    assert!(errors[0].as_str().unwrap().contains("cuda:0"), "{errors:?}");
}

#[test]
fn shaped_models_have_the_real_sizes_and_load() {
    // Tensor data of the real Q4_K_M files: the 1.5B's file is 1.117 GB (1.111 GB of tensors,
    // the same 169 Q4_K + 29 Q6_K matrices), Qwen2.5-7B-Instruct's about 4.68 GB.
    let b15 = ShapeSpec::qwen2_1_5b_q4km().weight_bytes() as f64;
    assert!((1.10e9..1.12e9).contains(&b15), "{b15}");
    let b7 = ShapeSpec::qwen2_7b_q4km().weight_bytes() as f64;
    assert!((4.6e9..4.75e9).contains(&b7), "{b7}");

    let tmp = tempfile::tempdir().unwrap();
    let spec = ShapeSpec::small("t", 2, 256, 4, 512);
    let path = tmp.path().join("t.gguf");
    let bytes = write_shaped_gguf(&path, &spec).unwrap();
    assert_eq!(bytes, std::fs::metadata(&path).unwrap().len());
    assert!(bytes >= spec.weight_bytes());
    let again = tmp.path().join("again.gguf");
    write_shaped_gguf(&again, &spec).unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(&again).unwrap()
    );
    let m = load_gguf(&path, DeviceKind::Cpu).unwrap();
    assert_eq!(m.info().vocab_size, 2048);
    assert_eq!(m.info().arch, "qwen2");
}
