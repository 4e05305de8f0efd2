//! Small helpers shared by the commands: paths, progress lines, steps with retry hints,
//! running processes, hashing, atomic writes, `cargo metadata`.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use sha2::{Digest as _, Sha256};

/// Root of the cargo workspace (the parent of the `xtask` package).
pub fn workspace_root() -> PathBuf {
    // `cargo run` sets CARGO_MANIFEST_DIR for the program it runs; fall back to the
    // directory this binary was built from.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or(manifest_dir)
}

/// The one ignored folder that holds everything `cargo xtask` generates.
pub fn build_dir() -> PathBuf {
    workspace_root().join(".semantic-build")
}

/// The cargo that runs us (`$CARGO`), so nested builds use the same toolchain.
pub fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"))
}

/// A `cargo` command run from the workspace root.
pub fn cargo_command() -> Command {
    let mut cmd = Command::new(cargo());
    cmd.current_dir(workspace_root());
    cmd
}

/// Print one progress line, `[tag] message`, on stderr.
pub fn log(tag: &str, message: impl fmt::Display) {
    eprintln!("[{tag}] {message}");
}

/// Context attached to an error by [`step`]: which step failed and how to get past it.
#[derive(Debug)]
pub struct Failure {
    /// `tag: step name`, e.g. `setup: build mlx-c`.
    pub step: String,
    /// What to run or check before retrying.
    pub hint: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step `{}` failed", self.step)
    }
}

/// Run one named step: print `[tag] name...`, and on error record the step and a hint.
pub fn step<T>(tag: &str, name: &str, hint: &str, body: impl FnOnce() -> Result<T>) -> Result<T> {
    log(tag, format_args!("{name}..."));
    let started = Instant::now();
    let result = body().map_err(|err| {
        err.context(Failure {
            step: format!("{tag}: {name}"),
            hint: hint.to_owned(),
        })
    });
    let elapsed = started.elapsed().as_secs_f64();
    if result.is_ok() && elapsed >= 2.0 {
        log(tag, format_args!("{name}: done in {elapsed:.1}s"));
    }
    result
}

/// Print an error with its causes, one per line, and the retry hint of the failed step.
pub fn report_error(err: &anyhow::Error) {
    eprintln!();
    eprintln!("error: {err}");
    for cause in err.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    if let Some(failure) = err.downcast_ref::<Failure>() {
        eprintln!("  what to do: {}", failure.hint);
        eprintln!(
            "  to retry: run the same `cargo xtask` command again; finished steps are \
             skipped (`cargo xtask setup --force` redoes the whole set-up)"
        );
    }
}

/// A command line as a shell-like string, for messages.
pub fn display_command(cmd: &Command) -> String {
    let mut parts = vec![quote(cmd.get_program())];
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

fn quote(arg: &OsStr) -> String {
    let text = arg.to_string_lossy();
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@+,%^".contains(c));
    if plain {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

fn spawn_error(cmd: &Command, err: io::Error) -> anyhow::Error {
    anyhow::Error::new(err).context(format!(
        "could not start `{}` (is it installed and on PATH?)",
        cmd.get_program().to_string_lossy()
    ))
}

/// Run a command with inherited stdio; fail (with the command line) on non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("  $ {}", display_command(cmd));
    let status = cmd.status().map_err(|err| spawn_error(cmd, err))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display_command(cmd));
    }
    Ok(())
}

/// Run a command with its output captured; show the output's tail only if it fails.
pub fn run_captured(cmd: &mut Command) -> Result<()> {
    eprintln!("  $ {}", display_command(cmd));
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|err| spawn_error(cmd, err))?;
    if !output.status.success() {
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        bail!(
            "`{}` failed ({}); last lines of its output:\n{}",
            display_command(cmd),
            output.status,
            tail(&text, 40)
        );
    }
    Ok(())
}

/// Run a command and return its stdout; on failure include its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let output = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|err| spawn_error(cmd, err))?;
    if !output.status.success() {
        bail!(
            "`{}` failed ({}):\n{}",
            display_command(cmd),
            output.status,
            tail(&String::from_utf8_lossy(&output.stderr), 40)
        );
    }
    String::from_utf8(output.stdout)
        .with_context(|| format!("`{}` printed non-UTF-8 output", display_command(cmd)))
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `name` found as an executable file on PATH.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Lower-case hex sha256 of everything `reader` yields, read in chunks.
pub fn sha256_reader(mut reader: impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lower-case hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    sha256_reader(file).with_context(|| format!("cannot read {}", path.display()))
}

/// Lower-case hex sha256 of a byte string.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A sibling temporary path for `path` (same directory, so a rename is atomic).
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Write `contents` to `path` atomically: a temporary sibling, fsync, rename.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = temp_sibling(path);
    let result = (|| -> io::Result<()> {
        let mut file = BufWriter::new(File::create(&tmp)?);
        file.write_all(contents)?;
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// Remove a file or directory tree if it exists.
pub fn remove_path(path: &Path) -> Result<()> {
    let result = match fs::symlink_metadata(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    };
    result.with_context(|| format!("cannot remove {}", path.display()))
}

/// `cargo metadata --format-version 1` of the workspace, parsed.
///
/// `no_deps` skips dependency resolution (enough for the target directory);
/// `platform` keeps only the dependencies built for that target triple.
pub fn cargo_metadata(no_deps: bool, platform: Option<&str>) -> Result<serde_json::Value> {
    let mut cmd = cargo_command();
    cmd.args(["metadata", "--format-version", "1"]);
    if no_deps {
        cmd.arg("--no-deps");
    }
    if let Some(triple) = platform {
        cmd.args(["--filter-platform", triple]);
    }
    let text = output(&mut cmd)?;
    serde_json::from_str(&text).context("cannot parse the output of `cargo metadata`")
}

/// The target directory from `cargo metadata` (honours CARGO_TARGET_DIR and configs).
pub fn target_dir(metadata: &serde_json::Value) -> Result<PathBuf> {
    metadata
        .get("target_directory")
        .and_then(serde_json::Value::as_str)
        .map(PathBuf::from)
        .context("`cargo metadata` gave no target_directory")
}

/// The user's home directory (`$HOME`).
pub fn home_dir() -> Result<PathBuf> {
    std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .map(PathBuf::from)
        .context("HOME is not set: set HOME, or SEMANTIC_HOME to choose where models go")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_a_small_file_is_streamed_and_correct() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("xtask-sha-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let path = dir.join("abc.txt");
        write_atomic(&path, b"abc")?;
        assert_eq!(
            sha256_file(&path)?,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // Larger than one read chunk, to exercise the loop.
        let big = vec![b'a'; (1 << 16) + 3];
        write_atomic(&path, &big)?;
        assert_eq!(sha256_file(&path)?, sha256_bytes(&big));
        remove_path(&dir)?;
        Ok(())
    }

    #[test]
    fn write_atomic_leaves_no_temporary_file() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("xtask-atomic-{}", std::process::id()));
        let path = dir.join("nested").join("file.txt");
        write_atomic(&path, b"one")?;
        write_atomic(&path, b"two")?;
        assert_eq!(fs::read(&path)?, b"two");
        let names: Vec<_> = fs::read_dir(path.parent().context("parent")?)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        assert_eq!(names, [OsString::from("file.txt")]);
        remove_path(&dir)?;
        Ok(())
    }

    #[test]
    fn commands_are_displayed_shell_quoted() {
        let mut cmd = Command::new("cmake");
        cmd.args(["-DX=1", "a b", "it's"]);
        assert_eq!(display_command(&cmd), r"cmake -DX=1 'a b' 'it'\''s'");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
