//! From a [`DataConfig`] to preference pairs with offsets: read the file in its format, apply the bad-row
//! policy, pair scored responses, compute each pair's offset, number prompts and pairs, and count what was
//! dropped and why.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;

use crate::config::{DataConfig, Format};
use crate::error::{DataError, Position, RowProblem};
use crate::jsonl::{self, BadRows};
use crate::pairs::{self, PairRow, PreferencePair, ScoredGroup, Text};
use crate::{paper, parquet};

/// Why a would-be pair was left out while loading (bad rows are reported separately, with their messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// Two responses to one prompt with equal scores (or a labelled pair with equal scores under an offset).
    Tie,
    /// A prompt with fewer than two responses: nothing to pair.
    LoneResponse,
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DropReason::Tie => "tied scores",
            DropReason::LoneResponse => "prompts with a single response",
        })
    }
}

/// Counts from loading.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadReport {
    /// Rows read and used (lines, parquet rows, or TL;DR responses).
    pub rows: usize,
    /// Distinct prompts among the kept rows.
    pub prompts: usize,
    /// Responses: scored responses for scored formats, two per row for pair formats.
    pub responses: usize,
    /// Pairs built.
    pub pairs: usize,
    /// Pairs (or prompts, for `LoneResponse`) left out, by reason.
    pub dropped: BTreeMap<DropReason, usize>,
    /// The message of every skipped bad row (`on_bad_row = "skip"`), in file order.
    pub skipped: Vec<String>,
    /// Pairs kept whose chosen and rejected texts are the same: they teach nothing (their gradient
    /// cancels) and usually mean a mistake upstream; reported, not dropped.
    pub identical: usize,
    /// Pairs kept whose row had no prompt, which is the start their chosen and rejected texts share
    /// (TRL's implicit prompt, as in hh-rlhf).
    pub implicit_prompts: usize,
}

impl LoadReport {
    /// Tied pairs dropped.
    pub fn ties(&self) -> usize {
        self.dropped.get(&DropReason::Tie).copied().unwrap_or(0)
    }
}

/// The first bytes of a gzip file. Sets on the HF hub such as hh-rlhf ship their JSONL gzipped
/// (`train.jsonl.gz`); such a file is read through gzip whatever its name.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A read error of a data file, a gzip file's marked as such.
fn read_error(path: &Path, gzip: bool, e: std::io::Error) -> DataError {
    let source = if gzip { std::io::Error::new(e.kind(), format!("gzip: {e}")) } else { e };
    DataError::Io { path: path.to_owned(), source }
}

/// A data file's bytes, gunzipped when they are gzip's.
fn gunzipped(path: &Path, bytes: Vec<u8>) -> Result<Vec<u8>, DataError> {
    if !bytes.starts_with(&GZIP_MAGIC) {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    MultiGzDecoder::new(&bytes[..]).read_to_end(&mut out).map_err(|e| read_error(path, true, e))?;
    Ok(out)
}

/// A data file's bytes, gunzipped when it is a gzip file.
fn read_data_file(path: &Path) -> Result<Vec<u8>, DataError> {
    gunzipped(path, std::fs::read(path).map_err(|e| read_error(path, false, e))?)
}

/// A data file's lines as they are read, through gzip when it is a gzip file, and whether it is one.
fn open_data_file(path: &Path) -> Result<(Box<dyn BufRead>, bool), DataError> {
    let file = std::fs::File::open(path).map_err(|e| read_error(path, false, e))?;
    let mut plain = BufReader::with_capacity(1 << 20, file);
    if plain.fill_buf().map_err(|e| read_error(path, false, e))?.starts_with(&GZIP_MAGIC) {
        Ok((Box::new(BufReader::with_capacity(1 << 20, MultiGzDecoder::new(plain))), true))
    } else {
        Ok((Box::new(plain), false))
    }
}

/// Pairs and the report of how they were made.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The pairs, in file order (pairs of one prompt together).
    pub pairs: Vec<PreferencePair>,
    /// Counts.
    pub report: LoadReport,
}

/// Reads, pairs and scores the configured file.
pub fn load(cfg: &DataConfig) -> Result<Loaded, DataError> {
    let mut pairs = Vec::new();
    let report = stream(cfg, usize::MAX, |chunk| {
        pairs.extend(chunk);
        Ok(())
    })?;
    Ok(Loaded { pairs, report })
}

