//! Reading resource documents for `apply`, `diff` and `delete -f`: files,
//! directories (their `*.yaml`, `*.yml` and `*.json` files in name order,
//! subdirectories with `-R`) and standard input (`-`).
//!
//! Every problem here (a missing path, a directory without documents, text
//! that is not UTF-8) is a usage error (exit 2) that names the path.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use crate::error::{exit, CliError};

/// Extensions read from directories (case-insensitive).
const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// One input: its name in messages (the path as given, or `-` for stdin)
/// and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    pub content: String,
}

/// Reads every `-f` argument, in order.
pub fn read_sources(paths: &[PathBuf], recursive: bool) -> Result<Vec<Source>, CliError> {
    let mut sources = Vec::new();
    let mut stdin_read = false;
    for path in paths {
        if path.as_os_str() == OsStr::new("-") {
            if stdin_read {
                return Err(usage("-f - (standard input) can be given only once"));
            }
            stdin_read = true;
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf).map_err(|e| {
                CliError::new(exit::OTHER, format!("cannot read standard input: {e}"))
            })?;
            sources.push(Source {
                name: "-".into(),
                content: utf8("-", buf)?,
            });
            continue;
        }
        let meta = std::fs::metadata(path)
            .map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?;
        if meta.is_dir() {
            let before = sources.len();
            let mut visited = HashSet::new();
            read_dir(path, recursive, &mut visited, &mut sources)?;
            if sources.len() == before {
                return Err(usage(format!(
                    "no *.yaml, *.yml or *.json files in directory {}{}",
                    path.display(),
                    if recursive {
                        ""
                    } else {
                        " (-R reads subdirectories)"
                    }
                )));
            }
        } else {
            sources.push(read_file(path)?);
        }
    }
    Ok(sources)
}

fn read_dir(
    dir: &Path,
    recursive: bool,
    visited: &mut HashSet<PathBuf>,
    out: &mut Vec<Source>,
) -> Result<(), CliError> {
    // A symlink cycle under -R would recurse forever: read each real
    // directory once.
    if let Ok(real) = std::fs::canonicalize(dir) {
        if !visited.insert(real) {
            return Ok(());
        }
    }
    let entries = std::fs::read_dir(dir)
        .map_err(|e| usage(format!("cannot read directory {}: {e}", dir.display())))?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|e| usage(format!("cannot read directory {}: {e}", dir.display())))?;
        paths.push(entry.path());
    }
    paths.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    for path in paths {
        // Follows symlinks; a dangling one is skipped like any non-file.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if recursive {
                read_dir(&path, recursive, visited, out)?;
            }
        } else if meta.is_file() && has_document_extension(&path) {
            out.push(read_file(&path)?);
        }
    }
    Ok(())
}

fn has_document_extension(path: &Path) -> bool {
    path.extension()
        .and_then(OsStr::to_str)
        .is_some_and(|ext| EXTENSIONS.iter().any(|e| e.eq_ignore_ascii_case(ext)))
}

fn read_file(path: &Path) -> Result<Source, CliError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| usage(format!("cannot read {name}: {e}")))?;
    Ok(Source {
        content: utf8(&name, bytes)?,
        name,
    })
}

fn utf8(name: &str, bytes: Vec<u8>) -> Result<String, CliError> {
    String::from_utf8(bytes).map_err(|e| {
        usage(format!(
            "{name}: not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })
}

fn usage(message: impl Into<String>) -> CliError {
    CliError::new(exit::USAGE, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(sources: &[Source]) -> Vec<String> {
        sources
            .iter()
            .map(|s| {
                Path::new(&s.name)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect()
    }

    #[test]
    fn directories_in_name_order_with_and_without_recursion(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("b.yaml"), "b")?;
        std::fs::write(dir.path().join("a.yml"), "a")?;
        std::fs::write(dir.path().join("c.JSON"), "c")?;
        std::fs::write(dir.path().join("notes.txt"), "x")?;
        std::fs::create_dir(dir.path().join("sub"))?;
        std::fs::write(dir.path().join("sub").join("d.yaml"), "d")?;
        let flat = read_sources(&[dir.path().to_path_buf()], false)?;
        assert_eq!(names(&flat), ["a.yml", "b.yaml", "c.JSON"]);
        assert_eq!(flat[0].content, "a");
        let deep = read_sources(&[dir.path().to_path_buf()], true)?;
        assert_eq!(names(&deep), ["a.yml", "b.yaml", "c.JSON", "d.yaml"]);
        // A file given by name is read whatever its extension.
        let one = read_sources(&[dir.path().join("notes.txt")], false)?;
        assert_eq!(one[0].content, "x");
        assert!(one[0].name.ends_with("notes.txt"));
        Ok(())
    }

    #[test]
    fn bad_paths_are_usage_errors() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let missing = read_sources(&[dir.path().join("nope.yaml")], false)
            .err()
            .ok_or("a missing file was accepted")?;
        assert_eq!(missing.code, exit::USAGE);
        assert!(missing.message.unwrap_or_default().contains("nope.yaml"));
        let empty = read_sources(&[dir.path().to_path_buf()], false)
            .err()
            .ok_or("an empty directory was accepted")?;
        assert_eq!(empty.code, exit::USAGE);
        std::fs::write(dir.path().join("bin.yaml"), [b'a', 0xff])?;
        let binary = read_sources(&[dir.path().join("bin.yaml")], false)
            .err()
            .ok_or("binary text was accepted")?;
        assert_eq!(binary.code, exit::USAGE);
        assert!(binary.message.unwrap_or_default().contains("UTF-8"));
        Ok(())
    }
}
