//! Server processes under test (ours and the peers): start, wait until ready, stop with
//! SIGTERM (then SIGKILL), restart. A [`Server`] stops its process when dropped, so every
//! error path kills what it started.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::client::{Chat, Client, Message};
use crate::util::log;

/// How to launch one server.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Label in messages and tables (`semantic`, `llama.cpp`, `mlx-lm`).
    pub label: String,
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Extra environment.
    pub env: Vec<(String, OsString)>,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    /// A GET path that answers 200 once the model is loaded.
    pub ready_path: String,
    /// The `model` field requests send.
    pub model_field: String,
    /// Where its stdout and stderr go (appended).
    pub log: PathBuf,
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    spec: Spec,
    child: Option<Child>,
    /// Seconds from spawn to ready, of the last start.
    pub last_start_s: f64,
}

/// A free TCP port on 127.0.0.1 (bound and released; a tiny race is acceptable here).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

impl Server {
    /// Spawn the server and wait until it is ready (and warmed up with one tiny request).
    pub fn start(spec: Spec) -> Result<Self> {
        let mut server = Self {
            spec,
            child: None,
            last_start_s: 0.0,
        };
        server.launch()?;
        Ok(server)
    }

    /// A client for this server.
    pub fn client(&self) -> Client {
        Client::new(self.spec.port, &self.spec.model_field)
    }

    fn launch(&mut self) -> Result<()> {
        if let Some(dir) = self.spec.log.parent() {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let log_file = File::options()
            .create(true)
            .append(true)
            .open(&self.spec.log)
            .with_context(|| format!("cannot open {}", self.spec.log.display()))?;
        let log_start = log_file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut cmd = Command::new(&self.spec.program);
        cmd.args(&self.spec.args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        for (k, v) in &self.spec.env {
            cmd.env(k, v);
        }
        log(
            "bench",
            format_args!(
                "start {}: {}",
                self.spec.label,
                crate::util::display_command(&cmd)
            ),
        );
        let started = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.spec.program.display()))?;
        self.child = Some(child);
        let client = self.client();
        let deadline = started + Duration::from_secs(600);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!(
                        "{} exited during start-up ({status}); its log ({}) ends with:\n{}",
                        self.spec.label,
                        self.spec.log.display(),
                        log_tail(&self.spec.log, log_start)
                    );
                }
            }
            if let Some((200, _)) = client.try_get(&self.spec.ready_path) {
                break;
            }
            if Instant::now() > deadline {
                let _ = self.stop();
                bail!(
                    "{} was not ready after 10 minutes; its log ({}) ends with:\n{}",
                    self.spec.label,
                    self.spec.log.display(),
                    log_tail(&self.spec.log, log_start)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
        self.last_start_s = started.elapsed().as_secs_f64();
        // One tiny request so that lazy initialisation is not measured (short: no cache blocks).
        let warm = [
            Message::system("You are a helpful assistant."),
            Message::user("Say hi."),
        ];
        client
            .chat(&Chat {
                messages: &warm,
                max_tokens: 2,
                agent: Some("bench-warmup"),
                extra: None,
            })
            .with_context(|| {
                format!(
                    "{}: the warm-up request failed; log {}:\n{}",
                    self.spec.label,
                    self.spec.log.display(),
                    log_tail(&self.spec.log, log_start)
                )
            })?;
        Ok(())
    }

    /// SIGTERM, wait up to 60 s for a clean exit (ours flushes its block writes), then SIGKILL.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = child.id().to_string();
        let term = Command::new("kill")
            .args(["-TERM", &pid])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        if term.is_ok_and(|s| s.success()) {
            while Instant::now() < deadline {
                if child.try_wait()?.is_some() {
                    return Ok(());
                }
                thread::sleep(Duration::from_millis(50));
            }
            log(
                "bench",
                format_args!("{} did not stop after SIGTERM; killing it", self.spec.label),
            );
        }
        let _ = child.kill();
        let _ = child.wait();
        Ok(())
    }

    /// Stop and start again (same arguments, same cache directory); returns the seconds
    /// the start took.
    pub fn restart(&mut self) -> Result<f64> {
        self.stop()?;
        self.launch()?;
        Ok(self.last_start_s)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            log(
                "bench",
                format_args!("could not stop {}: {err:#}", self.spec.label),
            );
        }
    }
}

/// The last 30 lines a server wrote since `from` (its log is appended across restarts).
fn log_tail(path: &std::path::Path, from: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.seek(SeekFrom::Start(from));
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
