//! `metrics.jsonl` and `metrics.csv` in the run folder: one row per log or evaluation, keyed by step
//! and split (`train` or `eval`).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};

/// One row: a step, a split and named values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    /// Optimizer steps done when the row was taken.
    pub step: usize,
    /// `train` or `eval`.
    pub split: &'static str,
    /// Values by name (loss-crate names such as `rewards/accuracies`, and `lr`, `grad_norm`, ...).
    pub values: BTreeMap<String, f64>,
}

/// Appends rows to both files (and to a TensorBoard event file when asked), flushing each.
pub struct MetricsWriter {
    jsonl: File,
    csv: File,
    columns: Vec<String>,
    jsonl_path: PathBuf,
    tensorboard: Option<crate::tensorboard::EventWriter>,
    #[cfg(feature = "dashboard")]
    burn_train: Option<crate::dashboard::BurnTrainLog>,
    #[cfg(feature = "dashboard")]
    dashboard: Option<crate::dashboard::Dashboard>,
}

impl MetricsWriter {
    /// Opens the files in `run_dir`. With `resume_step`, rows after that step (written by the run that
    /// was killed after its last checkpoint) are dropped, so the resumed run does not repeat them;
    /// otherwise the files start empty. `columns` fixes the CSV header (after `step,split`); on a
    /// resume, the names of the kept rows that `columns` lacks follow them, so that a run resumed
    /// with a metric switched off keeps its earlier values in the CSV too.
    pub fn open(run_dir: &Path, columns: Vec<String>, resume_step: Option<usize>) -> Result<Self> {
        Self::open_with(run_dir, columns, resume_step, &[])
    }

    /// [`MetricsWriter::open`], also writing every row to the sinks of `output.report_to`
    /// (TensorBoard's rewritten from the kept rows on resume, like the other two files).
    ///
    /// The kept rows replace the files whole (a temporary file and a rename), so a run stopped
    /// while it resumes still has them.
    pub fn open_with(run_dir: &Path, mut columns: Vec<String>, resume_step: Option<usize>, report_to: &[crate::config::ReportTo]) -> Result<Self> {
        let tensorboard = report_to.contains(&crate::config::ReportTo::Tensorboard);
        let jsonl_path = run_dir.join("metrics.jsonl");
        let csv_path = run_dir.join("metrics.csv");
        // The kept lines as they were written, each beside its row.
        let kept: Vec<(String, Row)> = match resume_step {
            Some(step) => read_lines(&jsonl_path)?.into_iter().filter_map(|l| parse_row(&l).filter(|r| r.step <= step).map(|r| (l, r))).collect(),
            None => Vec::new(),
        };
        for (_, row) in &kept {
            for name in row.values.keys() {
                if !columns.contains(name) {
                    columns.push(name.clone());
                }
            }
        }
        let mut jsonl = String::new();
        let mut csv = format!("step,split,{}\n", columns.join(","));
        for (line, row) in &kept {
            // The kept lines are written again as they were, so their values stay those written, to the bit.
            jsonl.push_str(line);
            jsonl.push('\n');
            csv.push_str(&csv_line(&columns, row));
        }
        odpo_model::weights::write_atomic(&jsonl_path, jsonl.as_bytes())?;
        odpo_model::weights::write_atomic(&csv_path, csv.as_bytes())?;
        let append = |p: &Path| OpenOptions::new().append(true).open(p).map_err(|e| TrainError::io(p, e));
        let tensorboard = if tensorboard { Some(crate::tensorboard::EventWriter::create(&run_dir.join("tensorboard"))?) } else { None };
        let mut w = Self {
            jsonl: append(&jsonl_path)?,
            csv: append(&csv_path)?,
            columns,
            jsonl_path,
            tensorboard,
            #[cfg(feature = "dashboard")]
            burn_train: report_to.contains(&crate::config::ReportTo::BurnTrain).then(|| crate::dashboard::BurnTrainLog::create(&run_dir.join("burn-train"))),
            #[cfg(feature = "dashboard")]
            dashboard: None,
        };
        for (_, row) in &kept {
            w.send_to_sinks(row)?;
        }
        Ok(w)
    }

