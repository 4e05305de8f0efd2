//! What the replica tests and `cargo xtask bench replicas` need besides MLX: a real
//! S3-compatible server and nginx.
//!
//! * **s3s-fs** (crates.io, an S3 server over a directory): `cargo install --locked` into
//!   `.semantic-build/tools`, once; later runs find the binary and its version stamp and
//!   start in milliseconds. Measured build on the 2-core machine: 145 s (idle) to 205 s (load
//!   average 3-4), once.
//! * **nginx** (Debian's package, installed with apt-get like the MLX build's packages): the
//!   agent-affinity router of docs/deployment.md.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result};

use crate::setup::packages;
use crate::util::{self, log};

/// The s3s-fs release installed (0.14 is the newest that builds with the pinned Rust 1.95).
pub const S3S_FS_VERSION: &str = "0.14.1";
/// The variable the tests read for the s3s-fs binary.
pub const S3_SERVER_VAR: &str = "SEMANTIC_TEST_S3_SERVER";
/// The variable the tests read for the nginx binary.
pub const NGINX_VAR: &str = "SEMANTIC_TEST_NGINX";

/// `<build>/tools/bin/s3s-fs`, installed when missing or of another version.
pub fn ensure_s3_server(build_dir: &Path) -> Result<PathBuf> {
    let root = build_dir.join("tools");
    let bin = root.join("bin").join("s3s-fs");
    let stamp = root.join("s3s-fs.version");
    let installed = std::fs::read_to_string(&stamp).unwrap_or_default();
    if bin.is_file() && installed.trim() == S3S_FS_VERSION {
        log(
            "setup",
            format_args!("s3s-fs {S3S_FS_VERSION}: {}", bin.display()),
        );
        return Ok(bin);
    }
    log(
        "setup",
        format_args!("installing s3s-fs {S3S_FS_VERSION} from crates.io (a few minutes, once)"),
    );
    let started = Instant::now();
    util::run(
        util::cargo_command()
            .args(["install", "--locked", "--quiet", "--features", "binary"])
            .arg(format!("s3s-fs@{S3S_FS_VERSION}"))
            .arg("--root")
            .arg(&root),
    )
    .context("cannot install s3s-fs (is crates.io reachable?)")?;
    util::write_atomic(&stamp, S3S_FS_VERSION.as_bytes())?;
    log(
        "setup",
        format_args!("s3s-fs built in {:.0}s", started.elapsed().as_secs_f64()),
    );
    Ok(bin)
}

/// The nginx binary, installed from Debian's package when missing.
pub fn ensure_nginx() -> Result<PathBuf> {
    if let Some(found) = find_nginx() {
        return Ok(found);
    }
    packages::install(&["nginx"])?;
    find_nginx().context("nginx is still missing after installing the Debian package")
}

fn find_nginx() -> Option<PathBuf> {
    util::find_in_path("nginx")
        .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.is_file()))
        .filter(|p| {
            Command::new(p)
                .arg("-v")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}
