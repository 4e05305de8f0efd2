//! Small file-system helpers: private directories, atomic durable writes.

use crate::error::DiskStoreError;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Mode of every directory the store creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file the store creates.
pub const FILE_MODE: u32 = 0o600;
/// Prefix of temporary files (never a valid block or manifest name).
pub const TEMP_PREFIX: &str = ".tmp-";
/// Extension of temporary files.
pub const TEMP_SUFFIX: &str = ".partial";

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Creates `dir` (and missing parents) with mode 0700. When `tighten` is set, an existing
/// directory is also set to 0700 (only for directories the store owns, never for a
/// user-chosen cache root that may be shared).
pub fn ensure_private_dir(dir: &Path, tighten: bool) -> Result<(), DiskStoreError> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|e| DiskStoreError::io(dir, e))?;
    if tighten {
        let meta = fs::metadata(dir).map_err(|e| DiskStoreError::io(dir, e))?;
        if meta.permissions().mode() & 0o777 != DIR_MODE {
            fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
                .map_err(|e| DiskStoreError::io(dir, e))?;
        }
    }
    Ok(())
}

/// Makes the directory's entries (renames, deletions) durable.
pub fn sync_dir(dir: &Path) -> Result<(), DiskStoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| DiskStoreError::io(dir, e))
}

/// A unique temporary path in `dir` for a file that will become `final_name`.
pub fn temp_path(dir: &Path, final_name: &str) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(
        "{TEMP_PREFIX}{final_name}-{}-{n}{TEMP_SUFFIX}",
        std::process::id()
    ))
}

/// Writes `bytes` to a new 0600 file at `tmp` and fsyncs it. Removes it on failure.
pub fn write_temp(tmp: &Path, bytes: &[u8]) -> Result<(), DiskStoreError> {
    let result = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
    result.map_err(|e| {
        let _ = fs::remove_file(tmp);
        DiskStoreError::io(tmp, e)
    })
}

/// Renames `tmp` onto `dest` (atomic replace). Removes `tmp` on failure.
pub fn rename_into_place(tmp: &Path, dest: &Path) -> Result<(), DiskStoreError> {
    fs::rename(tmp, dest).map_err(|e| {
        let _ = fs::remove_file(tmp);
        DiskStoreError::io(dest, e)
    })
}

/// Atomic durable write: temp file in the same directory, write, fsync, rename, fsync of
/// the directory. The file is 0600. A crash leaves either the old file or the new one under
/// `dir/name`, never a partial one.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), DiskStoreError> {
    let tmp = temp_path(dir, name);
    write_temp(&tmp, bytes)?;
    rename_into_place(&tmp, &dir.join(name))?;
    sync_dir(dir)
}

/// True for names of the store's temporary files.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX)
}

/// Renames `from` to `to`, leaving `from` in place on failure.
pub fn rename_into_place_keep(from: &Path, to: &Path) -> Result<(), DiskStoreError> {
    fs::rename(from, to).map_err(|e| DiskStoreError::io(from, e))
}

/// Removes a temporary file left by a crashed writer, if it is older than `max_age` (a
/// younger one may belong to a live writer in another process). Failures are ignored.
pub fn remove_if_stale(path: &Path, max_age: Duration) {
    let age = fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .unwrap_or(Duration::ZERO);
    if age > max_age {
        tracing::debug!(path = %path.display(), "removing a stale temporary file");
        let _ = fs::remove_file(path);
    }
}
