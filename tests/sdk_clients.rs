//! Real clients against the real server: the official Python `openai` and `anthropic` SDKs
//! (pinned, installed from PyPI into a virtual environment under `.semantic-build/sdk-venv`)
//! drive non-streaming and streaming chat, tool-call round trips, token counting, model
//! listing and error parsing, and check that an agent's second turn reports a cache read.
//! The script is `crates/http-api/tests/sdk_check.py`; it exits non-zero on any failure.

use semantic_e2e::{require_model, Server};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The SDK versions the check is pinned to.
const SDKS: [&str; 2] = ["openai==3.57.0", "anthropic==2.14.0"];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn sdk_python() -> PathBuf {
    let venv = workspace_root().join(".semantic-build").join("sdk-venv");
    let python = venv.join("bin").join("python3");
    let stamp = venv.join(".installed");
    let want = SDKS.join(" ");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(want.as_str()) {
        let ok = Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "python3 -m venv failed (Debian: apt-get install python3-venv)"
        );
        let ok = Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(SDKS)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "pip install {want} failed");
        std::fs::write(&stamp, &want).expect("write venv stamp");
    }
    python
}

#[test]
fn official_sdks_parse_every_response() {
    let model = require_model();
    let python = sdk_python();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&model, &dir.path().join("cache"), &[]);
    let script = workspace_root().join("crates/http-api/tests/sdk_check.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(&server.base)
        .output()
        .expect("run sdk_check.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK check failed:\n{stdout}\n{stderr}\nserver log:\n{}",
        server.log_text()
    );
    assert!(stdout.contains("ok "), "{stdout}");
}
