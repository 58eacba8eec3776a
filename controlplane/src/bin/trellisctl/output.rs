//! Rendering for trellisctl: aligned tables for people, JSON for scripts.
//!
//! Values are shown as UTF-8 text when they are valid UTF-8 and as base64
//! otherwise (a small encoder lives here; no crate). All writes to stdout go
//! through [`write_stdout`], which turns a closed pipe into a quiet exit.

use std::io::Write as _;

use serde_json::{json, Map, Value};
use trellis_proto::admin::{KeyValue, Member};

use crate::error::{exit, CliError};

const BASE64_ALPHABET: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 (RFC 4648 §4) with `=` padding.
pub fn base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sextet = |shift: u32| char::from(BASE64_ALPHABET[((n >> shift) & 0x3f) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

/// Adds `value` (UTF-8) or `value_base64` (anything else) to a JSON object.
pub fn insert_value(object: &mut Map<String, Value>, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => object.insert("value".into(), Value::String(text.into())),
        Err(_) => object.insert("value_base64".into(), Value::String(base64(bytes))),
    };
}

/// A key-value as JSON; the value is left out when `with_value` is false.
pub fn kv_json(kv: &KeyValue, with_value: bool) -> Map<String, Value> {
    let mut object = Map::new();
    object.insert("key".into(), Value::String(kv.key.clone()));
    if with_value {
        insert_value(&mut object, &kv.value);
    }
    object.insert("create_revision".into(), json!(kv.create_revision));
    object.insert("mod_revision".into(), json!(kv.mod_revision));
    object.insert("version".into(), json!(kv.version));
    object
}

pub fn member_json(m: &Member) -> Value {
    json!({
        "node_id": m.node_id,
        "raft_addr": m.raft_addr,
        "admin_addr": m.admin_addr,
        "voter": m.voter,
    })
}

/// A value for one table cell or line: UTF-8 text with control characters
/// escaped, or `base64:<...>` for binary values.
pub fn display_value(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => escape_text(text),
        Err(_) => format!("base64:{}", base64(bytes)),
    }
}

/// Escapes control characters (newlines, tabs, ...) and backslashes so a
/// key or value stays on one line.
pub fn escape_text(text: &str) -> String {
    if !text.chars().any(|c| c.is_control() || c == '\\') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

/// Byte counts for people: `512 B`, `1.5 KiB`, `12.0 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Unix milliseconds as RFC 3339 UTC with second precision
/// (`2026-01-02T03:04:05Z`); `-` for 0 (unset).
pub fn rfc3339_ms(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".into();
    }
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a (year, month, day) of the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// One table row.
enum Row {
    Cells(Vec<String>),
    /// Leading cells, then free text that does not widen any column.
    Note(Vec<String>, String),
}

/// A table with a header row, columns separated by two spaces and padded to
/// the widest cell.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Row>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers.iter().map(|h| (*h).to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(Row::Cells(cells));
    }

    /// A row with `cells` in the first columns and `note` after them.
    pub fn note_row(&mut self, cells: Vec<String>, note: String) {
        self.rows.push(Row::Note(cells, note));
    }

    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            let cells = match row {
                Row::Cells(c) | Row::Note(c, _) => c,
            };
            for (i, cell) in cells.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(width(cell));
                } else {
                    widths.push(width(cell));
                }
            }
        }
        let mut out = String::new();
        let mut line = |cells: &[String], note: Option<&str>| {
            let mut text = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i > 0 {
                    text.push_str("  ");
                }
                text.push_str(cell);
                let last = i + 1 == cells.len() && note.is_none();
                if !last {
                    let pad = widths
                        .get(i)
                        .copied()
                        .unwrap_or(0)
                        .saturating_sub(width(cell));
                    text.extend(std::iter::repeat_n(' ', pad));
                }
            }
            if let Some(note) = note {
                if !cells.is_empty() {
                    text.push_str("  ");
                }
                text.push_str(note);
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&self.headers, None);
        for row in &self.rows {
            match row {
                Row::Cells(c) => line(c, None),
                Row::Note(c, note) => line(c, Some(note)),
            }
        }
        out
    }
}

