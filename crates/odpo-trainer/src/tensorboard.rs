//! TensorBoard event files (`[output] report_to = ["tensorboard"]`): every row of `metrics.jsonl` as
//! scalars tagged `train/<name>` or `eval/<name>`, in `<run>/tensorboard/events.out.tfevents.*`, which
//! `tensorboard --logdir runs` reads.
//!
//! The format is TensorFlow's record file of `Event` protocol buffers, written here by hand: no
//! maintained Rust crate writes it without pulling in a protobuf toolchain (`tensorboard-rs` is
//! unmaintained and builds its protos at compile time), and the part TensorBoard needs is three small
//! messages. Each record is `u64 length`, `masked crc32c(length)`, the bytes, `masked crc32c(bytes)`
//! (TensorFlow's `record_writer.cc`); an `Event` is `wall_time` (field 1, double), `step` (2, int64),
//! and `file_version` (3, string) or `summary` (5), a `Summary` holding `Value`s of `tag` (1, string)
//! and `simple_value` (2, float) (`event.proto`, `summary.proto`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};

/// Writes one run's event file.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created; earlier event files there are removed, so that a resumed run,
    /// which writes its kept rows again, shows each step once).
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        for entry in std::fs::read_dir(dir).map_err(|e| TrainError::io(dir, e))?.flatten() {
            if entry.file_name().to_string_lossy().starts_with("events.out.tfevents.") {
                std::fs::remove_file(entry.path()).map_err(|e| TrainError::io(entry.path(), e))?;
            }
        }
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let path = dir.join(format!("events.out.tfevents.{secs}.odpo"));
        let file = File::create(&path).map_err(|e| TrainError::io(&path, e))?;
        let mut w = Self { file: BufWriter::new(file), path };
        let mut event = event_header(wall_time(), 0);
        field_bytes(&mut event, 3, b"brain.Event:2");
        w.record(&event)?;
        Ok(w)
    }

    /// Writes `values` at `step` as scalars tagged `<split>/<name>`, and flushes.
    pub fn scalars<'a>(&mut self, step: usize, split: &str, values: impl IntoIterator<Item = (&'a String, &'a f64)>) -> Result<()> {
        let mut summary = Vec::new();
        for (name, v) in values {
            let mut value = Vec::new();
            field_bytes(&mut value, 1, format!("{split}/{name}").as_bytes());
            value.push((2 << 3) | 5); // simple_value: 32-bit float
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            field_bytes(&mut summary, 1, &value);
        }
        let mut event = event_header(wall_time(), step as i64);
        field_bytes(&mut event, 5, &summary);
        self.record(&event)?;
        self.file.flush().map_err(|e| TrainError::io(&self.path, e))
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut out = Vec::with_capacity(data.len() + 16);
        out.extend_from_slice(&len);
        out.extend_from_slice(&masked_crc(&len).to_le_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&out).map_err(|e| TrainError::io(&self.path, e))
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// An `Event` with its `wall_time` and `step`.
fn event_header(wall_time: f64, step: i64) -> Vec<u8> {
    let mut e = vec![(1 << 3) | 1]; // wall_time: 64-bit double
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(2 << 3); // step: varint
    varint(&mut e, step as u64);
    e
}

/// A length-delimited field (string, bytes or message).
fn field_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, (field << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// TensorFlow's masked CRC-32C.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}
