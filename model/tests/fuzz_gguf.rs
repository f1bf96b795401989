//! Fuzzing the model crate's decoders of untrusted input: the incremental detokeniser
//! (`StreamDecoder`) on arbitrary id sequences, and GGUF files (candle's reader, the tokenizer
//! built from GGUF metadata, the model loader's metadata and tensor reads) mutated from a valid
//! tiny model written by `synthetic::write_tiny_gguf`.
//!
//! Targets:
//! - `stream_decoder`: id sequences biased to partial UTF-8 byte tokens, with ids outside the
//!   vocabulary (up to `u32::MAX`), on the tiny tokenizer and, when cached, a real one (Qwen2.5
//!   0.5B). Properties: no panic; the pieces and `finish()` concatenate to `decode` of the
//!   in-vocabulary ids (= `from_utf8_lossy` of their bytes); at most 3 bytes are ever held back;
//!   `decode` refuses any out-of-vocabulary id.
//! - `gguf_tokenizer` and `gguf_model`: the tiny model's GGUF is re-serialised by a GGUF writer
//!   written here from the format description, after structured mutations (metadata values of
//!   every type and size at the keys the readers use, token / merge / token-type lists edited,
//!   tensor shapes, types, offsets and names changed, data cut), then with lying length fields
//!   (string, array, tensor and key counts set to values up to 2^64 − 1) and byte mutations.
//!   `gguf_tokenizer` parses the bytes in memory and builds the tokenizer (then encodes, decodes
//!   and streams with it); `gguf_model` loads the file with `forward::load_gguf` (then runs one
//!   forward). Properties: no panic, no single allocation above 64 MiB (the file is ~20 KiB), an
//!   error value for what is refused.
//!
//! `EDGESPEC_FUZZ_CASES=1000000 cargo test -p edgespec-model --test fuzz_gguf -- --nocapture`
//! runs a campaign (see docs/BENCHMARKS.md, "Fuzzing").

#[path = "../../proto/tests/fuzz_support/mod.rs"]
mod fuzz_support;

use std::io::Cursor;
use std::path::PathBuf;

use candle_core::quantized::gguf_file::{Content, Value};
use edgespec_model::fetch::{cached_model_path, default_cache_dir, KnownModel};
use edgespec_model::forward::{load_gguf, read_gguf_content};
use edgespec_model::synthetic::{ggml_type_code, gguf_value_type, TinySpec};
use edgespec_model::{ChatMessage, DeviceKind, ModelError, SeqRequest, TextTokenizer};
use edgespec_testkit::tiny::TinyModel;
use fuzz_support::{byte_mutation, mutate_bytes, ByteMutation, Counters};
use proptest::prelude::*;
use proptest::sample::Index;

// ---------------------------------------------------------------------------------------------
// The tiny model, and a GGUF writer

/// A small spec: one layer, hidden 32, so a case reads ~20 KiB.
fn spec() -> TinySpec {
    TinySpec {
        n_layer: 1,
        hidden: 32,
        n_head: 2,
        n_kv_head: 1,
        ffn: 32,
        context_length: 64,
        ..TinySpec::default()
    }
}

fn tiny_bytes() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| {
        let m = TinyModel::new(spec());
        std::fs::read(&m.path).unwrap()
    })
}

#[derive(Debug, Clone)]
struct Tensor {
    name: String,
    dims: Vec<u64>,
    dtype: u32,
    offset: u64,
}

/// A GGUF file as fields (metadata in key order, tensors in offset order, the data blob).
#[derive(Debug, Clone)]
struct Gguf {
    version: u32,
    kv: Vec<(String, Value)>,
    tensors: Vec<Tensor>,
    data: Vec<u8>,
}

fn pristine() -> &'static Gguf {
    static G: std::sync::OnceLock<Gguf> = std::sync::OnceLock::new();
    G.get_or_init(|| {
        let bytes = tiny_bytes();
        let c = Content::read(&mut Cursor::new(bytes)).unwrap();
        let mut kv: Vec<(String, Value)> = c.metadata.into_iter().collect();
        kv.sort_by(|a, b| a.0.cmp(&b.0));
        let mut tensors: Vec<Tensor> = c
            .tensor_infos
            .into_iter()
            .map(|(name, t)| Tensor {
                name,
                dims: t.shape.dims().iter().rev().map(|&d| d as u64).collect(),
                dtype: ggml_type_code(t.ggml_dtype),
                offset: t.offset,
            })
            .collect();
        tensors.sort_by_key(|t| t.offset);
        Gguf {
            version: 3,
            kv,
            tensors,
            data: bytes[c.tensor_data_offset as usize..].to_vec(),
        }
    })
}

