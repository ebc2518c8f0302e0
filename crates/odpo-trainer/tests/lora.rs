//! LoRA runs of the trainer on the tiny random GPT-2: they learn, only the adapters carry optimizer
//! state, the saved adapters on the base model equal the merged export, and a resumed run with LoRA
//! dropout matches an uninterrupted one bit for bit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use burn::tensor::{Int, Tensor, TensorData};
use common::*;
use odpo_model::{CausalLm, ModelConfig};

fn device() -> burn::tensor::Device {
    odpo_model::backend::device("flex").expect("flex backend")
}

/// LoRA dropout draws from the backend's global generator: the tests of this file take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

const LORA: &str = "[lora]\nrank = 4\nalpha = 8.0\ndropout = 0.1\ntargets = [\"c_attn\", \"c_proj\", \"c_fc\"]\n";

#[test]
fn lora_odpo_learns_and_its_adapters_equal_the_merged_export() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("lora-learns");
    let model = tiny_model(&dir);
    let run = dir.join("run");
    let sets = ["train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=120", "train.log_every=20", "eval.every=0", "optim.lr=1e-2"];
    let cfg = config(&model, &run, LORA, &sets);
    let summary = odpo_trainer::train_on(&cfg, data(256, 64), &device(), false, None).expect("training");
    let (start, end) = (summary.eval_start.expect("start"), summary.eval_end.expect("end"));
    println!("LoRA eval loss {} -> {}, accuracy {} -> {}", start["loss"], end["loss"], start["rewards/accuracies"], end["rewards/accuracies"]);
    assert!(end["loss"] < start["loss"] - 0.2, "eval loss {} -> {}", start["loss"], end["loss"]);
    assert!(end["rewards/accuracies"] > 0.8);

    // The adapters (PEFT layout) on the base model give the merged export's logits.
    let model_cfg = ModelConfig::from_file(&model.join("config.json")).unwrap();
    let base = CausalLm::random(&model_cfg, cfg.train.seed, &device()).unwrap();
    let (adapted, lora) = base.load_peft(&run.join("adapter"), &device()).unwrap();
    assert_eq!((lora.rank, lora.alpha), (4, 8.0));
    let merged = CausalLm::load(&run.join("model"), &device()).unwrap().model;
    let ids: Vec<i64> = (0..2 * 12).map(|i| (i * 7 % 60 + 2) as i64).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, 12]), &device());
    let mask = Tensor::<2, Int>::ones([2, 12], &device());
    let a = adapted.forward(ids.clone(), &mask, None).into_data().try_to_vec::<f32>().unwrap();
    let b = merged.forward(ids.clone(), &mask, None).into_data().try_to_vec::<f32>().unwrap();
    let c = base_logits(&model_cfg, cfg.train.seed, ids, &mask);
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    let moved = a.iter().zip(&c).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    println!("adapters vs merged export: max |diff| {diff:.2e}; adapters move the logits by {moved:.3}");
    assert!(diff < 1e-4, "adapters on the base and the merged export differ by {diff}");
    assert!(moved > 1e-2, "the adapters did not change the model ({moved})");

    // Optimizer state for the adapters alone: far smaller than a full fine-tuning run's.
    let full = dir.join("full");
    let cfg_full = config(&model, &full, "", &["train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=2", "eval.at_start=false"]);
    odpo_trainer::train_on(&cfg_full, data(32, 8), &device(), false, None).expect("full run");
    let size = |run: &std::path::Path| std::fs::metadata(odpo_trainer::checkpoint::latest(run).unwrap().unwrap().join("optim.bpk")).unwrap().len();
    let (lora_state, full_state) = (size(&run), size(&full));
    let ad = device().autodiff();
    let trainable = odpo_trainer::trainable_params(&CausalLm::random(&model_cfg, 0, &ad).unwrap().with_lora(cfg.lora.as_ref().unwrap(), &ad).unwrap());
    println!("optimizer state: LoRA {lora_state} bytes ({trainable} trainable parameters), full {full_state} bytes");
    assert!(lora_state * 4 < full_state, "LoRA optimizer state {lora_state} vs full {full_state}");
    assert!(trainable > 0 && lora_state >= 8 * trainable as u64, "two AdamW moments per adapter parameter ({trainable})");
}

