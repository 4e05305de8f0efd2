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

use super::client::{metric, Chat, Client, Message, Streamed};
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
    /// How to tell that it runs no generation any more.
    pub idle: IdleProbe,
    /// Where its stdout and stderr go (appended).
    pub log: PathBuf,
}

/// How the harness tells that a server runs no generation any more, after a client hung up
/// (so that the next measurement does not share the CPU with a generation nobody reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleProbe {
    /// `semantic_requests_active` in `/metrics` reads 0 (ours).
    Metrics,
    /// The process spends (almost) no CPU time over two probe windows in a row: for a peer
    /// with no status of its own (mlx-lm stops at the next token it cannot write).
    Cpu,
}

/// The probe window of [`IdleProbe::Cpu`].
const CPU_WINDOW: Duration = Duration::from_millis(100);

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
    /// The server process's resident memory (`VmRSS`), in bytes, where /proc tells.
    pub fn rss_bytes(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status.lines().find_map(|l| {
            let kib: u64 = l
                .strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()?;
            Some(kib * 1024)
        })
    }

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

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.spec.port
    }

    /// SIGKILL at once (no drain, no flush), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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

    /// Sends `chat`, reads its answer up to the first content token, hangs up and waits
    /// until the server is idle again (see [`Client::chat_first`]): for a turn whose TTFT
    /// is measured and whose answer nothing uses.
    pub fn first_token(&self, chat: &Chat<'_>) -> Result<Streamed> {
        let first = self.client().chat_first(chat)?;
        self.wait_idle()?;
        Ok(first)
    }

    /// Waits until the server runs no generation (see [`IdleProbe`]); returns when it was
    /// first seen idle. Gives up after 2 minutes.
    pub fn wait_idle(&self) -> Result<Instant> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let client = self.client();
        let pid = self.child.as_ref().map(Child::id);
        let mut quiet_since: Option<(Instant, u32)> = None;
        let mut last_cpu = pid.and_then(cpu_ticks);
        loop {
            match self.spec.idle {
                IdleProbe::Metrics => {
                    let text = client.get_text("/metrics")?;
                    if metric(&text, "semantic_requests_active") == Some(0.0) {
                        return Ok(Instant::now());
                    }
                    thread::sleep(Duration::from_millis(5));
                }
                IdleProbe::Cpu => {
                    let window_start = Instant::now();
                    thread::sleep(CPU_WINDOW);
                    let Some(now) = pid.and_then(cpu_ticks) else {
                        // No /proc (not Linux): a second is ten of mlx-lm's decode steps.
                        thread::sleep(Duration::from_secs(1));
                        return Ok(Instant::now());
                    };
                    // At most one clock tick (usually 10 ms) of CPU in a 100 ms window.
                    let quiet = last_cpu.is_some_and(|before| now.saturating_sub(before) <= 1);
                    last_cpu = Some(now);
                    quiet_since = match (quiet, quiet_since) {
                        (false, _) => None,
                        (true, None) => Some((window_start, 1)),
                        (true, Some((at, n))) => Some((at, n + 1)),
                    };
                    if let Some((at, 2..)) = quiet_since {
                        return Ok(at);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{} still runs a generation 2 minutes after its client hung up",
                    self.spec.label
                );
            }
        }
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

/// User + system CPU time of process `pid` so far, in clock ticks (Linux `/proc`).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat)
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line; the command name before
/// them is in parentheses and may hold spaces.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_after_the_command_name() {
        let stat = "4242 (mlx_lm) server) S 1 4242 4242 0 -1 4194304 100 0 0 0 \
                    1234 56 0 0 20 0 3 0 100 1000 10";
        assert_eq!(parse_cpu_ticks(stat), Some(1234 + 56));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        assert_eq!(parse_cpu_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn this_process_has_a_cpu_time() {
        if cfg!(target_os = "linux") {
            assert!(cpu_ticks(std::process::id()).is_some());
        }
    }
}