/// [`load`] in parts of at most `chunk` pairs, each handed to `each` in file order, with the report
/// at the end. A `jsonl` file (gzipped or not) is streamed: read a line at a time, so that neither
/// the file nor more than `chunk` pairs are held at once (pair ids and prompt ids run on across
/// parts, as [`load`] numbers them). The other formats are read whole and handed over in one part:
/// parquet row groups, and the paper's files, whose responses are grouped by prompt.
pub fn stream(cfg: &DataConfig, chunk: usize, mut each: impl FnMut(Vec<PreferencePair>) -> Result<(), DataError>) -> Result<LoadReport, DataError> {
    cfg.validate()?;
    if cfg.format != Format::Jsonl {
        let bytes = std::fs::read(&cfg.path).map_err(|e| read_error(&cfg.path, false, e))?;
        let loaded = load_bytes(cfg, bytes)?;
        each(loaded.pairs)?;
        return Ok(loaded.report);
    }
    let path = cfg.path.as_path();
    let (mut reader, gzip) = open_data_file(path)?;
    let io = |e| read_error(path, gzip, e);
    let cols = cfg.columns();
    let mut bad = BadRows::new(cfg.on_bad_row).with_empty_completions(cfg.allow_empty_completions);
    let mut b = Builder { cfg, pairs: Vec::new(), report: LoadReport::default(), prompt_ids: HashMap::new(), next_id: 0 };
    let (mut line, mut line_no, mut rows) = (Vec::new(), 0, Vec::new());
    let limit = chunk.clamp(1, 1 << 16);
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).map_err(io)? == 0 {
            break;
        }
        line_no += 1;
        let mut text = line.strip_suffix(b"\n").unwrap_or(&line);
        text = text.strip_suffix(b"\r").unwrap_or(text);
        if line_no == 1 {
            text = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(text);
        }
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if let Some(row) = bad.handle(jsonl::parse_pair_line(path, line_no, text, &cols, bad.allow_empty_completions))? {
            rows.push(row);
        }
        if rows.len() >= limit {
            b.add_rows(std::mem::take(&mut rows), &mut bad)?;
        }
        while b.pairs.len() >= chunk {
            let rest = b.pairs.split_off(chunk);
            each(std::mem::replace(&mut b.pairs, rest))?;
        }
    }
    b.add_rows(rows, &mut bad)?;
    while !b.pairs.is_empty() {
        let rest = b.pairs.split_off(chunk.min(b.pairs.len()));
        each(std::mem::replace(&mut b.pairs, rest))?;
    }
    b.finish(bad)
}

/// Every scored response of a scored format (`scored-jsonl`, `tldr-json`) after its prompt, as a pair
/// whose chosen and rejected sides are both the response (what SFT on every response trains on; the
/// rejected side is never read there), with the number of rows skipped under `on_bad_row = "skip"`.
pub fn load_responses(cfg: &DataConfig) -> Result<(Vec<PreferencePair>, usize), DataError> {
    cfg.validate()?;
    let bytes = read_data_file(&cfg.path)?;
    let mut bad = BadRows::new(cfg.on_bad_row).with_empty_completions(cfg.allow_empty_completions);
    let groups = match cfg.format {
        Format::ScoredJsonl => paper::read_scored_jsonl(&cfg.path, &bytes, &cfg.columns(), &mut bad)?,
        Format::TldrJson => paper::read_tldr(&cfg.path, &bytes, &mut bad)?,
        other => return Err(DataError::Config(format!("every response of a file needs a scored format (scored-jsonl, tldr-json); `format` is `{}`", other.name()))),
    };
    let mut responses = Vec::new();
    for (prompt_id, g) in groups.into_iter().enumerate() {
        for r in g.responses {
            responses.push(PreferencePair {
                id: responses.len(),
                prompt_id,
                prompt: g.prompt.clone(),
                chosen: r.text.clone(),
                rejected: r.text,
                score_chosen: Some(r.score),
                score_rejected: Some(r.score),
                offset: 0.0,
                weight: None,
                position: r.position,
            });
        }
    }
    Ok((responses, bad.skipped.len()))
}