/// LoRA over a base whose projections are block-quantised (Q8_0 at load, `lora.quantized_base`):
/// it learns, its checkpoints resume bit for bit, and its export is the merged float model.
#[test]
fn lora_over_a_quantized_base_learns_and_resumes() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("lora-quantized");
    let model = tiny_model(&dir);
    let lora = format!("{LORA}quantized_base = true\n");
    let run = dir.join("run");
    let sets = ["train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=120", "train.log_every=20", "eval.every=0", "optim.lr=1e-2", "train.checkpoint_every=60"];
    let cfg = config(&model, &run, &lora, &sets);
    let summary = odpo_trainer::train_on(&cfg, data(256, 64), &device(), false, None).expect("training");
    let (start, end) = (summary.eval_start.expect("start"), summary.eval_end.expect("end"));
    println!("LoRA over a Q8_0 base: eval loss {} -> {}, accuracy {} -> {}", start["loss"], end["loss"], start["rewards/accuracies"], end["rewards/accuracies"]);
    assert!(end["loss"] < start["loss"] - 0.2, "eval loss {} -> {}", start["loss"], end["loss"]);
    assert!(end["rewards/accuracies"] > 0.8);

    // The merged export is a float model whose logits are the adapted quantised model's.
    let model_cfg = ModelConfig::from_file(&model.join("config.json")).unwrap();
    let base = CausalLm::random_with(&model_cfg, cfg.train.seed, &device(), true).unwrap();
    assert!(base.has_quantized_base());
    let (adapted, _) = base.load_peft(&run.join("adapter"), &device()).unwrap();
    let merged = CausalLm::load(&run.join("model"), &device()).unwrap().model;
    assert!(!merged.has_quantized_base());
    let ids: Vec<i64> = (0..2 * 12).map(|i| (i * 7 % 60 + 2) as i64).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, 12]), &device());
    let mask = Tensor::<2, Int>::ones([2, 12], &device());
    let a = adapted.forward(ids.clone(), &mask, None).into_data().try_to_vec::<f32>().unwrap();
    let b = merged.forward(ids, &mask, None).into_data().try_to_vec::<f32>().unwrap();
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(diff < 1e-4, "adapters on the quantised base and the merged export differ by {diff}");

    // Cut at step 60 and resumed: the same export as the uninterrupted run.
    let ckpts = odpo_trainer::checkpoint::list(&run).unwrap();
    let whole = exported(&run);
    std::fs::remove_dir_all(ckpts.last().unwrap()).unwrap();
    std::fs::remove_dir_all(run.join("model")).unwrap();
    let resumed = odpo_trainer::train_on(&cfg, data(256, 64), &device(), true, None).expect("resumed run");
    assert_eq!(resumed.resumed_from, Some(60));
    assert!(exported(&run) == whole, "the resumed run over a quantised base differs from the uninterrupted one");
}

fn base_logits(config: &ModelConfig, seed: u64, ids: Tensor<2, Int>, mask: &Tensor<2, Int>) -> Vec<f32> {
    let base = CausalLm::random(config, seed, &device()).unwrap();
    base.forward(ids, mask, None).into_data().try_to_vec::<f32>().unwrap()
}