struct Writer {
    out: Vec<u8>,
    /// Positions of every u64 length or count field.
    lengths: Vec<usize>,
}

impl Writer {
    fn u32(&mut self, x: u32) {
        self.out.extend(x.to_le_bytes());
    }
    fn u64(&mut self, x: u64) {
        self.out.extend(x.to_le_bytes());
    }
    fn len(&mut self, x: usize) {
        self.lengths.push(self.out.len());
        self.u64(x as u64);
    }
    fn string(&mut self, s: &str) {
        self.len(s.len());
        self.out.extend(s.as_bytes());
    }
    fn value(&mut self, v: &Value) {
        match v {
            Value::U8(x) => self.out.push(*x),
            Value::I8(x) => self.out.extend(x.to_le_bytes()),
            Value::U16(x) => self.out.extend(x.to_le_bytes()),
            Value::I16(x) => self.out.extend(x.to_le_bytes()),
            Value::U32(x) => self.u32(*x),
            Value::I32(x) => self.out.extend(x.to_le_bytes()),
            Value::U64(x) => self.u64(*x),
            Value::I64(x) => self.out.extend(x.to_le_bytes()),
            Value::F32(x) => self.out.extend(x.to_le_bytes()),
            Value::F64(x) => self.out.extend(x.to_le_bytes()),
            Value::Bool(b) => self.out.push(u8::from(*b)),
            Value::String(s) => self.string(s),
            Value::Array(items) => {
                // Element type of the first item (an empty array says u32); a mixed array
                // writes each item as itself, which readers see as corruption.
                self.u32(items.first().map_or(4, gguf_value_type));
                self.len(items.len());
                for i in items {
                    self.value(i);
                }
            }
        }
    }
}

/// The alignment a reader derives from the metadata (candle's rule).
fn alignment(kv: &[(String, Value)]) -> u64 {
    let a = kv
        .iter()
        .find(|(k, _)| k == "general.alignment")
        .and_then(|(_, v)| match v {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::I8(x) if *x >= 0 => Some(*x as u64),
            Value::I16(x) if *x >= 0 => Some(*x as u64),
            Value::I32(x) if *x >= 0 => Some(*x as u64),
            _ => None,
        })
        .unwrap_or(32);
    if a == 0 || a > 1 << 16 {
        32
    } else {
        a
    }
}

impl Gguf {
    fn serialize(&self) -> (Vec<u8>, Vec<usize>) {
        let mut w = Writer {
            out: Vec::with_capacity(self.data.len() + 8192),
            lengths: Vec::new(),
        };
        w.u32(0x4655_4747);
        w.u32(self.version);
        w.len(self.tensors.len());
        w.len(self.kv.len());
        for (k, v) in &self.kv {
            w.string(k);
            w.u32(gguf_value_type(v));
            w.value(v);
        }
        for t in &self.tensors {
            w.string(&t.name);
            w.u32(t.dims.len() as u32);
            for &d in &t.dims {
                w.lengths.push(w.out.len());
                w.u64(d);
            }
            w.u32(t.dtype);
            w.lengths.push(w.out.len());
            w.u64(t.offset);
        }
        let a = alignment(&self.kv) as usize;
        let pad = w.out.len().div_ceil(a) * a - w.out.len();
        w.out.extend(std::iter::repeat_n(0u8, pad));
        w.out.extend(&self.data);
        (w.out, w.lengths)
    }
}

// ---------------------------------------------------------------------------------------------
// Mutations

const KEYS: &[&str] = &[
    "general.architecture",
    "general.alignment",
    "general.name",
    "qwen2.block_count",
    "qwen2.context_length",
    "qwen2.embedding_length",
    "qwen2.feed_forward_length",
    "qwen2.attention.head_count",
    "qwen2.attention.head_count_kv",
    "qwen2.attention.key_length",
    "qwen2.rope.freq_base",
    "qwen2.attention.layer_norm_rms_epsilon",
    "llama.block_count",
    "llama.embedding_length",
    "llama.attention.head_count",
    "llama.context_length",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.chat_template",
];