/// [`load`] on bytes already in memory, gunzipped if they are gzip's (the file name in `cfg.path` is
/// used in messages only).
pub fn load_bytes(cfg: &DataConfig, bytes: Vec<u8>) -> Result<Loaded, DataError> {
    let path = cfg.path.as_path();
    let bytes = gunzipped(path, bytes)?;
    let cols = cfg.columns();
    let mut bad = BadRows::new(cfg.on_bad_row).with_empty_completions(cfg.allow_empty_completions);
    let mut b = Builder { cfg, pairs: Vec::new(), report: LoadReport::default(), prompt_ids: HashMap::new(), next_id: 0 };
    match cfg.format {
        Format::Jsonl => b.add_rows(jsonl::read_pairs(path, &bytes, &cols, &mut bad)?, &mut bad)?,
        Format::Parquet => b.add_rows(parquet::read_pairs(path, bytes.into(), &cols, &mut bad)?, &mut bad)?,
        Format::ScoredJsonl => b.add_groups(paper::read_scored_jsonl(path, &bytes, &cols, &mut bad)?, &mut bad)?,
        Format::TldrJson => b.add_groups(paper::read_tldr(path, &bytes, &mut bad)?, &mut bad)?,
    }
    let pairs = std::mem::take(&mut b.pairs);
    let report = b.finish(bad)?;
    Ok(Loaded { pairs, report })
}

struct Builder<'a> {
    cfg: &'a DataConfig,
    /// Pairs not yet handed over.
    pairs: Vec<PreferencePair>,
    report: LoadReport,
    prompt_ids: HashMap<String, usize>,
    /// The id of the next pair (pairs run on across the parts of a stream).
    next_id: usize,
}

