//! A real S3-compatible server for tests and benchmarks: `s3s-fs` (from crates.io, installed
//! by `cargo xtask setup`'s test step under `.semantic-build/tools`), started on 127.0.0.1.
//!
//! Not used by the server itself; it lives here so that this crate's integration test, the
//! end-to-end tests and `cargo xtask bench replicas` start the store the same way.

use crate::config::S3Settings;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Variable naming the `s3s-fs` binary (set by `cargo xtask test`).
pub const ENV_S3_SERVER: &str = "SEMANTIC_TEST_S3_SERVER";
/// Access key the test server accepts.
pub const ACCESS_KEY: &str = "semantic-test";
/// Secret key the test server accepts.
pub const SECRET_KEY: &str = "semantic-test-secret";

/// The `s3s-fs` binary: `$SEMANTIC_TEST_S3_SERVER`, else `.semantic-build/tools/bin/s3s-fs`
/// of this workspace; `None` when neither exists.
pub fn find_server() -> Option<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    [
        std::env::var_os(ENV_S3_SERVER).map(PathBuf::from),
        Some(workspace.join(".semantic-build/tools/bin/s3s-fs")),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.is_file())
}

/// [`find_server`] for a test: in CI (`CI=true`) a missing server is a failure (panic);
/// elsewhere the test is skipped with a message saying how to install it.
pub fn require_server(test: &str) -> Option<PathBuf> {
    let found = find_server();
    if found.is_none() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(
            !ci,
            "{test}: the S3 test server (s3s-fs) is missing; `cargo xtask test` installs it"
        );
        eprintln!(
            "{test}: skipped: the S3 test server (s3s-fs) is not installed; \
             `cargo xtask test` installs it under .semantic-build/tools"
        );
    }
    found
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A running `s3s-fs` over a directory; killed on drop.
#[derive(Debug)]
pub struct S3TestServer {
    bin: PathBuf,
    root: PathBuf,
    port: u16,
    bucket: String,
    child: Option<Child>,
}

impl S3TestServer {
    /// Starts the server on a free port over `root` (created, with the bucket `bucket` as a
    /// directory in it) and waits until it accepts connections (at most 20 s).
    pub fn start(bin: &Path, root: &Path, bucket: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(root.join(bucket))?;
        let mut s = Self {
            bin: bin.to_path_buf(),
            root: root.to_path_buf(),
            port: free_port(),
            bucket: bucket.into(),
            child: None,
        };
        s.resume()?;
        Ok(s)
    }

    /// Starts the server again on the same port and directory (after [`Self::stop`]).
    pub fn resume(&mut self) -> std::io::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = std::fs::File::create(self.root.with_extension("log"))?;
        let child = Command::new(&self.bin)
            .arg("--host")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--access-key")
            .arg(ACCESS_KEY)
            .arg("--secret-key")
            .arg(SECRET_KEY)
            .arg(&self.root)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()?;
        self.child = Some(child);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if start.elapsed() > Duration::from_secs(20) {
                self.stop();
                return Err(std::io::Error::other("s3s-fs did not listen within 20 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Kills the server (SIGKILL): the store is down until [`Self::resume`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The directory the server keeps its objects in (`<root>/<bucket>/<key>`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Client settings for this server.
    pub fn settings(&self) -> S3Settings {
        S3Settings {
            endpoint: Some(self.endpoint()),
            bucket: self.bucket.clone(),
            region: Some("us-east-1".into()),
            access_key_id: Some(ACCESS_KEY.into()),
            secret_access_key: Some(SECRET_KEY.into()),
        }
    }

    /// The `SEMANTIC_OBJECT_STORE_*` and AWS variables a `semantic serve` needs to use it.
    pub fn env(&self, prefix: &str) -> Vec<(String, String)> {
        vec![
            ("SEMANTIC_OBJECT_STORE_BUCKET".into(), self.bucket.clone()),
            ("SEMANTIC_OBJECT_STORE_ENDPOINT".into(), self.endpoint()),
            ("SEMANTIC_OBJECT_STORE_PREFIX".into(), prefix.into()),
            ("SEMANTIC_OBJECT_STORE_REGION".into(), "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
        ]
    }
}

impl Drop for S3TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}