const NUMBERS: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    8,
    16,
    31,
    32,
    33,
    64,
    255,
    256,
    296,
    297,
    298,
    512,
    65_535,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    1 << 53,
    1 << 60,
    1 << 63,
    u64::MAX,
];

const STRINGS: &[&str] = &[
    "",
    "qwen2",
    "llama",
    "gpt2",
    "llama-bpe",
    "llama3",
    "smollm",
    "deepseek-r1-qwen",
    "default",
    "bert",
    "<|im_end|>",
    "<|im_start|>",
    "a b",
    "Ġ",
    "Ġ Ġ",
    "\u{0}",
    "é",
    "[",
    "(?",
    "{% for m in messages %}",
];

fn number_value() -> BoxedStrategy<Value> {
    (prop::sample::select(NUMBERS), 0u8..8)
        .prop_map(|(n, t)| match t {
            0 => Value::U8(n as u8),
            1 => Value::I8(n as i8),
            2 => Value::U16(n as u16),
            3 => Value::I16(n as i16),
            4 => Value::U32(n as u32),
            5 => Value::I32(n as i32),
            6 => Value::U64(n),
            _ => Value::I64(n as i64),
        })
        .boxed()
}

fn scalar_value() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => number_value(),
        2 => prop::sample::select(&[0.0f64, -0.0, 1.0, -1.0, 1e-6, 1e6, 1e38, 1e300, f64::NAN, f64::INFINITY][..])
            .prop_flat_map(|x| prop_oneof![Just(Value::F32(x as f32)), Just(Value::F64(x))]),
        1 => any::<bool>().prop_map(Value::Bool),
        3 => prop::sample::select(STRINGS).prop_map(|s| Value::String(s.to_string())),
        1 => (1usize..2000).prop_map(|n| Value::String("x".repeat(n))),
    ]
    .boxed()
}

fn any_value() -> BoxedStrategy<Value> {
    scalar_value()
        .prop_recursive(2, 16, 4, |inner| {
            prop::collection::vec(inner, 0..4).prop_map(Value::Array)
        })
        .boxed()
}

#[derive(Debug, Clone)]
enum GgufMutation {
    SetKey(Index, Value),
    SetExistingKey(Index, Value),
    RemoveKey(Index),
    DuplicateKey(Index),
    /// Edit one item of the tokens (0), merges (1) or token types (2) list.
    SetItem(u8, Index, Value),
    Truncate(u8, Index),
    Push(u8, Value),
    SwapItems(u8, Index, Index),
    TensorDim(Index, Index, u64),
    TensorDims(Index, u8),
    TensorType(Index, u32),
    TensorOffset(Index, u64),
    TensorName(Index, Index),
    RemoveTensor(Index),
    CutData(Index),
    Version(u32),
}

fn item_value(list: u8) -> BoxedStrategy<Value> {
    match list % 3 {
        0 => prop_oneof![
            4 => prop::sample::select(STRINGS).prop_map(|s| Value::String(s.to_string())),
            2 => "\\PC{1,4}".prop_map(Value::String),
            1 => number_value(),
        ]
        .boxed(),
        1 => prop_oneof![
            4 => prop::sample::select(&["a", "a b c", " ", "", "Ġ Ġ", "zz yy", "Ġt he", "h e", "Ġ t", "é é", "<|im_end|> x"][..])
                .prop_map(|s| Value::String(s.to_string())),
            1 => number_value(),
        ]
        .boxed(),
        _ => prop_oneof![
            4 => prop::sample::select(&[-1i32, 0, 1, 2, 3, 4, 5, 6, 100, i32::MIN, i32::MAX][..]).prop_map(Value::I32),
            1 => scalar_value(),
        ]
        .boxed(),
    }
}