impl Builder<'_> {
    /// The report, or the error of a file that gave no pair.
    fn finish(mut self, bad: BadRows) -> Result<LoadReport, DataError> {
        self.report.prompts = self.prompt_ids.len();
        self.report.pairs = self.next_id;
        self.report.skipped = bad.skipped;
        let report = self.report;
        if report.pairs == 0 {
            let why = format!(
                "{} rows used, {} skipped, {} ties, {} prompts with one response",
                report.rows,
                report.skipped.len(),
                report.ties(),
                report.dropped.get(&DropReason::LoneResponse).copied().unwrap_or(0)
            );
            return Err(DataError::NoPairs { path: self.cfg.path.clone(), why });
        }
        Ok(report)
    }

    fn next_pair_id(&mut self) -> usize {
        self.next_id += 1;
        self.next_id - 1
    }

    fn prompt_id(&mut self, prompt: &Text) -> usize {
        let n = self.prompt_ids.len();
        *self.prompt_ids.entry(prompt.key()).or_insert(n)
    }

    fn drop(&mut self, why: DropReason, n: usize) {
        if n > 0 {
            *self.report.dropped.entry(why).or_insert(0) += n;
        }
    }

    /// Chat messages need the tokenizer's template; say so at the row rather than at tokenization.
    fn check_messages(&self, texts: [(&Text, &str); 3], position: &Position) -> Result<(), DataError> {
        if self.cfg.chat_template {
            return Ok(());
        }
        for (t, field) in texts {
            if matches!(t, Text::Messages(_)) {
                return Err(DataError::row(
                    &self.cfg.path,
                    position.clone(),
                    Some(field),
                    RowProblem::BadMessages("a chat message list needs `chat_template = true` in the data config".into()),
                ));
            }
        }
        Ok(())
    }

    /// The offset of a pair, or `None` when it must be dropped as a tie.
    fn offset(&self, scores: (Option<f64>, Option<f64>), position: &Position, fields: (&str, &str)) -> Result<Option<f64>, DataError> {
        let Some(oc) = &self.cfg.offset else { return Ok(Some(0.0)) };
        let row_err = |field: &str, p| DataError::row(&self.cfg.path, position.clone(), Some(field), p);
        let (Some(w), Some(l)) = scores else {
            let field = if scores.0.is_none() { fields.0 } else { fields.1 };
            return Err(row_err(field, RowProblem::ScoreNeeded));
        };
        if w == l {
            return Ok(None);
        }
        oc.offset(self.next_id, w, l).map(Some).map_err(|e| row_err(fields.0, RowProblem::Offset(e.to_string())))
    }

    fn add_rows(&mut self, rows: Vec<PairRow>, bad: &mut BadRows) -> Result<(), DataError> {
        let cols = self.cfg.columns();
        for r in rows {
            let checked = self.check_messages(
                [(&r.prompt, &cols.prompt), (&r.chosen, &cols.chosen), (&r.rejected, &cols.rejected)],
                &r.position,
            );
            let offset = checked.and_then(|()| {
                self.offset((r.score_chosen, r.score_rejected), &r.position, (&cols.score_chosen, &cols.score_rejected))
            });
            let Some(offset) = bad.handle(offset)? else { continue };
            self.report.rows += 1;
            self.report.responses += 2;
            let Some(offset) = offset else {
                self.drop(DropReason::Tie, 1);
                continue;
            };
            let prompt_id = self.prompt_id(&r.prompt);
            self.report.identical += usize::from(r.chosen == r.rejected);
            self.report.implicit_prompts += usize::from(r.implicit_prompt);
            let id = self.next_pair_id();
            self.pairs.push(PreferencePair {
                id,
                prompt_id,
                prompt: r.prompt,
                chosen: r.chosen,
                rejected: r.rejected,
                score_chosen: r.score_chosen,
                score_rejected: r.score_rejected,
                offset,
                weight: r.weight,
                position: r.position,
            });
        }
        Ok(())
    }

    fn add_groups(&mut self, groups: Vec<ScoredGroup>, bad: &mut BadRows) -> Result<(), DataError> {
        let cols = self.cfg.columns();
        let mut rng = pairs::rng(self.cfg.seed);
        for g in groups {
            // Each row is checked alone so that a skipped row leaves the rest of its group.
            let mut kept = Vec::with_capacity(g.responses.len());
            for r in g.responses {
                let ok = self.check_messages([(&g.prompt, &cols.prompt), (&r.text, &cols.text), (&r.text, &cols.text)], &r.position);
                if bad.handle(ok)?.is_some() {
                    kept.push(r);
                }
            }
            if kept.is_empty() {
                continue;
            }
            self.report.rows += kept.len();
            self.report.responses += kept.len();
            let prompt_id = self.prompt_id(&g.prompt);
            if kept.len() < 2 {
                self.drop(DropReason::LoneResponse, 1);
                continue;
            }
            let scores: Vec<f64> = kept.iter().map(|r| r.score).collect();
            let (idx, ties) = pairs::pair_indices(&scores, self.cfg.pairing(), &mut rng);
            self.drop(DropReason::Tie, ties);
            for (w, l) in idx {
                let (rw, rl) = (&kept[w], &kept[l]);
                let offset = self.offset((Some(rw.score), Some(rl.score)), &rw.position, (&cols.score, &cols.score));
                // Scores differ here, so `None` (a tie) cannot come back.
                let Some(Some(offset)) = bad.handle(offset)? else { continue };
                self.report.identical += usize::from(rw.text == rl.text);
                let id = self.next_pair_id();
                self.pairs.push(PreferencePair {
                    id,
                    prompt_id,
                    prompt: g.prompt.clone(),
                    chosen: rw.text.clone(),
                    rejected: rl.text.clone(),
                    score_chosen: Some(rw.score),
                    score_rejected: Some(rl.score),
                    offset,
                    weight: None,
                    position: rw.position.clone(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::OnBadRow;
    use odpo_loss::offset::OffsetConfig;

    fn cfg(format: Format) -> DataConfig {
        let mut c = DataConfig::new("mem.jsonl", format);
        c.offset = Some(OffsetConfig { alpha: 0.5, ..OffsetConfig::default() });
        c
    }

    /// A streamed file in parts of any size is the file read whole: the same pairs, ids, prompt ids,
    /// offsets and report (a BOM, CRLF endings, blank lines, a skipped bad row, a tie and a last line
    /// with no newline included); every part but the last holds exactly `chunk` pairs.
    #[test]
    fn streaming_in_parts_equals_reading_whole() {
        let mut text = String::from("\u{FEFF}");
        for i in 0..23 {
            text.push_str(&format!("{{\"prompt\":\"p{}\",\"chosen\":\"c{i}\",\"rejected\":\"r{i}\",\"score_chosen\":{},\"score_rejected\":1}}\r\n", i % 5, 2 + i % 3));
            if i == 7 {
                text.push_str("\n{\"prompt\":\"p1\"}\n");
            }
            if i == 12 {
                // A tie under the offset: a row that gives no pair.
                text.push_str("{\"prompt\":\"p2\",\"chosen\":\"t\",\"rejected\":\"u\",\"score_chosen\":1,\"score_rejected\":1}\n");
            }
        }
        text.push_str("{\"prompt\":\"p9\",\"chosen\":\"last\",\"rejected\":\"x\",\"score_chosen\":5,\"score_rejected\":1}");
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("stream.jsonl");
        std::fs::write(&path, &text).unwrap();
        let mut cfg = DataConfig::new(&path, Format::Jsonl);
        cfg.on_bad_row = OnBadRow::Skip;
        cfg.offset = Some(OffsetConfig::default());
        let whole = load_bytes(&cfg, text.clone().into_bytes()).unwrap();
        assert_eq!((whole.pairs.len(), whole.report.skipped.len(), whole.report.prompts, whole.report.ties()), (24, 1, 6, 1));
        for chunk in [1, 3, 7, usize::MAX] {
            let mut parts = Vec::new();
            let report = stream(&cfg, chunk, |p| {
                assert!(!p.is_empty() && p.len() <= chunk);
                parts.push(p);
                Ok(())
            })
            .unwrap();
            assert_eq!(parts.len(), 24usize.div_ceil(chunk.min(24)), "chunk {chunk}");
            let streamed: Vec<PreferencePair> = parts.into_iter().flatten().collect();
            assert_eq!(format!("{streamed:?}"), format!("{:?}", whole.pairs), "chunk {chunk}");
            assert_eq!(format!("{report:?}"), format!("{:?}", whole.report), "chunk {chunk}");
        }
    }

    #[test]
    fn pairs_with_the_same_chosen_and_rejected_are_counted() {
        let rows = "{\"prompt\":\"a\",\"chosen\":\"x\",\"rejected\":\"x\"}\n{\"prompt\":\"a\",\"chosen\":\"x\",\"rejected\":\"y\"}\n";
        let l = load_bytes(&DataConfig::new("mem.jsonl", Format::Jsonl), rows.as_bytes().to_vec()).unwrap();
        assert_eq!((l.pairs.len(), l.report.identical), (2, 1));
        // Scored: one prompt sampled the same text twice with different scores.
        let scored = "{\"prompt\":\"a\",\"text\":\"x\",\"reward\":1}\n{\"prompt\":\"a\",\"text\":\"x\",\"reward\":2}\n{\"prompt\":\"a\",\"text\":\"z\",\"reward\":3}\n";
        let l = load_bytes(&cfg(Format::ScoredJsonl), scored.as_bytes().to_vec()).unwrap();
        assert_eq!((l.pairs.len(), l.report.identical), (3, 1));
    }

    #[test]
    fn scored_lines_pair_with_offsets_and_ties() {
        let data = concat!(
            "{\"prompt\":\"a\",\"text\":\"x\",\"reward\":1.0}\n",
            "{\"prompt\":\"a\",\"text\":\"y\",\"reward\":4.0}\n",
            "{\"prompt\":\"b\",\"text\":\"z\",\"reward\":2.0}\n",
            "{\"prompt\":\"a\",\"text\":\"w\",\"reward\":4.0}\n",
        );
        let l = load_bytes(&cfg(Format::ScoredJsonl), data.as_bytes().to_vec()).unwrap();
        assert_eq!(l.pairs.len(), 2);
        assert_eq!(l.report.ties(), 1);
        assert_eq!(l.report.dropped[&DropReason::LoneResponse], 1);
        assert_eq!((l.report.prompts, l.report.responses), (2, 4));
        assert_eq!(l.pairs[0].chosen, Text::Plain("y".into()));
        assert!((l.pairs[0].offset - 0.5 * 3f64.ln()).abs() < 1e-15);
    }

    #[test]
    fn offset_needs_scores_and_skip_reports_rows() {
        let data = "{\"prompt\":\"a\",\"chosen\":\"x\",\"rejected\":\"y\"}\n{\"prompt\":\"a\",\"chosen\":\"x\",\"rejected\":\"y\",\"score_chosen\":3,\"score_rejected\":1}\n";
        let e = load_bytes(&cfg(Format::Jsonl), data.as_bytes().to_vec()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "mem.jsonl: line 1, field `score_chosen`: missing (the offset needs both scores; remove [data.offset] to train without offsets)"
        );
        let mut c = cfg(Format::Jsonl);
        c.on_bad_row = OnBadRow::Skip;
        let l = load_bytes(&c, data.as_bytes().to_vec()).unwrap();
        assert_eq!((l.pairs.len(), l.report.skipped.len()), (1, 1));
        c.offset = None;
        assert_eq!(load_bytes(&c, data.as_bytes().to_vec()).unwrap().pairs.len(), 2);
    }

    /// hh-rlhf's rows (no prompt; both sides hold the conversation) share their prompt id when their
    /// conversations start alike, and the report counts them.
    #[test]
    fn implicit_prompts_are_counted_and_grouped() {
        let hh = "\\n\\nHuman: Hi?\\n\\nAssistant:";
        let data = format!(
            "{{\"chosen\":\"{hh} Hello.\",\"rejected\":\"{hh} Go away.\"}}\n{{\"chosen\":\"{hh} Hi there.\",\"rejected\":\"{hh} No.\"}}\n{{\"prompt\":\"Q\",\"chosen\":\"a\",\"rejected\":\"b\"}}\n"
        );
        let l = load_bytes(&DataConfig::new("mem.jsonl", Format::Jsonl), data.into_bytes()).unwrap();
        assert_eq!((l.report.pairs, l.report.implicit_prompts, l.report.prompts), (3, 2, 2));
        assert_eq!(l.pairs[0].prompt, Text::Plain("\n\nHuman: Hi?\n\nAssistant:".into()));
        assert_eq!((l.pairs[0].prompt_id, l.pairs[1].prompt_id), (0, 0));
        assert_eq!(l.pairs[1].chosen, Text::Plain(" Hi there.".into()));
    }

    /// A gzipped file (two gzip members, as `cat a.gz b.gz` makes) reads as the plain file: streamed
    /// (jsonl) or whole (the scored formats); a cut one is an error naming the file and gzip.
    #[test]
    fn gzipped_files_read_as_the_plain_ones() {
        use std::io::Write;
        let gz = |text: &str| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(text.as_bytes()).unwrap();
            e.finish().unwrap()
        };
        let rows: String = (0..9).map(|i| format!("{{\"prompt\":\"p{}\",\"chosen\":\"c{i}\",\"rejected\":\"r{i}\"}}\n", i % 4)).collect();
        let (first, second) = rows.split_at(rows.len() / 2);
        let tmp = tempfile::tempdir().unwrap();
        let (plain, zipped) = (tmp.path().join("pairs.jsonl"), tmp.path().join("pairs.jsonl.gz"));
        std::fs::write(&plain, &rows).unwrap();
        std::fs::write(&zipped, [gz(first), gz(second)].concat()).unwrap();
        let (a, b) = (load(&DataConfig::new(&plain, Format::Jsonl)).unwrap(), load(&DataConfig::new(&zipped, Format::Jsonl)).unwrap());
        assert_eq!(a.pairs.len(), 9);
        assert_eq!((format!("{:?}", a.pairs), a.report), (format!("{:?}", b.pairs), b.report));

        let scored = "{\"prompt\":\"a\",\"text\":\"x\",\"reward\":1.0}\n{\"prompt\":\"a\",\"text\":\"y\",\"reward\":4.0}\n";
        let path = tmp.path().join("scored.gz");
        std::fs::write(&path, gz(scored)).unwrap();
        let l = load(&cfg_at(&path, Format::ScoredJsonl)).unwrap();
        assert_eq!((l.pairs.len(), &l.pairs[0].chosen), (1, &Text::Plain("y".into())));
        assert_eq!(load_responses(&cfg_at(&path, Format::ScoredJsonl)).unwrap().0.len(), 2);

        let cut = gz(&rows);
        std::fs::write(&zipped, &cut[..cut.len() / 2]).unwrap();
        let e = load(&DataConfig::new(&zipped, Format::Jsonl)).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: cannot read: gzip: ", zipped.display())), "{e}");
    }

    fn cfg_at(path: &Path, format: Format) -> DataConfig {
        let mut c = cfg(format);
        c.path = path.to_owned();
        c
    }
}