    /// Appends a row.
    pub fn write(&mut self, row: &Row) -> Result<()> {
        let mut obj = serde_json::Map::new();
        obj.insert("step".into(), row.step.into());
        obj.insert("split".into(), row.split.into());
        for (k, v) in &row.values {
            obj.insert(k.clone(), serde_json::Number::from_f64(*v).map(Into::into).unwrap_or(serde_json::Value::Null));
        }
        let line = serde_json::Value::Object(obj).to_string();
        let csv = csv_line(&self.columns, row);
        let p = self.jsonl_path.clone();
        writeln!(self.jsonl, "{line}").and_then(|_| self.jsonl.flush()).map_err(|e| TrainError::io(&p, e))?;
        let p = p.with_file_name("metrics.csv");
        self.csv.write_all(csv.as_bytes()).and_then(|_| self.csv.flush()).map_err(|e| TrainError::io(&p, e))?;
        self.send_to_sinks(row)
    }

    /// Hands a row to the sinks of `output.report_to` and to the dashboard.
    fn send_to_sinks(&mut self, row: &Row) -> Result<()> {
        if let Some(tb) = &mut self.tensorboard {
            tb.scalars(row.step, row.split, row.values.iter().filter(|(_, v)| v.is_finite()))?;
        }
        #[cfg(feature = "dashboard")]
        if let Some(log) = &mut self.burn_train {
            log.row(row.split, &row.values)?;
        }
        #[cfg(feature = "dashboard")]
        if let Some(d) = &mut self.dashboard {
            d.row(row.step, row.split, &row.values);
        }
        Ok(())
    }

    /// Shows every row from now on in burn-train's dashboard (`output.dashboard`), when stdout is a
    /// terminal; returns whether it is up. `at`: the step the run starts from.
    pub fn open_dashboard(&mut self, run_dir: &Path, total_steps: usize, at: usize) -> Result<bool> {
        #[cfg(feature = "dashboard")]
        {
            self.dashboard = crate::dashboard::Dashboard::open(run_dir, total_steps, at)?;
            Ok(self.dashboard.is_some())
        }
        #[cfg(not(feature = "dashboard"))]
        {
            let _ = (run_dir, total_steps, at);
            Ok(false)
        }
    }

    /// Whether the dashboard's user asked the run to stop.
    pub fn stop_requested(&self) -> bool {
        #[cfg(feature = "dashboard")]
        {
            self.dashboard.as_ref().is_some_and(crate::dashboard::Dashboard::stop_requested)
        }
        #[cfg(not(feature = "dashboard"))]
        false
    }
}

/// The values of the `eval` row at `step` in a run folder's `metrics.jsonl`, where there is one,
/// to the bit (a value written as `null`, not a number, is NaN).
pub fn eval_row(run_dir: &Path, step: usize) -> Result<Option<BTreeMap<String, f64>>> {
    let row = read_lines(&run_dir.join("metrics.jsonl"))?.into_iter().rev().map(|l| fields(&l)).find(|f| {
        let has = |key: &str, want: &dyn Fn(&Field) -> bool| f.iter().any(|(k, v)| k == key && want(v));
        has("split", &|v| matches!(v, Field::Text(t) if t == "eval")) && has("step", &|v| matches!(v, Field::Number(x) if *x == step as f64))
    });
    Ok(row.map(|f| {
        f.into_iter()
            .filter_map(|(k, v)| match v {
                Field::Number(x) if k != "step" => Some((k, x)),
                _ => None,
            })
            .collect()
    }))
}

/// A field of a metrics line.
#[derive(Debug, PartialEq)]
enum Field {
    /// A number (`null`, what [`MetricsWriter::write`] writes for one that is not finite: NaN).
    Number(f64),
    /// A string (`split`).
    Text(String),
}

