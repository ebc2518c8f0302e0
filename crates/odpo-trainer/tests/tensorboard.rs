//! `[output] report_to = ["tensorboard"]`: the event file, read back by a parser written here from
//! TensorFlow's record format and the `Event` / `Summary` protos (its own bitwise CRC-32C, its own
//! protobuf decoding), holds every value of `metrics.jsonl` at its step, as float32.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::*;

/// CRC-32C (Castagnoli), bit by bit.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

fn masked(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(b: &[u8], at: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let byte = b[*at];
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return v;
        }
        shift += 7;
    }
}

/// The fields of one protobuf message: (field number, wire type, payload bytes or the varint's value).
fn fields(b: &[u8]) -> Vec<(u64, u64, Vec<u8>, u64)> {
    let (mut at, mut out) = (0, Vec::new());
    while at < b.len() {
        let key = varint(b, &mut at);
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = varint(b, &mut at);
                out.push((field, wire, Vec::new(), v));
            }
            1 => {
                out.push((field, wire, b[at..at + 8].to_vec(), 0));
                at += 8;
            }
            2 => {
                let n = varint(b, &mut at) as usize;
                out.push((field, wire, b[at..at + n].to_vec(), 0));
                at += n;
            }
            5 => {
                out.push((field, wire, b[at..at + 4].to_vec(), 0));
                at += 4;
            }
            w => panic!("unexpected wire type {w}"),
        }
    }
    out
}

#[test]
fn event_file_holds_every_metric_at_its_step() {
    let dir = scratch("tensorboard");
    let model = tiny_model(&dir);
    let run = dir.join("run");
    let cfg = config(&model, &run, "", &["train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=6", "train.log_every=2", "eval.every=3", "output.report_to=[\"tensorboard\"]"]);
    odpo_trainer::train_on(&cfg, data(32, 8), &odpo_model::backend::device("flex").unwrap(), false, None).unwrap();

    let files: Vec<_> = std::fs::read_dir(run.join("tensorboard")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."));
    let bytes = std::fs::read(&files[0]).unwrap();
    let (mut at, mut events) = (0, Vec::new());
    while at < bytes.len() {
        let len = &bytes[at..at + 8];
        assert_eq!(u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()), masked(crc32c(len)), "length checksum");
        let n = u64::from_le_bytes(len.try_into().unwrap()) as usize;
        let data = &bytes[at + 12..at + 12 + n];
        assert_eq!(u32::from_le_bytes(bytes[at + 12 + n..at + 16 + n].try_into().unwrap()), masked(crc32c(data)), "data checksum");
        events.push(data.to_vec());
        at += 16 + n;
    }
    assert_eq!(at, bytes.len());
    // The first event names the file version; every other holds a summary at a step.
    let first = fields(&events[0]);
    assert!(first.iter().any(|f| f.0 == 3 && f.2 == b"brain.Event:2"), "{first:?}");
    let mut got: BTreeMap<(u64, String), f32> = BTreeMap::new();
    for e in &events[1..] {
        let f = fields(e);
        let wall = f.iter().find(|x| x.0 == 1).map(|x| f64::from_le_bytes(x.2.clone().try_into().unwrap())).unwrap();
        assert!(wall > 1.7e9, "wall time {wall}");
        let step = f.iter().find(|x| x.0 == 2).map_or(0, |x| x.3);
        let summary = &f.iter().find(|x| x.0 == 5).expect("summary").2;
        for value in fields(summary).into_iter().filter(|x| x.0 == 1) {
            let v = fields(&value.2);
            let tag = String::from_utf8(v.iter().find(|x| x.0 == 1).unwrap().2.clone()).unwrap();
            let x = f32::from_le_bytes(v.iter().find(|x| x.0 == 2 && x.1 == 5).unwrap().2.clone().try_into().unwrap());
            got.insert((step, tag), x);
        }
    }
    // Every finite value of metrics.jsonl, as train/<name> or eval/<name> at its step.
    let mut want = 0;
    for split in ["train", "eval"] {
        for row in metric_rows(&run, split) {
            let step = row["step"].as_u64().unwrap();
            for (k, v) in row.as_object().unwrap() {
                let Some(v) = v.as_f64().filter(|_| k != "step") else { continue };
                let tb = got.get(&(step, format!("{split}/{k}"))).unwrap_or_else(|| panic!("{split}/{k} at step {step} missing"));
                // float32 of the value (serde_json's float parsing may differ from the written f64 in
                // the last place, which can move the f32 by one place too).
                assert!((f64::from(*tb) - v).abs() <= 1e-6 * v.abs().max(1e-12), "{split}/{k} at step {step}: {tb} vs {v}");
                want += 1;
            }
        }
    }
    assert_eq!(got.len(), want);
    assert!(got.contains_key(&(6, "train/loss".into())) && got.contains_key(&(3, "eval/rewards/accuracies".into())));
}

/// `[output] report_to = ["burn-train"]`: burn-train's file metric logger writes every value of
/// `metrics.jsonl`, per split and data epoch, one file per metric (`rewards/accuracies` is
/// `rewards.accuracies.log`), in order and exactly.
#[test]
fn burn_train_files_hold_every_logged_value() {
    let dir = scratch("burn-train");
    let model = tiny_model(&dir);
    let run = dir.join("run");
    // 32 pairs, 8 a step: 4 steps an epoch, so 10 steps span 3 epochs.
    let cfg = config(&model, &run, "", &["train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=10", "train.log_every=2", "eval.every=4", "output.report_to=[\"burn-train\"]"]);
    odpo_trainer::train_on(&cfg, data(32, 8), &odpo_model::backend::device("flex").unwrap(), false, None).unwrap();

    let mut want: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for line in std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let split = if v["split"] == "eval" { "valid" } else { "train" };
        for (k, x) in v.as_object().unwrap() {
            if let Some(x) = x.as_f64().filter(|_| k != "step") {
                want.entry((split.to_string(), k.replace('/', "."))).or_default().push(x);
            }
        }
    }
    let mut got: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let mut epochs = 0;
    for split in ["train", "valid"] {
        let mut folders: Vec<_> = std::fs::read_dir(run.join("burn-train").join(split)).unwrap().map(|e| e.unwrap().path()).collect();
        folders.sort_by_key(|p| p.file_name().unwrap().to_string_lossy().trim_start_matches("epoch-").parse::<usize>().unwrap());
        if split == "train" {
            epochs = folders.len();
        }
        for folder in folders {
            for file in std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().path()) {
                let name = file.file_name().unwrap().to_string_lossy().trim_end_matches(".log").to_string();
                if name == "epoch" && split == "valid" {
                    continue;
                }
                let values = std::fs::read_to_string(&file).unwrap().lines().map(|l| l.parse::<f64>().unwrap()).collect::<Vec<_>>();
                got.entry((split.to_string(), name)).or_default().extend(values);
            }
        }
    }
    assert_eq!(epochs, 3, "train rows of 3 data epochs");
    assert!(want.contains_key(&("train".into(), "rewards.accuracies".into())) && want.contains_key(&("valid".into(), "loss".into())));
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    // Equal up to the last bit serde_json's float parsing may lose reading metrics.jsonl back.
    for (key, w) in &want {
        let g = &got[key];
        assert!(g.len() == w.len() && g.iter().zip(w).all(|(a, b)| (a - b).abs() <= 1e-14 * b.abs().max(1.0)), "{key:?}: {g:?} against {w:?}");
    }
}
