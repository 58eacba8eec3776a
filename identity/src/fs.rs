//! `fs.rs`: [`write_file_atomic`], for certificates, keys and tokens on
//! disk: a reader sees the old file or the new one, never a torn write, and
//! after a crash the file is one or the other.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// File mode of files written with `private = true` (keys, tokens): owner
/// read/write only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// File mode of other files (certificates): readable by everyone, subject
/// to the umask, like any newly created file.
pub const PUBLIC_FILE_MODE: u32 = 0o644;

/// Write `contents` to `path` atomically: write a temporary file in the
/// same directory, fsync it, rename it over `path`, fsync the directory.
/// `private = true` creates the file with mode [`PRIVATE_FILE_MODE`]
/// (0600) from the start, so the secret is never readable by others, even
/// briefly; otherwise [`PUBLIC_FILE_MODE`]. An existing file's mode is
/// replaced.
pub fn write_file_atomic(path: &Path, contents: &[u8], private: bool) -> io::Result<()> {
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a file path", path.display()),
        )
    })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let suffix: u64 = rand::random();
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp.{}.{suffix:016x}", std::process::id()));
    let tmp = dir.join(tmp_name);

    let result = write_and_rename(&tmp, path, dir, contents, private);
    if result.is_err() {
        // Best effort: the temporary file may not exist or may already be renamed.
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn write_and_rename(
    tmp: &Path,
    path: &Path,
    dir: &Path,
    contents: &[u8],
    private: bool,
) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private {
            PRIVATE_FILE_MODE
        } else {
            PUBLIC_FILE_MODE
        });
    }
    let mut file = options.open(tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    fs::rename(tmp, path)?;
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_files_are_0600_and_replace_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        write_file_atomic(&path, b"first", true).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"first");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // Overwrite a public file with a private one: the mode changes too.
        let cert = dir.path().join("node.crt");
        write_file_atomic(&cert, b"cert", false).unwrap();
        let mode = fs::metadata(&cert).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !PUBLIC_FILE_MODE, 0, "public file: {mode:o}");
        write_file_atomic(&cert, b"secret now", true).unwrap();
        assert_eq!(fs::read(&cert).unwrap(), b"secret now");
        let mode = fs::metadata(&cert).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn errors_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/dir/file");
        assert!(write_file_atomic(&missing, b"x", true).is_err());
        assert!(write_file_atomic(Path::new("/"), b"x", true).is_err());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