/// The fields of a metrics line. The lines [`MetricsWriter::write`] wrote (a flat object, no
/// spaces) have their numbers parsed from their digits, exactly: serde_json's own parse of a
/// float can be a unit in the last place off, and a resume writes the kept rows again. Another
/// line is read through serde_json.
fn fields(line: &str) -> Vec<(String, Field)> {
    exact_fields(line).unwrap_or_else(|| {
        let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).unwrap_or_default();
        v.into_iter()
            .filter_map(|(k, x)| match x {
                serde_json::Value::Number(n) => Some((k, Field::Number(n.as_f64()?))),
                serde_json::Value::Null => Some((k, Field::Number(f64::NAN))),
                serde_json::Value::String(t) => Some((k, Field::Text(t))),
                _ => None,
            })
            .collect()
    })
}

fn exact_fields(line: &str) -> Option<Vec<(String, Field)>> {
    // A JSON string at the start of `s`, and what follows it.
    fn string(s: &str) -> Option<(String, &str)> {
        let bytes = s.as_bytes();
        if bytes.first() != Some(&b'"') {
            return None;
        }
        let mut i = 1;
        while i < bytes.len() && bytes[i] != b'"' {
            i += if bytes[i] == b'\\' { 2 } else { 1 };
        }
        let end = s.get(..=i)?;
        Some((serde_json::from_str(end).ok()?, &s[i + 1..]))
    }
    let mut rest = line.trim().strip_prefix('{')?.strip_suffix('}')?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (key, after) = string(rest)?;
        let after = after.strip_prefix(':')?;
        let (value, after) = if after.starts_with('"') {
            let (text, after) = string(after)?;
            (Field::Text(text), after)
        } else {
            let end = after.find(',').unwrap_or(after.len());
            let token = &after[..end];
            (Field::Number(if token == "null" { f64::NAN } else { token.parse().ok()? }), &after[end..])
        };
        out.push((key, value));
        rest = match after.strip_prefix(',') {
            Some(next) if !next.is_empty() => next,
            None if after.is_empty() => after,
            _ => return None,
        };
    }
    Some(out)
}

/// A CSV line of `row`: step, split and its value of each column (empty where it has none).
fn csv_line(columns: &[String], row: &Row) -> String {
    let cells: Vec<String> = columns.iter().map(|c| row.values.get(c).map(|v| v.to_string()).unwrap_or_default()).collect();
    format!("{},{},{}\n", row.step, row.split, cells.join(","))
}

/// The row a metrics line holds; `None` for a line that is not one (cut short by a kill mid-write).
fn parse_row(line: &str) -> Option<Row> {
    let mut row = Row::default();
    let mut step = false;
    for (k, field) in fields(line) {
        match (k.as_str(), field) {
            // A step count: a whole number, not below 0.
            ("step", Field::Number(x)) if x >= 0.0 && x.fract() == 0.0 => (row.step, step) = (x as usize, true),
            ("step", _) => return None,
            ("split", Field::Text(t)) => row.split = if t == "eval" { "eval" } else { "train" },
            (_, Field::Number(x)) => {
                row.values.insert(k, x);
            }
            _ => {}
        }
    }
    step.then_some(row)
}

