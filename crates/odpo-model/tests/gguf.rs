//! GGUF reader tests against fixtures written by gguf-py (llama.cpp's own Python package):
//! see `tests/fixtures/gguf/make_gguf_fixtures.py` and `make_smollm_expected.py`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use odpo_model::gguf::{GgufError, GgufFile, GgufValue, HostTensor, load_as_hf, load_blocks_as_hf};

#[path = "common/env.rs"]
mod env;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

/// f32 tensors of a safetensors file, as (shape, values).
fn read_safetensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let data = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, (view.shape().to_vec(), data))
        })
        .collect()
}

fn assert_bitwise(name: &str, got: &HostTensor, shape: &[usize], want: &[f32]) {
    assert_eq!(got.shape, shape, "{name}: shape");
    assert_eq!(got.data.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.data.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{name}[{i}]: got {g}, want {w}");
    }
}

#[test]
fn dequantizes_every_type_bitwise_like_gguf_py() {
    let file = GgufFile::open(&fixture("types.gguf")).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(
        file.metadata().get("general.architecture"),
        Some(&GgufValue::String("test".into()))
    );
    let expected = read_safetensors(&fixture("types_expected.safetensors"));
    let names = file.tensor_names();
    assert_eq!(
        names,
        [
            "t_f32", "t_f16", "t_bf16", "t_q8_0", "t_q4_0", "t_q4_1", "t_3d"
        ]
    );
    for name in &names {
        let (shape, want) = &expected[name];
        assert_bitwise(name, &file.dequantize(name).unwrap(), shape, want);
    }
    assert_eq!(file.dequantize("t_3d").unwrap().shape, [2, 3, 32]);
    let err = file.dequantize("nope").unwrap_err().to_string();
    assert!(
        err.ends_with("types.gguf: tensor `nope`: no such tensor"),
        "{err}"
    );
}

/// Q5_0 and Q5_1 (quantised by gguf-py) and the k-quants Q2_K to Q6_K (random blocks) dequantise
/// to gguf-py's values bit for bit; they are not kept as blocks.
#[test]
fn dequantizes_k_quants_bitwise_like_gguf_py() {
    let file = GgufFile::open(&fixture("kquants.gguf")).unwrap();
    let expected = read_safetensors(&fixture("kquants_expected.safetensors"));
    let names = file.tensor_names();
    assert_eq!(names, ["t_q5_0", "t_q5_1", "t_q2_k", "t_q3_k", "t_q4_k", "t_q5_k", "t_q6_k"]);
    for name in &names {
        let (shape, want) = &expected[name];
        assert_bitwise(name, &file.dequantize(name).unwrap(), shape, want);
        assert!(file.blocks(name).unwrap().is_none());
    }
}

/// Q8_0, Q4_0 and Q4_1 read as their blocks (kept for a quantised LoRA base) hold gguf-py's
/// values bit for bit; other types are not blocks.
#[test]
fn blocks_hold_gguf_pys_values() {
    let file = GgufFile::open(&fixture("types.gguf")).unwrap();
    let expected = read_safetensors(&fixture("types_expected.safetensors"));
    for name in ["t_q8_0", "t_q4_0", "t_q4_1"] {
        let b = file.blocks(name).unwrap().expect("a block type");
        let (shape, want) = &expected[name];
        let got = HostTensor { shape: b.shape.to_vec(), data: b.dequantize() };
        assert_bitwise(name, &got, shape, want);
    }
    assert!(file.blocks("t_f32").unwrap().is_none());
    assert!(file.blocks("t_3d").unwrap().is_none());
}

