//! System packages the Linux MLX build needs, checked by file and installed with apt-get.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};

use crate::setup::Blas;
use crate::util::{self, log};

/// One thing the build needs and the Debian package that provides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Need {
    /// What is checked, for messages.
    what: &'static str,
    /// The Debian package to install when it is missing.
    package: &'static str,
}

/// The Debian packages that are missing for the MLX build (and the model download).
pub fn missing(openblas_dir: &Path, blas: Blas) -> Vec<&'static str> {
    let mut needs = Vec::new();
    let mut require = |present: bool, what, package| {
        if !present {
            needs.push(Need { what, package });
        }
    };
    require(util::find_in_path("g++").is_some(), "g++", "g++");
    require(util::find_in_path("cc").is_some(), "cc", "gcc");
    require(util::find_in_path("ar").is_some(), "ar", "binutils");
    require(util::find_in_path("cmake").is_some(), "cmake", "cmake");
    require(
        util::find_in_path("ninja").is_some(),
        "ninja",
        "ninja-build",
    );
    require(
        find_libclang().is_some(),
        "libclang (for bindgen)",
        "libclang-dev",
    );
    require(
        blas != Blas::Openblas || openblas_dir.join("libblas.so.3").exists(),
        "OpenBLAS (pthread)",
        "libopenblas0-pthread",
    );
    let python = util::find_in_path("python3").is_some();
    require(python, "python3", "python3");
    require(python && pip_works(), "python3 -m pip", "python3-pip");
    for need in &needs {
        log(
            "setup",
            format_args!("missing: {} ({})", need.what, need.package),
        );
    }
    let mut packages: Vec<&'static str> = needs.iter().map(|n| n.package).collect();
    packages.dedup();
    packages
}

fn pip_works() -> bool {
    Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .is_ok_and(|out| out.status.success())
}

/// The shell command a non-root user should run to install `packages`.
pub fn sudo_command(packages: &[&str]) -> String {
    format!(
        "sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y {}",
        packages.join(" ")
    )
}

/// Install `packages` with apt-get when running as root; otherwise fail with the command
/// to run.
pub fn install(packages: &[&str]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    if util::find_in_path("apt-get").is_none() {
        bail!(
            "these Debian/Ubuntu packages are missing and there is no apt-get here: {}; \
             install their equivalents with your package manager",
            packages.join(" ")
        );
    }
    if !is_root() {
        bail!(
            "missing system packages: {}; not root, so not installing them. Run:\n    {}",
            packages.join(" "),
            sudo_command(packages)
        );
    }
    log("setup", format_args!("installing {}", packages.join(" ")));
    // Wait for a concurrent apt/dpkg (e.g. unattended-upgrades) instead of failing.
    let lock_timeout = "DPkg::Lock::Timeout=600";
    util::run(
        Command::new("apt-get")
            .args(["-o", lock_timeout, "update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    util::run(
        Command::new("apt-get")
            .args(["-o", lock_timeout, "install", "-y", "-qq"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn is_root() -> bool {
    util::output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}

/// Where a libclang shared library (what bindgen loads) is, if anywhere.
///
/// Only `libclang.so*` / `libclang-NN.so*` count: `libclang-cpp.so` (pulled in by other
/// LLVM packages) is a different library that bindgen cannot use.
pub fn find_libclang() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("LIBCLANG_PATH") {
        dirs.push(dir.into());
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib") {
        let mut llvm: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("llvm-"))
            .map(|e| e.path().join("lib"))
            .collect();
        llvm.sort();
        dirs.extend(llvm);
    }
    dirs.extend(
        [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
        ]
        .map(PathBuf::from),
    );
    dirs.iter().find_map(|dir| {
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .find(|e| is_libclang_name(&e.file_name().to_string_lossy()))
            .map(|e| e.path())
    })
}

/// Whether a file name is a libclang shared library that bindgen (clang-sys) can load.
fn is_libclang_name(name: &str) -> bool {
    if name == "libclang.so" || name.starts_with("libclang.so.") {
        return true;
    }
    // libclang-14.so.1, libclang-14.so; not libclang-cpp.so.14 nor libclangBasic.a.
    name.strip_prefix("libclang-")
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()) && rest.contains(".so"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libclang_names() {
        for yes in [
            "libclang.so",
            "libclang.so.1",
            "libclang-14.so.1",
            "libclang-14.so",
        ] {
            assert!(is_libclang_name(yes), "{yes}");
        }
        for no in [
            "libclang-cpp.so.14",
            "libclang-cpp.so",
            "libclangBasic.a",
            "libclang.a",
        ] {
            assert!(!is_libclang_name(no), "{no}");
        }
    }

    #[test]
    fn sudo_command_lists_the_packages() {
        assert_eq!(
            sudo_command(&["cmake", "libclang-dev"]),
            "sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y \
             cmake libclang-dev"
        );
    }
}