#[test]
fn resumed_lora_run_with_dropout_matches_the_uninterrupted_one() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("lora-resume");
    let model = tiny_model(&dir);
    let sets = ["train.batch_size=4", "train.micro_batch_size=2", "train.max_steps=6", "train.checkpoint_every=3", "train.keep_checkpoints=2", "eval.every=0", "eval.at_start=false"];
    let whole = dir.join("whole");
    odpo_trainer::train_on(&config(&model, &whole, LORA, &sets), data(32, 4), &device(), false, None).expect("uninterrupted run");

    // The same run cut after step 3: its step-6 checkpoint and export removed, then resumed.
    let cut = dir.join("cut");
    odpo_trainer::train_on(&config(&model, &cut, LORA, &sets), data(32, 4), &device(), false, None).expect("first part");
    let ckpts = odpo_trainer::checkpoint::list(&cut).unwrap();
    assert_eq!(ckpts.len(), 2);
    std::fs::remove_dir_all(&ckpts[1]).unwrap();
    std::fs::remove_dir_all(cut.join("model")).unwrap();
    let summary = odpo_trainer::train_on(&config(&model, &cut, LORA, &sets), data(32, 4), &device(), true, None).expect("resumed run");
    assert_eq!(summary.resumed_from, Some(3));
    assert!(exported(&whole) == exported(&cut), "the resumed LoRA run differs from the uninterrupted one");
    let adapters = |run: &std::path::Path| std::fs::read(run.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(adapters(&whole) == adapters(&cut), "the resumed run's adapters differ");
}

#[test]
fn lora_sft_lowers_the_nll_and_leaves_the_base_weights_alone() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("lora-sft");
    let model = tiny_model(&dir);
    let run = dir.join("run");
    let cfg = as_sft(config(&model, &run, LORA, &["train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=100", "eval.every=0", "optim.lr=3e-2"]));
    let summary = odpo_trainer::train_on(&cfg, data(128, 32), &device(), false, None).expect("training");
    let (start, end) = (summary.eval_start.expect("start"), summary.eval_end.expect("end"));
    // The LM head (tied to the frozen embeddings) is not adapted, so a random tiny model can only move
    // so far (about 0.12 nats here); full SFT of the same model drops by more than 0.5.
    println!("LoRA SFT nll {} -> {}", start["nll"], end["nll"]);
    assert!(end["nll"] < start["nll"] - 0.08, "nll {} -> {}", start["nll"], end["nll"]);
    // The checkpoint's frozen weights are the starting ones, bit for bit; only the adapters moved.
    let model_cfg = ModelConfig::from_file(&model.join("config.json")).unwrap();
    let base = CausalLm::random(&model_cfg, cfg.train.seed, &device()).unwrap();
    use burn::store::{BurnpackStore, ModuleSnapshot};
    let mut trained = CausalLm::random(&model_cfg, cfg.train.seed, &device()).unwrap().with_lora(cfg.lora.as_ref().unwrap(), &device()).unwrap();
    let ckpt = odpo_trainer::checkpoint::latest(&run).unwrap().unwrap();
    trained.load_from(&mut BurnpackStore::from_file(ckpt.join("model.bpk"))).unwrap();
    let ids = Tensor::<2, Int>::from_data(TensorData::new((0..24).map(|i| (i * 5 % 60 + 2) as i64).collect::<Vec<_>>(), [2, 12]), &device());
    let mask = Tensor::<2, Int>::ones([2, 12], &device());
    let logits = |m: &CausalLm| m.forward(ids.clone(), &mask, None).into_data().try_to_vec::<f32>().unwrap();
    assert!(logits(&trained.without_adapters()) == logits(&base), "the frozen weights changed during LoRA SFT");
    assert!(logits(&trained) != logits(&base), "the adapters did not train");
}