/// Writes to stdout and flushes. A closed pipe (`trellisctl ... | head`)
/// ends the run quietly with exit 0.
pub fn write_stdout(bytes: &[u8]) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                CliError::silent(0)
            } else {
                CliError::new(exit::OTHER, format!("cannot write to stdout: {e}"))
            }
        })
}

/// Prints one pretty JSON document.
pub fn print_json(value: &Value) -> Result<(), CliError> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::new(exit::OTHER, format!("cannot encode JSON: {e}")))?;
    text.push('\n');
    write_stdout(text.as_bytes())
}

/// Prints one compact JSON document on its own line (for streams).
pub fn print_json_line(value: &Value) -> Result<(), CliError> {
    let mut text = serde_json::to_string(value)
        .map_err(|e| CliError::new(exit::OTHER, format!("cannot encode JSON: {e}")))?;
    text.push('\n');
    write_stdout(text.as_bytes())
}

pub fn print_line(text: &str) -> Result<(), CliError> {
    let mut line = String::with_capacity(text.len() + 1);
    line.push_str(text);
    line.push('\n');
    write_stdout(line.as_bytes())
}

/// Prints a note to stderr (progress, warnings); stderr errors are ignored.
pub fn note(text: &str) {
    let _ = writeln!(std::io::stderr(), "trellisctl: {text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, want) in cases {
            assert_eq!(base64(input.as_bytes()), want, "{input:?}");
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00, 0x80]), "//4AgA==");
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn values_are_text_or_base64() {
        let mut object = Map::new();
        insert_value(&mut object, b"hello");
        assert_eq!(object.get("value"), Some(&json!("hello")));
        let mut object = Map::new();
        insert_value(&mut object, &[0xff, 0x00]);
        assert_eq!(object.get("value_base64"), Some(&json!("/wA=")));
        assert!(object.get("value").is_none());
        assert_eq!(display_value(b"a\nb\\c"), "a\\nb\\\\c");
        assert_eq!(display_value(&[0xff]), "base64:/w==");
        assert_eq!(display_value("héllo".as_bytes()), "héllo");
        assert_eq!(escape_text("\u{1}"), "\\u{1}");
    }

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(&["ID", "ADDRESS", "ROLE"]);
        t.row(vec!["1".into(), "127.0.0.1:7379".into(), "leader".into()]);
        t.row(vec!["22".into(), "h:1".into(), "follower".into()]);
        t.note_row(
            vec!["3".into(), "h:2".into()],
            "unreachable: connection refused and a long message".into(),
        );
        let want = "\
ID  ADDRESS         ROLE
1   127.0.0.1:7379  leader
22  h:1             follower
3   h:2             unreachable: connection refused and a long message
";
        assert_eq!(t.render(), want);
    }

    #[test]
    fn table_with_unicode_and_empty_cells() {
        let mut t = Table::new(&["KEY", "VALUE"]);
        t.row(vec!["é".into(), String::new()]);
        t.row(vec!["abc".into(), "x".into()]);
        assert_eq!(t.render(), "KEY  VALUE\né\nabc  x\n");
        assert_eq!(Table::new(&["A"]).render(), "A\n");
    }

    #[test]
    fn rfc3339_timestamps() {
        assert_eq!(rfc3339_ms(0), "-");
        assert_eq!(rfc3339_ms(1), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_ms(1_700_000_000_999), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339_ms(4_102_444_799_000), "2099-12-31T23:59:59Z");
        assert_eq!(rfc3339_ms(1_709_251_199_000), "2024-02-29T23:59:59Z");
    }

    #[test]
    fn human_byte_counts() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
        assert_eq!(human_bytes(u64::MAX), "16384.0 PiB");
    }
}