/// A llama file's projections kept in blocks, Q/K rows unpermuted, dequantise to the weights the
/// plain reader gives.
#[test]
fn kept_blocks_are_unpermuted_like_the_weights() {
    let Some(gguf) = shared_file("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let (_, plain) = load_as_hf(&gguf).unwrap();
    let (_, rest, blocks) = load_blocks_as_hf(&gguf, true).unwrap();
    assert_eq!(blocks.len(), 30 * 7, "every projection of 30 layers is kept in blocks");
    assert_eq!(rest.len() + blocks.len(), plain.len());
    for (name, b) in &blocks {
        assert_bitwise(name, &HostTensor { shape: b.shape.to_vec(), data: b.dequantize() }, &plain[name].shape, &plain[name].data);
    }
}

#[test]
fn tiny_llama_unpermutes_to_the_hf_weights() {
    let (config, weights) = load_as_hf(&fixture("tiny_llama.gguf")).unwrap();
    let expected = read_safetensors(&fixture("tiny_llama_hf.safetensors"));
    assert_eq!(
        weights.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (name, (shape, want)) in &expected {
        assert_bitwise(name, &weights[name], shape, want);
    }
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny_llama_config.json")).unwrap())
            .unwrap();
    for (key, value) in want.as_object().unwrap() {
        assert_eq!(&config[key], value, "config `{key}`");
    }
}

/// Qwen2 and Qwen3 files as llama.cpp's converter writes them (architectures `qwen2` and `qwen3`,
/// Q/K rows as they are, Qwen2's q/k/v biases, Qwen3's per-head norms as `attn_q_norm` /
/// `attn_k_norm`) give back the transformers fixtures they were made from: every tensor to the
/// bit, and the config's keys that shape the model.
#[test]
fn tiny_qwen_files_read_back_as_their_hf_checkpoints() {
    for (file, case, extra) in [("tiny_qwen2.gguf", "qwen2_bias", "model.layers.1.self_attn.k_proj.bias"), ("tiny_qwen3.gguf", "qwen3_qk_norm", "model.layers.1.self_attn.k_norm.weight")] {
        let (config, weights) = load_as_hf(&fixture(file)).unwrap();
        let hf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(case);
        let expected = read_safetensors(&hf.join("model.safetensors"));
        assert_eq!(weights.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>(), "{file}");
        assert!(weights.contains_key(extra), "{file}: {extra}");
        for (name, (shape, want)) in &expected {
            assert_bitwise(name, &weights[name], shape, want);
        }
        let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
        for key in ["architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "tie_word_embeddings", "vocab_size", "max_position_embeddings"] {
            assert_eq!(config[key], want[key], "{file}: config `{key}`");
        }
        // Qwen2's biases come with its architecture: `attention_bias` (all four projections) stays off.
        assert_eq!(config["attention_bias"], false, "{file}");
        let head_dim = want.get("head_dim").cloned().unwrap_or_else(|| (want["hidden_size"].as_u64().unwrap() / want["num_attention_heads"].as_u64().unwrap()).into());
        assert_eq!(config["head_dim"], head_dim, "{file}");
        assert_eq!(config["rope_theta"], want["rope_parameters"]["rope_theta"], "{file}");
        assert_eq!(config["rms_norm_eps"].as_f64().map(|e| e as f32), want["rms_norm_eps"].as_f64().map(|e| e as f32), "{file}");
    }
}

/// Gemma, Gemma 2 and Gemma 3 files as llama.cpp's converter writes them give back the
/// transformers fixtures they were made from: every tensor under its HF name (the norms, stored as
/// `1 + w`, within an ulp of 1), and the config keys that shape the model, including those llama.cpp
/// fixes by architecture rather than reading from the file.
#[test]
fn tiny_gemma_files_read_back_as_their_hf_checkpoints() {
    for (file, case) in [("tiny_gemma.gguf", "gemma"), ("tiny_gemma2.gguf", "gemma2_llamacpp"), ("tiny_gemma3.gguf", "gemma3_llamacpp")] {
        let (config, weights) = load_as_hf(&fixture(file)).unwrap();
        let hf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(case);
        let expected = read_safetensors(&hf.join("model.safetensors"));
        assert_eq!(weights.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>(), "{file}");
        for (name, (shape, want)) in &expected {
            if name.ends_with("norm.weight") {
                let got = &weights[name];
                assert_eq!(&got.shape, shape, "{name}");
                let diff = got.data.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
                assert!(diff <= f32::EPSILON, "{file}: {name} differs by {diff}");
                assert!(want.iter().any(|w| w.abs() > 0.05), "{file}: {name} is not centred on zero");
            } else {
                assert_bitwise(name, &weights[name], shape, want);
            }
        }
        let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
        for key in ["architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings", "vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"] {
            assert_eq!(config[key], want[key], "{file}: config `{key}`");
        }
        if case != "gemma" {
            for key in ["query_pre_attn_scalar", "sliding_window", "final_logit_softcapping", "attn_logit_softcapping"] {
                assert_eq!(config[key], want[key], "{file}: config `{key}`");
            }
        }
        if case == "gemma3_llamacpp" {
            let full = &want["rope_parameters"]["full_attention"];
            assert_eq!(config["rope_theta"], full["rope_theta"], "{file}");
            assert_eq!(config["rope_scaling"], serde_json::json!({"rope_type": "linear", "factor": full["factor"]}), "{file}");
            assert_eq!(config["rope_local_base_freq"], want["rope_parameters"]["sliding_attention"]["rope_theta"], "{file}");
            // Not stored in the file: the pattern llama.cpp fixes for Gemma 3, which is the one the
            // fixture's layers follow.
            let types: Vec<&str> = want["layer_types"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
            assert_eq!(types.iter().position(|t| *t == "full_attention"), Some(5), "{file}: {types:?}");
            assert_eq!(config["sliding_window_pattern"], 6, "{file}");
        }
    }
}

/// Opens `path` and dequantises every tensor; the first error, if any.
fn open_and_read_all(path: &Path) -> Result<Vec<HostTensor>, GgufError> {
    let file = GgufFile::open(path)?;
    file.tensor_names()
        .iter()
        .map(|n| file.dequantize(n))
        .collect()
}

#[test]
fn corrupt_files_give_clear_errors() {
    let cases: [(&str, &str); 6] = [
        (
            "bad_magic.gguf",
            "not a GGUF file (magic [47, 47, 4d, 4c], expected \"GGUF\")",
        ),
        (
            "bad_version.gguf",
            "unsupported GGUF version 7 (supported: 2, 3)",
        ),
        (
            "truncated_header.gguf",
            "truncated: header needs bytes 32..52 but the file has 40",
        ),
        (
            "truncated_data.gguf",
            "truncated: tensor `t_3d` needs bytes 2560..2944 but the file has 2844",
        ),
        (
            "unknown_type.gguf",
            "tensor `blk.3.attn_q.weight`: unknown quantisation type 99",
        ),
        (
            "unsupported_type.gguf",
            "tensor `blk.3.attn_q.weight`: quantisation type IQ2_XXS (16) is not supported \
             (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)",
        ),
    ];
    for (file, message) in cases {
        let path = fixture(&format!("corrupt/{file}"));
        let err = open_and_read_all(&path).expect_err(file).to_string();
        assert_eq!(err, format!("{}: {message}", path.display()));
    }
    let path = fixture("corrupt/not_llama.gguf");
    let err = load_as_hf(&path).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}: architecture `gpt2` is not supported (expected `llama`, `qwen2`, `qwen3`, `olmo2`, `smollm3`, `granite`, `phi3`, `gemma`, `gemma2`, `gemma3`, `phi2` or `stablelm`)",
            path.display()
        )
    );
    let missing = fixture("corrupt/does_not_exist.gguf");
    assert!(
        GgufFile::open(&missing)
            .unwrap_err()
            .to_string()
            .starts_with(&missing.display().to_string())
    );
}