fn gguf_mutation() -> BoxedStrategy<GgufMutation> {
    use GgufMutation as M;
    prop_oneof![
        6 => (any::<Index>(), any_value()).prop_map(|(i, v)| M::SetKey(i, v)),
        2 => (any::<Index>(), any_value()).prop_map(|(i, v)| M::SetExistingKey(i, v)),
        2 => any::<Index>().prop_map(M::RemoveKey),
        1 => any::<Index>().prop_map(M::DuplicateKey),
        6 => (0u8..3).prop_flat_map(|l| (Just(l), any::<Index>(), item_value(l)))
            .prop_map(|(l, i, v)| M::SetItem(l, i, v)),
        2 => (0u8..3, any::<Index>()).prop_map(|(l, i)| M::Truncate(l, i)),
        2 => (0u8..3).prop_flat_map(|l| (Just(l), item_value(l))).prop_map(|(l, v)| M::Push(l, v)),
        1 => (0u8..3, any::<Index>(), any::<Index>()).prop_map(|(l, a, b)| M::SwapItems(l, a, b)),
        3 => (any::<Index>(), any::<Index>(), prop::sample::select(NUMBERS))
            .prop_map(|(t, d, v)| M::TensorDim(t, d, v)),
        1 => (any::<Index>(), 0u8..6).prop_map(|(t, n)| M::TensorDims(t, n)),
        2 => (any::<Index>(), prop_oneof![0u32..16, Just(30), Just(31), Just(u32::MAX)])
            .prop_map(|(t, d)| M::TensorType(t, d)),
        2 => (any::<Index>(), prop_oneof![prop::sample::select(NUMBERS), 0u64..40_000])
            .prop_map(|(t, o)| M::TensorOffset(t, o)),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| M::TensorName(a, b)),
        1 => any::<Index>().prop_map(M::RemoveTensor),
        1 => any::<Index>().prop_map(M::CutData),
        1 => prop_oneof![Just(1u32), Just(2), Just(4), Just(0)].prop_map(M::Version),
    ]
    .boxed()
}

fn list_key(list: u8) -> &'static str {
    [
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
    ][list as usize % 3]
}

fn list_mut(g: &mut Gguf, list: u8) -> Option<&mut Vec<Value>> {
    let key = list_key(list);
    g.kv.iter_mut()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| match v {
            Value::Array(items) => Some(items),
            _ => None,
        })
}

fn apply(g: &mut Gguf, m: &GgufMutation) {
    use GgufMutation as M;
    match m {
        M::SetKey(i, v) => {
            let key = KEYS[i.index(KEYS.len())];
            match g.kv.iter_mut().find(|(k, _)| k == key) {
                Some(slot) => slot.1 = v.clone(),
                None => g.kv.push((key.to_string(), v.clone())),
            }
        }
        M::SetExistingKey(i, v) if !g.kv.is_empty() => {
            let n = i.index(g.kv.len());
            g.kv[n].1 = v.clone();
        }
        M::RemoveKey(i) if !g.kv.is_empty() => {
            g.kv.remove(i.index(g.kv.len()));
        }
        M::DuplicateKey(i) if !g.kv.is_empty() => {
            let kv = g.kv[i.index(g.kv.len())].clone();
            g.kv.push(kv);
        }
        M::SetItem(l, i, v) => {
            if let Some(items) = list_mut(g, *l) {
                if !items.is_empty() {
                    let n = i.index(items.len());
                    items[n] = v.clone();
                }
            }
        }
        M::Truncate(l, i) => {
            if let Some(items) = list_mut(g, *l) {
                let n = i.index(items.len() + 1);
                items.truncate(n);
            }
        }
        M::Push(l, v) => {
            if let Some(items) = list_mut(g, *l) {
                items.push(v.clone());
            }
        }
        M::SwapItems(l, a, b) => {
            if let Some(items) = list_mut(g, *l) {
                if !items.is_empty() {
                    let (a, b) = (a.index(items.len()), b.index(items.len()));
                    items.swap(a, b);
                }
            }
        }
        M::TensorDim(t, d, v) if !g.tensors.is_empty() => {
            let n = t.index(g.tensors.len());
            let dims = &mut g.tensors[n].dims;
            if !dims.is_empty() {
                let k = d.index(dims.len());
                dims[k] = *v;
            }
        }
        M::TensorDims(t, n) if !g.tensors.is_empty() => {
            let i = t.index(g.tensors.len());
            g.tensors[i].dims.resize(*n as usize, 1);
        }
        M::TensorType(t, d) if !g.tensors.is_empty() => {
            let i = t.index(g.tensors.len());
            g.tensors[i].dtype = *d;
        }
        M::TensorOffset(t, o) if !g.tensors.is_empty() => {
            let i = t.index(g.tensors.len());
            g.tensors[i].offset = *o;
        }
        M::TensorName(a, b) if !g.tensors.is_empty() => {
            let (a, b) = (a.index(g.tensors.len()), b.index(g.tensors.len()));
            g.tensors[a].name = g.tensors[b].name.clone();
        }
        M::RemoveTensor(t) if !g.tensors.is_empty() => {
            g.tensors.remove(t.index(g.tensors.len()));
        }
        M::CutData(i) => {
            let n = i.index(g.data.len() + 1);
            g.data.truncate(n);
        }
        M::Version(v) => g.version = *v,
        _ => {}
    }
}

