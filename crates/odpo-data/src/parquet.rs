//! Parquet files of preference pairs as HF datasets publish them (same columns as the JSONL layout; chat
//! messages as `list<struct<content, role>>`). Read through the parquet crate's record API, row group by row
//! group, each row turned into the JSON object the JSONL reader checks, so both formats give the same errors.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use bytes::Bytes;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use serde_json::{Map, Number, Value};

use crate::config::Columns;
use crate::error::{DataError, Position, RowProblem};
use crate::jsonl::{BadRows, pair_from_object};
use crate::pairs::PairRow;

/// A parquet value as JSON; a non-finite float or non-UTF-8 bytes are row problems.
fn to_json(f: &Field) -> Result<Value, RowProblem> {
    let float = |x: f64| Number::from_f64(x).map(Value::Number).ok_or_else(|| RowProblem::NotFinite(x.to_string()));
    Ok(match f {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(n) => (*n).into(),
        Field::Short(n) => (*n).into(),
        Field::Int(n) => (*n).into(),
        Field::Long(n) => (*n).into(),
        Field::UByte(n) => (*n).into(),
        Field::UShort(n) => (*n).into(),
        Field::UInt(n) => (*n).into(),
        Field::ULong(n) => (*n).into(),
        Field::Float16(x) => float(f64::from(*x))?,
        Field::Float(x) => float(f64::from(*x))?,
        Field::Double(x) => float(*x)?,
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_owned()),
            Err(e) => return Err(RowProblem::InvalidUtf8(e.valid_up_to())),
        },
        Field::Group(row) => Value::Object(row_to_object(row).map_err(|(_, p)| p)?),
        Field::ListInternal(list) => Value::Array(list.elements().iter().map(to_json).collect::<Result<_, _>>()?),
        // Dates, times, decimals and maps never hold text or scores here; their display form is enough to be
        // reported as the wrong type.
        other => Value::String(other.to_string()),
    })
}

/// A row as a JSON object; the error names the top-level column.
fn row_to_object(row: &Row) -> Result<Map<String, Value>, (String, RowProblem)> {
    let mut m = Map::new();
    for (name, field) in row.get_column_iter() {
        m.insert(name.clone(), to_json(field).map_err(|p| (name.clone(), p))?);
    }
    Ok(m)
}

fn parquet_err(path: &Path, position: Position, message: impl ToString) -> DataError {
    DataError::Parquet { path: path.to_owned(), position, message: message.to_string() }
}

/// Reads parquet pairs from the file's bytes, applying the bad-row policy to rows. A file or row group the
/// parquet crate cannot decode stops the read (there is no row to skip to); a panic inside the parquet crate
/// on a corrupt file is caught and reported the same way.
pub fn read_pairs(path: &Path, bytes: Bytes, cols: &Columns, bad: &mut BadRows) -> Result<Vec<PairRow>, DataError> {
    match catch_unwind(AssertUnwindSafe(|| read_pairs_inner(path, bytes, cols, bad))) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(parquet_err(path, Position::File, format!("corrupt file (the parquet reader failed: {msg})")))
        }
    }
}