/// Writes each variant of a fixture to a scratch file (one folder per `test`, as tests run in
/// parallel) and runs `check` on it. A fresh file each time: rewriting one makes ext4 flush it.
fn for_each_variant<K>(
    test: &str,
    fixture_name: &str,
    variants: impl Iterator<Item = (K, Vec<u8>)>,
    check: impl Fn(K, &Path),
) {
    let tmp =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("gguf-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for (i, (key, bytes)) in variants.enumerate() {
        let path = tmp.join(format!("{i}-{}", fixture_name.replace('/', "-")));
        std::fs::write(&path, bytes).unwrap();
        check(key, &path);
        std::fs::remove_file(&path).unwrap();
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn truncated_files_error_without_panicking() {
    for name in ["types.gguf", "kquants.gguf", "tiny_llama.gguf"] {
        let good = std::fs::read(fixture(name)).unwrap();
        let want = open_and_read_all(&fixture(name)).unwrap();
        let file = GgufFile::open(&fixture(name)).unwrap();
        let header = file.data_start() as usize;
        let data_end = header
            + file
                .tensor_infos()
                .iter()
                .map(|t| (t.offset + t.n_bytes) as usize)
                .max()
                .unwrap();
        for_each_variant(
            "truncated",
            name,
            (0..good.len()).map(|c| (c, good[..c].to_vec())),
            |cut, path| {
                match open_and_read_all(path) {
                    Err(e) => {
                        assert!(
                            cut < data_end,
                            "{name} cut at {cut} (data ends at {data_end}): {e}"
                        );
                        assert!(
                            e.to_string().starts_with(&path.display().to_string()),
                            "{e}"
                        );
                    }
                    // Only cutting trailing alignment padding may leave a readable file.
                    Ok(got) => assert!(
                        cut >= data_end && got == want,
                        "{name} cut at {cut} read fine"
                    ),
                }
            },
        );
    }
}

#[test]
fn scribbled_headers_never_panic() {
    for name in ["types.gguf", "kquants.gguf", "tiny_llama.gguf", "vocab/sentencepiece.gguf"] {
        let good = std::fs::read(fixture(name)).unwrap();
        let header = GgufFile::open(&fixture(name)).unwrap().data_start() as usize;
        let variants = (0..header).flat_map(|at| {
            [0x00, 0x7f, 0xff].map(|byte| {
                let mut bad = good.clone();
                bad[at] = byte;
                ((), bad)
            })
        });
        // Any result will do, as long as it is a result.
        for_each_variant("scribbled", name, variants, |_, path| {
            let _ = open_and_read_all(path);
            let _ = load_as_hf(path);
            let _ = odpo_model::tokenizer::Tokenizer::from_gguf(path);
        });
    }
}

/// `rel` inside the shared folder (tests/common/env.rs), or `None` (with a note) when absent, unless
/// `ODPO_REQUIRE_SHARED=1`.
fn shared_file(rel: &str) -> Option<PathBuf> {
    env::shared_path(rel)
}

/// Order- and bit-sensitive checksum, as in make_smollm_expected.py.
fn checksum(data: &[f32]) -> u64 {
    data.iter().enumerate().fold(0u64, |acc, (i, v)| {
        acc.wrapping_add(u64::from(v.to_bits()).wrapping_mul(i as u64 + 1))
    })
}

#[test]
fn smollm2_q4_1_matches_transformers() {
    let rel = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";
    let Some(gguf) = shared_file(rel) else { return };
    let dir = gguf.parent().unwrap();
    let (config, weights) = load_as_hf(&gguf).unwrap();

    let hf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "rms_norm_eps",
        "model_type",
        "architectures",
    ] {
        assert_eq!(config[key], hf[key], "config `{key}`");
    }
    assert_eq!(config["rope_theta"], hf["rope_parameters"]["rope_theta"]);
    assert_eq!(config["num_hidden_layers"], 30);
    assert_eq!(config["tie_word_embeddings"], true);
    assert!(!weights.contains_key("lm_head.weight"));
    assert_eq!(weights.len(), 2 + 30 * 9);
    assert!(weights.contains_key("model.layers.29.mlp.gate_proj.weight"));

    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm_expected.json")).unwrap())
            .unwrap();
    for (name, want) in expected["tensors"].as_object().unwrap() {
        let t = &weights[name];
        let shape: Vec<usize> = serde_json::from_value(want["shape"].clone()).unwrap();
        assert_eq!(t.shape, shape, "{name}");
        for (i, v) in want["values"].as_object().unwrap() {
            let i: usize = i.parse().unwrap();
            let bits = v[1].as_u64().unwrap();
            assert_eq!(
                u64::from(t.data[i].to_bits()),
                bits,
                "{name}[{i}]: {} vs {}",
                t.data[i],
                v[0]
            );
        }
        let sum: f64 = t.data.iter().map(|&v| f64::from(v)).sum();
        let want_sum = want["sum"].as_f64().unwrap();
        assert!(
            (sum - want_sum).abs() <= 1e-9 * want_sum.abs().max(1.0),
            "{name}: sum {sum} vs {want_sum}"
        );
        assert_eq!(
            checksum(&t.data),
            want["checksum"].as_u64().unwrap(),
            "{name}: checksum"
        );
    }
}

/// What the memory check counts before a GGUF file is read (`GgufFile::host_bytes`) is every
/// parameter the read gives, and no more bytes than it holds: f32 for every tensor, or the kept
/// projections' blocks (one byte a weight and f32 scales, where the file stores fewer).
#[test]
fn the_memory_counted_before_a_read_is_a_lower_bound_of_what_it_holds() {
    let f32_bytes = |w: &BTreeMap<String, HostTensor>| w.values().map(|t| t.data.len() as u64).sum::<u64>();
    let tiny = fixture("tiny_llama.gguf");
    let (_, weights) = load_as_hf(&tiny).unwrap();
    let params = f32_bytes(&weights);
    assert_eq!(GgufFile::open(&tiny).unwrap().host_bytes(false), (params, 4 * params));
    let Some(gguf) = shared_file("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let file = GgufFile::open(&gguf).unwrap();
    let (_, plain) = load_as_hf(&gguf).unwrap();
    assert_eq!(file.host_bytes(false), (f32_bytes(&plain), 4 * f32_bytes(&plain)));
    let (_, rest, blocks) = load_blocks_as_hf(&gguf, true).unwrap();
    let held = 4 * f32_bytes(&rest) + blocks.values().map(|b| (b.q.len() + 4 * b.d.len() + 4 * b.m.as_ref().map_or(0, Vec::len)) as u64).sum::<u64>();
    let (kept_params, counted) = file.host_bytes(true);
    assert_eq!(kept_params, f32_bytes(&plain));
    assert!(counted <= held && counted < 4 * kept_params, "counted {counted}, held {held}");
    eprintln!("SmolLM2-135M Q4_1: {counted} bytes counted with the blocks kept, {held} held; {} as f32", 4 * kept_params);
}