#[derive(Debug, Clone)]
struct GgufCase {
    mutations: Vec<GgufMutation>,
    /// (which length field, new value).
    lies: Vec<(Index, u64)>,
    /// Byte mutations, applied within the header (metadata and tensor infos) when `in_header`.
    bytes: Vec<ByteMutation>,
    in_header: bool,
}

fn gguf_case() -> impl Strategy<Value = GgufCase> {
    (
        prop::collection::vec(gguf_mutation(), 0..4),
        prop_oneof![
            3 => Just(Vec::new()),
            1 => prop::collection::vec(
                (any::<Index>(), prop_oneof![prop::sample::select(NUMBERS), any::<u64>()]),
                1..3,
            ),
        ],
        prop_oneof![
            2 => Just(Vec::new()),
            1 => prop::collection::vec(byte_mutation(), 1..4),
        ],
        prop::bool::weighted(0.8),
    )
        .prop_map(|(mutations, lies, bytes, in_header)| GgufCase {
            mutations,
            lies,
            bytes,
            in_header,
        })
}

const GGUF_TOKENS: &[&[u8]] = &[
    b"\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\x00\x00\x00\x00\x00\x00\x00\x10",
    b"\x09\x00\x00\x00",
    b"\x08\x00\x00\x00",
    b"GGUF",
    b"\x00",
];

fn build(case: &GgufCase) -> Vec<u8> {
    let mut g = pristine().clone();
    for m in &case.mutations {
        apply(&mut g, m);
    }
    let (mut bytes, lengths) = g.serialize();
    for (i, v) in &case.lies {
        if !lengths.is_empty() {
            let p = lengths[i.index(lengths.len())];
            bytes[p..p + 8].copy_from_slice(&v.to_le_bytes());
        }
    }
    if !case.bytes.is_empty() {
        if case.in_header {
            let header = bytes.len() - g.data.len().min(bytes.len());
            let mut head = bytes[..header].to_vec();
            mutate_bytes(&mut head, &case.bytes, GGUF_TOKENS);
            head.extend_from_slice(&bytes[header..]);
            bytes = head;
        } else {
            mutate_bytes(&mut bytes, &case.bytes, GGUF_TOKENS);
        }
    }
    bytes
}

// ---------------------------------------------------------------------------------------------
// gguf_tokenizer

/// Everything a node does with a tokenizer, none of which may panic.
fn use_tokenizer(t: &TextTokenizer) {
    let n = t.vocab_size() as u32;
    let ids = t
        .encode_plain("hello <|im_end|> wörld 12345 \u{0} 👋")
        .unwrap_or_default();
    let _ = t.encode("<|im_start|>user\nhi<|im_end|>");
    let _ = t.encode_chat(
        &[
            ChatMessage::new("system", "s"),
            ChatMessage::new("user", "<|im_end|>x"),
        ],
        true,
    );
    let _ = t.decode(&ids);
    let probe: Vec<u32> = (0..n.min(300))
        .chain([n, n.wrapping_add(1), u32::MAX])
        .collect();
    let mut d = t.stream_decoder();
    for &id in &probe {
        let _ = d.push(id);
        let _ = t.bytes_of(id);
    }
    let _ = d.finish();
    let _ = t.decode(&probe);
    let _ = t.eos_token_ids();
    let _ = t.token_to_id("<|im_end|>");
    let _ = t.apply_chat_template(&[ChatMessage::new("user", "x")], true);
}