fn read_pairs_inner(path: &Path, bytes: Bytes, cols: &Columns, bad: &mut BadRows) -> Result<Vec<PairRow>, DataError> {
    let reader = SerializedFileReader::new(bytes).map_err(|e| parquet_err(path, Position::File, e))?;
    let names: Vec<String> =
        reader.metadata().file_metadata().schema().get_fields().iter().map(|f| f.name().to_owned()).collect();
    for required in [&cols.prompt, &cols.chosen, &cols.rejected].into_iter().chain(cols.weight.as_ref()) {
        if !names.contains(required) {
            return Err(DataError::MissingColumn {
                path: path.to_owned(),
                column: required.clone(),
                available: names.join(", "),
            });
        }
    }
    let mut out = Vec::new();
    for group in 0..reader.num_row_groups() {
        let rg = reader.get_row_group(group).map_err(|e| parquet_err(path, Position::Row { group, row: 0 }, e))?;
        let rows = rg.get_row_iter(None).map_err(|e| parquet_err(path, Position::Row { group, row: 0 }, e))?;
        for (row_i, row) in rows.enumerate() {
            let position = Position::Row { group, row: row_i };
            let row = row.map_err(|e| parquet_err(path, position.clone(), e))?;
            let parsed = row_to_object(&row)
                .and_then(|obj| pair_from_object(&obj, cols, bad.allow_empty_completions, position.clone()))
                .map_err(|(field, p)| DataError::row(path, position.clone(), Some(&field), p));
            if let Some(p) = bad.handle(parsed)? {
                out.push(p);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use parquet::data_type::{ByteArray, ByteArrayType, DoubleType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    use super::*;
    use crate::config::OnBadRow;
    use crate::pairs::Text;

    /// A row of a flat file: prompt, chosen, rejected, score_chosen, score_rejected.
    pub(crate) type FlatRow<'a> = (&'a str, &'a str, &'a str, f64, f64);

    /// A flat parquet file (string prompt/chosen/rejected, double scores), one row group per slice of rows,
    /// snappy-compressed as HF publishes them.
    pub(crate) fn write_flat(groups: &[&[FlatRow]]) -> Vec<u8> {
        let schema = Arc::new(
            parse_message_type(
                "message schema { REQUIRED BYTE_ARRAY prompt (UTF8); REQUIRED BYTE_ARRAY chosen (UTF8);
                 REQUIRED BYTE_ARRAY rejected (UTF8); REQUIRED DOUBLE score_chosen; REQUIRED DOUBLE score_rejected; }",
            )
            .unwrap(),
        );
        let props =
            Arc::new(WriterProperties::builder().set_compression(parquet::basic::Compression::SNAPPY).build());
        let mut buf = Vec::new();
        let mut w = SerializedFileWriter::new(&mut buf, schema, props).unwrap();
        for rows in groups {
            let mut rg = w.next_row_group().unwrap();
            for c in 0..5 {
                let mut col = rg.next_column().unwrap().unwrap();
                if c < 3 {
                    let v: Vec<ByteArray> = rows
                        .iter()
                        .map(|r| ByteArray::from([r.0, r.1, r.2][c]))
                        .collect();
                    col.typed::<ByteArrayType>().write_batch(&v, None, None).unwrap();
                } else {
                    let v: Vec<f64> = rows.iter().map(|r| if c == 3 { r.3 } else { r.4 }).collect();
                    col.typed::<DoubleType>().write_batch(&v, None, None).unwrap();
                }
                col.close().unwrap();
            }
            rg.close().unwrap();
        }
        w.close().unwrap();
        buf
    }

    #[test]
    fn reads_rows_and_names_row_group_and_row() {
        let buf = write_flat(&[&[("p", "a", "b", 2.0, 1.0)], &[("q", "c", "d", 5.0, 1.0), ("r", "e", "f", f64::NAN, 0.0)]]);
        let path = Path::new("x.parquet");
        let e = read_pairs(path, Bytes::from(buf.clone()), &Columns::default(), &mut BadRows::new(OnBadRow::Error))
            .unwrap_err();
        assert_eq!(e.to_string(), "x.parquet: row group 1, row 1, field `score_chosen`: not a finite number (NaN)");
        let mut bad = BadRows::new(OnBadRow::Skip);
        let rows = read_pairs(path, Bytes::from(buf), &Columns::default(), &mut bad).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].chosen, Text::Plain("c".into()));
        assert_eq!(rows[1].score_chosen, Some(5.0));
        assert_eq!(bad.skipped.len(), 1);
    }

    #[test]
    fn missing_column_and_garbage_file() {
        let buf = write_flat(&[&[("p", "a", "b", 2.0, 1.0)]]);
        let cols = Columns { chosen: "better".into(), ..Columns::default() };
        let e = read_pairs(Path::new("x.parquet"), Bytes::from(buf), &cols, &mut BadRows::new(OnBadRow::Error)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "x.parquet: no column `better` (columns: prompt, chosen, rejected, score_chosen, score_rejected); set it under [data.columns]"
        );
        let e = read_pairs(Path::new("x.parquet"), Bytes::from_static(b"not parquet"), &cols, &mut BadRows::new(OnBadRow::Error))
            .unwrap_err();
        assert!(e.to_string().starts_with("x.parquet: whole file: cannot read parquet: "), "{e}");
    }

    /// Mutated parquet files: every one is read or refused with an error, never a panic that escapes.
    #[test]
    fn mutated_files_never_panic() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let valid = write_flat(&[&[("p", "a", "b", 2.0, 1.0), ("q", "c", "d", 5.0, 1.0)], &[("r", "e", "f", 3.0, 0.0)]]);
        let mut rng = StdRng::seed_from_u64(11);
        // The parquet crate may panic on corrupt input; `read_pairs` catches that, but keep the log quiet.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let (mut ok, mut err, mut caught) = (0, 0, 0);
        for _ in 0..5000 {
            let mut v = valid.clone();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..v.len());
                match rng.random_range(0..3) {
                    0 => v[i] = rng.random(),
                    1 => v.truncate(i.max(1)),
                    _ => v[i] ^= 1 << rng.random_range(0..8),
                }
            }
            match read_pairs(Path::new("f.parquet"), Bytes::from(v), &Columns::default(), &mut BadRows::new(OnBadRow::Skip)) {
                Ok(_) => ok += 1,
                Err(e) => {
                    err += 1;
                    let m = e.to_string();
                    assert!(m.starts_with("f.parquet: "), "{m}");
                    if m.contains("the parquet reader failed") {
                        caught += 1;
                    }
                }
            }
        }
        std::panic::set_hook(hook);
        eprintln!("parquet mutations: {ok} read, {err} refused ({caught} of them panics caught inside the parquet crate)");
        assert!(err > 0);
    }
}