fn read_lines(path: &Path) -> Result<Vec<String>> {
    match OpenOptions::new().read(true).open(path) {
        Ok(f) => BufReader::new(f).lines().collect::<std::io::Result<Vec<_>>>().map_err(|e| TrainError::io(path, e)),
        Err(_) => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_drops_rows_after_the_checkpoint() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| TrainError::io(std::env::temp_dir(), e))?;
        let dir = tmp.path();
        let cols = vec!["loss".to_string(), "lr".to_string()];
        let mut w = MetricsWriter::open(dir, cols.clone(), None)?;
        for step in 1..=4 {
            let values = BTreeMap::from([("loss".to_string(), step as f64 / 2.0)]);
            w.write(&Row { step, split: "train", values })?;
        }
        drop(w);
        let _w = MetricsWriter::open(dir, cols, Some(2))?;
        let jsonl = std::fs::read_to_string(dir.join("metrics.jsonl")).map_err(|e| TrainError::io(dir, e))?;
        assert_eq!(jsonl, "{\"loss\":0.5,\"split\":\"train\",\"step\":1}\n{\"loss\":1.0,\"split\":\"train\",\"step\":2}\n");
        let csv = std::fs::read_to_string(dir.join("metrics.csv")).map_err(|e| TrainError::io(dir, e))?;
        assert_eq!(csv, "step,split,loss,lr\n1,train,0.5,\n2,train,1,\n");
        Ok(())
    }

    /// A run resumed with a metric switched off keeps that metric's earlier values in the CSV (its
    /// column after the configured ones); one switched on leaves the earlier rows' cells empty. A
    /// line cut short by a kill mid-write is dropped.
    #[test]
    fn a_resume_with_other_columns_keeps_the_earlier_values() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| TrainError::io(std::env::temp_dir(), e))?;
        let dir = tmp.path();
        let cols = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let mut w = MetricsWriter::open(dir, cols(&["loss", "wpo/weight"]), None)?;
        for step in 1..=2 {
            let values = BTreeMap::from([("loss".to_string(), step as f64), ("wpo/weight".to_string(), 0.25 * step as f64)]);
            w.write(&Row { step, split: "train", values })?;
        }
        drop(w);
        let jsonl = dir.join("metrics.jsonl");
        let mut f = OpenOptions::new().append(true).open(&jsonl).map_err(|e| TrainError::io(&jsonl, e))?;
        f.write_all(b"{\"loss\":3.0,\"spl").map_err(|e| TrainError::io(&jsonl, e))?;
        drop(f);
        let mut w = MetricsWriter::open(dir, cols(&["loss", "lr"]), Some(5))?;
        w.write(&Row { step: 3, split: "train", values: BTreeMap::from([("loss".to_string(), 3.0), ("lr".to_string(), 0.5)]) })?;
        drop(w);
        let csv = std::fs::read_to_string(dir.join("metrics.csv")).map_err(|e| TrainError::io(dir, e))?;
        assert_eq!(csv, "step,split,loss,lr,wpo/weight\n1,train,1,,0.25\n2,train,2,,0.5\n3,train,3,0.5,\n");
        let lines = std::fs::read_to_string(&jsonl).map_err(|e| TrainError::io(&jsonl, e))?;
        assert_eq!(lines.lines().count(), 3, "{lines}");
        Ok(())
    }

    /// Values written, kept by a resume and read back are the values written, to the bit, NaN
    /// (`null`) included.
    #[test]
    fn kept_rows_and_the_last_evaluation_read_back_to_the_bit() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| TrainError::io(std::env::temp_dir(), e))?;
        let dir = tmp.path();
        // 2,000 doubles spread over the exponents and mantissas (xorshift bits, finite ones kept).
        let mut x = 0x9E37_79B9_7F4A_7C15_u64;
        let values: BTreeMap<String, f64> = (0..2000)
            .map(|i| {
                let v = loop {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let v = f64::from_bits(x);
                    if v.is_finite() {
                        break v;
                    }
                };
                (format!("m/{i}"), if i == 0 { f64::NAN } else { v })
            })
            .collect();
        let cols = vec!["loss".to_string()];
        let mut w = MetricsWriter::open(dir, cols.clone(), None)?;
        w.write(&Row { step: 7, split: "eval", values: values.clone() })?;
        drop(w);
        let before = std::fs::read(dir.join("metrics.jsonl")).map_err(|e| TrainError::io(dir, e))?;
        let _w = MetricsWriter::open(dir, cols, Some(7))?;
        assert!(std::fs::read(dir.join("metrics.jsonl")).map_err(|e| TrainError::io(dir, e))? == before, "a resume changed the kept row");
        let read = eval_row(dir, 7)?.unwrap_or_default();
        assert_eq!(read.len(), values.len());
        for (k, v) in &values {
            assert!(if v.is_nan() { read[k].is_nan() } else { read[k].to_bits() == v.to_bits() }, "{k}: {v:e} read back as {:e}", read[k]);
        }
        assert_eq!(eval_row(dir, 6)?, None);
        Ok(())
    }
}