/// LoRA on a mixture of experts' stacks and routers (`lora.target_parameters`, PEFT's LoRA of
/// parameters) over a Q8_0 base, on a tiny random Mixtral: the run learns, its saved adapters on the
/// base give the merged export's logits, and a run cut and resumed ends with the same export.
#[test]
fn lora_on_the_experts_learns_saves_peft_adapters_and_resumes() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("lora-experts");
    let model = dir.join("tiny-mixtral");
    std::fs::create_dir_all(&model).unwrap();
    let model_json = serde_json::json!({
        "architectures": ["MixtralForCausalLM"], "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
        "num_experts_per_tok": 2, "max_position_embeddings": 64, "eos_token_id": 1, "bos_token_id": 1
    });
    std::fs::write(model.join("config.json"), model_json.to_string()).unwrap();
    let lora = "[lora]\nrank = 4\nalpha = 8.0\ntargets = [\"q_proj\"]\ntarget_parameters = [\"mlp.experts.gate_up_proj\", \"mlp.experts.down_proj\", \"mlp.gate.weight\"]\nquantized_base = true\n";
    let run = dir.join("run");
    let sets = ["train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=60", "train.log_every=20", "eval.every=0", "optim.lr=1e-2", "train.checkpoint_every=30"];
    let cfg = config(&model, &run, lora, &sets);
    let summary = odpo_trainer::train_on(&cfg, data(128, 32), &device(), false, None).expect("training");
    let (start, end) = (summary.eval_start.expect("start"), summary.eval_end.expect("end"));
    println!("LoRA on the experts: eval loss {} -> {}, accuracy {} -> {}", start["loss"], end["loss"], start["rewards/accuracies"], end["rewards/accuracies"]);
    assert!(end["loss"] < start["loss"] - 0.2, "eval loss {} -> {}", start["loss"], end["loss"]);

    // PEFT's files: the experts' stacks and the routers by their names in the layer.
    let peft: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(peft["target_parameters"], serde_json::json!(["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]));
    assert_eq!(peft["target_modules"], serde_json::json!(["q_proj"]));
    let model_cfg = ModelConfig::from_file(&model.join("config.json")).unwrap();
    let base = CausalLm::random_with(&model_cfg, cfg.train.seed, &device(), true).unwrap();
    let (adapted, loaded) = base.load_peft(&run.join("adapter"), &device()).unwrap();
    assert_eq!(loaded.target_parameters.len(), 3);
    let merged = CausalLm::load(&run.join("model"), &device()).unwrap().model;
    let ids = Tensor::<2, Int>::from_data(TensorData::new((0..24).map(|i| (i * 7 % 60 + 2) as i64).collect::<Vec<_>>(), [2, 12]), &device());
    let mask = Tensor::<2, Int>::ones([2, 12], &device());
    let logits = |m: &CausalLm| m.forward(ids.clone(), &mask, None).into_data().try_to_vec::<f32>().unwrap();
    let (a, b, c) = (logits(&adapted), logits(&merged), logits(&adapted.without_adapters()));
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    let moved = a.iter().zip(&c).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    println!("adapters vs merged export: max |diff| {diff:.2e}; adapters move the logits by {moved:.3}");
    assert!(diff < 1e-4, "the experts' adapters on the base and the merged export differ by {diff}");
    assert!(moved > 1e-2, "the adapters did not change the model ({moved})");

    // Cut at step 30 and resumed: the same export and adapters as the uninterrupted run.
    let (whole, adapters) = (exported(&run), std::fs::read(run.join("adapter/adapter_model.safetensors")).unwrap());
    let ckpts = odpo_trainer::checkpoint::list(&run).unwrap();
    std::fs::remove_dir_all(ckpts.last().unwrap()).unwrap();
    std::fs::remove_dir_all(run.join("model")).unwrap();
    std::fs::remove_dir_all(run.join("adapter")).unwrap();
    let resumed = odpo_trainer::train_on(&cfg, data(128, 32), &device(), true, None).expect("resumed run");
    assert_eq!(resumed.resumed_from, Some(30));
    assert!(exported(&run) == whole, "the resumed run differs from the uninterrupted one");
    assert!(std::fs::read(run.join("adapter/adapter_model.safetensors")).unwrap() == adapters, "the resumed run's adapters differ");
}