#[test]
fn gguf_tokenizer() {
    // The unmutated file works.
    let t =
        TextTokenizer::from_gguf_content(&Content::read(&mut Cursor::new(tiny_bytes())).unwrap())
            .unwrap();
    assert_eq!(t.vocab_size(), spec().vocab_size());
    let (again, _) = pristine().serialize();
    let t2 = TextTokenizer::from_gguf_content(&Content::read(&mut Cursor::new(&again)).unwrap())
        .unwrap();
    assert_eq!(
        t.fingerprint(),
        t2.fingerprint(),
        "the test's GGUF writer is faithful"
    );

    fuzz_support::run(
        "gguf_tokenizer",
        1_500,
        64 << 20,
        gguf_case(),
        |c: &Counters, case| {
            let bytes = build(&case);
            c.exec(1);
            let Ok(content) = read_gguf_content(&mut Cursor::new(&bytes), "case") else {
                c.accepted(false);
                return Ok(());
            };
            let _ = edgespec_model::forward::tokenizer_fingerprint(&content);
            match TextTokenizer::from_gguf_content(&content) {
                Ok(t) => {
                    c.accepted(true);
                    // On a thread of its own: see `fuzz_support::in_fresh_thread`.
                    fuzz_support::in_fresh_thread(|| use_tokenizer(&t));
                }
                Err(e) => {
                    c.accepted(false);
                    let typed = matches!(e, ModelError::Tokenizer(_) | ModelError::Load { .. });
                    prop_assert!(typed, "{:?}", e);
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// gguf_model

fn scratch_path() -> PathBuf {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    // tmpfs where there is one: writing the case file is most of a case's time on a disk.
    DIR.get_or_init(|| {
        tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap()
    })
    .path()
    .join("case.gguf")
}

#[test]
fn gguf_model() {
    // One candle worker: a case's forwards are tiny, and waking a pool of workers for each
    // of them cost ten times the work (4300 cases/s against 380 on a loaded 2-core machine).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let path = scratch_path();
    let (again, _) = pristine().serialize();
    std::fs::write(&path, &again).unwrap();
    let m = load_gguf(&path, DeviceKind::Cpu).expect("the re-serialised tiny model loads");
    assert_eq!(m.info().vocab_size, spec().vocab_size());

    fuzz_support::run(
        "gguf_model",
        1_000,
        64 << 20,
        gguf_case(),
        |c: &Counters, case| {
            let bytes = build(&case);
            std::fs::write(&path, &bytes).unwrap();
            c.exec(1);
            match load_gguf(&path, DeviceKind::Cpu) {
                Ok(mut m) => {
                    c.accepted(true);
                    let info = m.info().clone();
                    let r = m.forward_batch(&[SeqRequest {
                        session: 1,
                        start: 0,
                        tokens: vec![0, (info.vocab_size.saturating_sub(1)) as u32],
                        logits_for_last: 1,
                    }]);
                    if let Ok(out) = r {
                        prop_assert_eq!(out[0].data.len(), out[0].rows * out[0].vocab_size);
                    }
                }
                Err(_) => c.accepted(false),
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// stream_decoder

fn tiny_tokenizer() -> &'static TextTokenizer {
    static T: std::sync::OnceLock<TextTokenizer> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        TextTokenizer::from_gguf_content(&Content::read(&mut Cursor::new(tiny_bytes())).unwrap())
            .unwrap()
    })
}

fn real_tokenizer() -> Option<&'static TextTokenizer> {
    static T: std::sync::OnceLock<Option<TextTokenizer>> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let path = cached_model_path(KnownModel::Qwen05bDraft, &default_cache_dir())?;
        TextTokenizer::from_gguf(path).ok()
    })
    .as_ref()
}

/// Ids biased to what breaks UTF-8: lead bytes without their continuations, lone continuation
/// bytes, multi-byte merges, specials, and ids past the vocabulary.
fn id_for(t: &TextTokenizer) -> BoxedStrategy<u32> {
    let n = t.vocab_size() as u32;
    let byte_ids: Vec<u32> = (0..n.min(400))
        .filter(|&i| t.bytes_of(i).is_ok_and(|b| b.len() == 1 && b[0] >= 0x80))
        .collect();
    let byte_ids = if byte_ids.is_empty() {
        vec![0]
    } else {
        byte_ids
    };
    prop_oneof![
        4 => prop::sample::select(byte_ids),
        3 => 0..n,
        1 => n..n.saturating_add(64),
        1 => Just(u32::MAX),
    ]
    .boxed()
}

fn check_stream(c: &Counters, t: &TextTokenizer, ids: &[u32]) -> Result<(), TestCaseError> {
    c.exec(1);
    let mut d = t.stream_decoder();
    let mut text = String::new();
    for (i, &id) in ids.iter().enumerate() {
        if let Some(piece) = d.push(id) {
            prop_assert!(!piece.is_empty());
            text.push_str(&piece);
        }
        prop_assert!(
            d.pending_bytes() <= 3,
            "{} bytes held after {:?}",
            d.pending_bytes(),
            &ids[..=i]
        );
    }
    text.push_str(&d.finish());
    prop_assert_eq!(d.pending_bytes(), 0);
    let known: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|&i| (i as usize) < t.vocab_size())
        .collect();
    let all_known = known.len() == ids.len();
    c.accepted(all_known);
    let decoded = t
        .decode(&known)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&text, &decoded);
    let mut bytes = Vec::new();
    for &i in &known {
        bytes.extend_from_slice(t.bytes_of(i).unwrap());
    }
    prop_assert_eq!(&text, &String::from_utf8_lossy(&bytes));
    let whole = t.decode(ids);
    prop_assert_eq!(whole.is_ok(), all_known);
    if let Err(e) = whole {
        let typed = matches!(e, ModelError::TokenOutOfVocab { .. });
        prop_assert!(typed, "{:?}", e);
    }
    Ok(())
}

#[test]
fn stream_decoder() {
    let tiny = tiny_tokenizer();
    let strategy = prop::collection::vec(id_for(tiny), 0..48);
    fuzz_support::run(
        "stream_decoder(tiny)",
        20_000,
        1 << 20,
        strategy,
        |c: &Counters, ids| check_stream(c, tiny, &ids),
    );
    match real_tokenizer() {
        Some(real) => {
            let strategy = prop::collection::vec(id_for(real), 0..48);
            fuzz_support::run(
                "stream_decoder(qwen2.5)",
                20_000,
                1 << 20,
                strategy,
                |c: &Counters, ids| check_stream(c, real, &ids),
            );
        }
        None => {
            println!("stream_decoder: no cached Qwen2.5 0.5B GGUF; the real tokenizer is skipped")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Regressions: inputs the targets found

/// `gguf_tokenizer`, first crash: the token list cut to its first 221 entries (single
/// characters of at most 2 bytes) with the merges kept. The merge `Ġ t` joins two tokens into
/// one longer than every token, and `tokenizers`' BPE builder panicked ("range end index 3 out
/// of range for slice of length 2") where it means to refuse the merge. The tokenizer builder now
/// refuses a merge whose result is not a token before the BPE sees it.
#[test]
fn regression_merge_longer_than_every_token_is_refused() {
    let mut g = pristine().clone();
    let tokens =
        g.kv.iter_mut()
            .find(|(k, _)| k == "tokenizer.ggml.tokens")
            .unwrap();
    if let Value::Array(items) = &mut tokens.1 {
        items.truncate(221);
    }
    let (bytes, _) = g.serialize();
    let content = Content::read(&mut Cursor::new(&bytes)).unwrap();
    match TextTokenizer::from_gguf_content(&content) {
        Err(ModelError::Tokenizer(m)) => assert!(m.contains("not in the vocabulary"), "{m}"),
        other => panic!("expected a tokenizer error, got {other:?}"),
    }
}

fn with_key(key: &str, v: Value) -> Vec<u8> {
    let mut g = pristine().clone();
    match g.kv.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = v,
        None => g.kv.push((key.to_string(), v)),
    }
    g.serialize().0
}

/// `gguf_model`, third crash: `general.alignment` = 0 (any integer type). candle's reader divides
/// the header end by the alignment and panicked ("attempt to divide by zero"); `load_gguf`,
/// `TextTokenizer::from_gguf` and `read_gguf_content` now return a load error.
#[test]
fn regression_alignment_zero_is_a_load_error() {
    for v in [Value::U8(0), Value::U32(0), Value::I32(0), Value::U16(0)] {
        let bytes = with_key("general.alignment", v);
        let e = read_gguf_content(&mut Cursor::new(&bytes), "case").unwrap_err();
        assert!(matches!(e, ModelError::Load { .. }), "{e:?}");
        let path = scratch_path().with_file_name("alignment0.gguf");
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            TextTokenizer::from_gguf(&path),
            Err(ModelError::Load { .. })
        ));
        assert!(matches!(
            load_gguf(&path, DeviceKind::Cpu),
            Err(ModelError::Load { .. })
        ));
    }
}

/// `gguf_model`, second crash: one dimension of a 2-d weight set to 2^60. candle multiplies the
/// dimensions without overflow checks, so the element count wrapped to 0, the tensor passed its
/// size check with no data, and the loader's Q8_0 padding overflowed computing its size
/// ("attempt to multiply with overflow" in `forward/linear.rs`; in a release build it would wrap
/// and leave a tensor whose shape claims 2^60 rows over no data). The loader now refuses a tensor
/// whose element count or byte size overflows.
///
/// `gguf_model`, fourth crash: the same dimension set to 0. The empty tensor's data pointer is
/// dangling, and candle's `as_t_slice` asserted on its alignment ("Data pointer must be aligned
/// to T's alignment") when the loader dequantized it. The loader now refuses empty tensors.
#[test]
fn regression_tensor_shape_overflow_is_a_load_error() {
    for (dim, value) in [
        (0usize, 1u64 << 60),
        (1, 1 << 60),
        (0, u64::MAX),
        (1, 1 << 59),
    ] {
        let mut g = pristine().clone();
        let t = g
            .tensors
            .iter_mut()
            .find(|t| t.name == "blk.0.attn_q.weight")
            .unwrap();
        t.dims[dim] = value;
        let path = scratch_path().with_file_name("shape.gguf");
        std::fs::write(&path, g.serialize().0).unwrap();
        match load_gguf(&path, DeviceKind::Cpu) {
            Err(ModelError::Load { reason, .. }) => assert!(!reason.is_empty()),
            Err(e) => panic!("unexpected error {e:?}"),
            Ok(_) => panic!("a tensor of {value} x .. rows over no data loaded"),
        }
    }
}

/// `gguf_model`, fifth finding (an allocation, not a panic): attention key length (or embedding
/// width / head count) metadata that disagrees with the weights. The loader did not compare
/// them, so the file loaded and its first forward built rotary tables of `key_length / 2`
/// entries: 2.6 GB for one token (the harness refuses single allocations above 2 GiB, so the run
/// aborted). The loader now checks the widths against `token_embd` and the first block's q/k
/// projections. A `block_count` beyond the blocks present reserved `block_count` layers up front
/// (2^32 × a layer's size): the count is now checked against the tensors too.
#[test]
fn regression_hparams_must_match_the_weights() {
    let cases: [(&str, Value); 6] = [
        ("qwen2.attention.key_length", Value::U32(1_308_622_880)),
        ("qwen2.attention.key_length", Value::U64(1 << 40)),
        ("qwen2.embedding_length", Value::U64((1 << 32) - 2)),
        ("qwen2.attention.head_count", Value::U32(1 << 20)),
        ("qwen2.block_count", Value::U64(1 << 32)),
        ("qwen2.block_count", Value::U32(2)),
    ];
    for (key, v) in cases {
        let path = scratch_path().with_file_name("hparams.gguf");
        std::fs::write(&path, with_key(key, v.clone())).unwrap();
        match load_gguf(&path, DeviceKind::Cpu) {
            Err(ModelError::Load { .. }) => {}
            Err(e) => panic!("{key} = {v:?}: unexpected error {e:?}"),
            Ok(_) => panic!("{key} = {v:?}: loaded a model that disagrees with its weights"),
        }
    }
}

/// `gguf_model`, sixth crash, after 961 981 cases of the first campaign: a q/k/v projection one
/// row wide (here `attn_v`, its bias removed so that the bias add cannot object). The matmuls
/// accepted it, and the CPU attention kernel sliced the v rows by the metadata's kv width and
/// panicked ("range end index 32 out of range for slice of length 2"). The loader now checks
/// every block's q/k/v weights and biases against the metadata's widths.
#[test]
fn regression_projection_width_must_match_the_metadata() {
    for (part, rows) in [("v", 1u64), ("k", 1), ("q", 1), ("v", 32), ("k", 17)] {
        let mut g = pristine().clone();
        let weight = format!("blk.0.attn_{part}.weight");
        let bias = format!("blk.0.attn_{part}.bias");
        g.tensors
            .iter_mut()
            .find(|t| t.name == weight)
            .unwrap()
            .dims[1] = rows;
        g.tensors.retain(|t| t.name != bias);
        let path = scratch_path().with_file_name("projection.gguf");
        std::fs::write(&path, g.serialize().0).unwrap();
        match load_gguf(&path, DeviceKind::Cpu) {
            Err(ModelError::Load { .. }) => {}
            Err(e) => panic!("{weight} with {rows} rows: unexpected error {e:?}"),
            Ok(_) => panic!("{weight} with {rows} rows loaded"),
        }
    }
}
