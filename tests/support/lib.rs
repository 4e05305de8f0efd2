//! Shared helpers of the end-to-end tests: start the real `semantic` binary on a free port of
//! 127.0.0.1, wait for readiness, talk HTTP, parse SSE, stop it with SIGTERM.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of the default model, as `cargo xtask setup` installs it (or `$SEMANTIC_TEST_MODEL`).
pub fn default_model() -> PathBuf {
    if let Some(p) = std::env::var_os("SEMANTIC_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("SEMANTIC_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".semantic")
        });
    home.join("models").join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The model for real-model tests; panics with the command to run when it is missing.
pub fn require_model() -> PathBuf {
    let p = default_model();
    assert!(
        p.exists(),
        "the default model is missing at {}: run `cargo xtask setup` (or `cargo xtask test`)",
        p.display()
    );
    p
}

/// A real checkpoint besides the default model, from the environment variable `var` (set by
/// `cargo xtask test`) or `~/.semantic/models/FILE`; `None`, said on stderr, when it is not
/// installed, so its tests skip.
pub fn real_model(var: &str, file: &str) -> Option<PathBuf> {
    let found = [
        std::env::var_os(var).map(PathBuf::from),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".semantic/models").join(file)),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.is_file());
    if found.is_none() {
        eprintln!("{file} is not installed (run `cargo xtask test`): skipping");
    }
    found
}

/// The `semantic` binary built by this `cargo test` run (target/<profile>/semantic).
pub fn semantic_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SEMANTIC_BIN") {
        return PathBuf::from(p);
    }
    // current_exe = target/<profile>/deps/<test>-<hash>
    let exe = std::env::current_exe().unwrap_or_default();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let bin = profile_dir.join("semantic");
    if !bin.exists() {
        // Not built by this run (plain `cargo test`): build it with the same configuration.
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.args(["build", "-p", "semantic"]);
        if let Some(cfg) = std::env::var_os("SEMANTIC_MLX_CARGO_CONFIG") {
            cmd.arg("--config").arg(cfg);
        }
        let _ = cmd.status();
    }
    assert!(
        bin.exists(),
        "{} not built: run the tests with `cargo xtask test`",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A running `semantic serve` process; stopped with SIGTERM on drop.
pub struct Server {
    child: Option<Child>,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    log: PathBuf,
}

impl Server {
    /// Starts the binary with these arguments and environment, and waits until
    /// `/health/ready` answers 200 (at most `timeout`).
    pub fn start(model: &Path, cache_dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_limited(model, cache_dir, env, None)
    }

    /// [`Server::start`] with the process's file-descriptor limit (soft and hard) set to
    /// `nofile` (through `prlimit`, from util-linux), when given.
    pub fn start_limited(
        model: &Path,
        cache_dir: &Path,
        env: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> Self {
        let port = free_port();
        let log = cache_dir.with_extension(format!("{port}.log"));
        let log_file = std::fs::File::create(&log).expect("create server log");
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(semantic_bin());
                c
            }
            None => Command::new(semantic_bin()),
        };
        cmd.arg("serve")
            .arg("--model")
            .arg(model)
            .arg("--port")
            .arg(port.to_string())
            .arg("--host")
            .arg("127.0.0.1")
            .env("SEMANTIC_AGENT_CACHE_DIR", cache_dir)
            .env("SEMANTIC_SERVER_LOG_LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn semantic");
        let mut server = Self {
            child: Some(child),
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        server.wait_ready(Duration::from_secs(180));
        server
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Ok(r) = ureq::get(&format!("{}/health/ready", self.base))
                .timeout(Duration::from_secs(2))
                .call()
            {
                if r.status() == 200 {
                    return;
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("server exited early ({status}):\n{}", self.log_text());
                }
            }
            assert!(
                start.elapsed() < timeout,
                "server not ready after {timeout:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The server process's peak resident memory so far in KiB (`VmHWM` of
    /// `/proc/<pid>/status`; `None` where there is no procfs).
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status.lines().find_map(|l| {
            l.strip_prefix("VmHWM:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
    }

    /// The server's stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the server at once (SIGKILL: no drain, no flush), as a crash would.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server with SIGTERM and returns its exit code.
    pub fn stop(mut self) -> Option<i32> {
        self.terminate()
    }

    fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(s)) = child.try_wait() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        child.wait().ok().and_then(|s| s.code())
    }

    /// POSTs JSON; returns (status, headers as lower-case pairs, body JSON).
    pub fn post(&self, path: &str, headers: &[(&str, &str)], body: &Value) -> Response {
        Response::read(self.send_post(path, headers, body, Duration::from_secs(600)))
    }

    /// Sends a JSON POST; any HTTP status is a response, a transport error panics.
    fn send_post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: &Value,
        timeout: Duration,
    ) -> ureq::Response {
        send_post(&self.base, path, headers, body, timeout)
    }

    /// GETs a path.
    pub fn get(&self, path: &str) -> Response {
        self.get_with(path, &[])
    }

    /// GETs a path with these headers.
    pub fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        let mut req = ureq::get(&format!("{}{path}", self.base)).timeout(Duration::from_secs(60));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let r = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("GET {path}: {e}"),
        };
        Response::read(r)
    }

    /// POSTs JSON and returns as soon as the response headers arrive; the body (an SSE
    /// stream when the status is 200 and the request asked for one) is read as it comes.
    pub fn post_stream(&self, path: &str, headers: &[(&str, &str)], body: &Value) -> Stream {
        let r = self.send_post(path, headers, body, Duration::from_secs(900));
        Stream {
            status: r.status(),
            headers: header_pairs(&r),
            events: SseReader::new(BufReader::new(r.into_reader())),
        }
    }

    /// The value of a Prometheus sample in `/metrics` (a line `<series> <value>`, `series`
    /// with its labels exactly as printed), or `None` when it is absent.
    pub fn metric(&self, headers: &[(&str, &str)], series: &str) -> Option<f64> {
        let r = self.get_with("/metrics", headers);
        assert_eq!(r.status, 200, "{}", r.text);
        metric_value(&r.text, series)
    }
}

/// POSTs JSON to `base` + `path` (any server, a proxy too); any HTTP status is a response, a
/// transport error panics.
pub fn post_json(base: &str, path: &str, headers: &[(&str, &str)], body: &Value) -> Response {
    Response::read(send_post(
        base,
        path,
        headers,
        body,
        Duration::from_secs(600),
    ))
}

fn send_post(
    base: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
    timeout: Duration,
) -> ureq::Response {
    let mut req = ureq::post(&format!("{base}{path}")).timeout(timeout);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    match req.send_json(body.clone()) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("POST {base}{path}: {e}"),
    }
}

/// The nginx binary for the routing tests: `$SEMANTIC_TEST_NGINX` (set by `cargo xtask
/// test`), `nginx` on the PATH or `/usr/sbin/nginx`. `None` (said on stderr) when absent
/// outside CI; in CI (`CI=true`) a missing nginx fails the test.
pub fn require_nginx(test: &str) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::var_os("SEMANTIC_TEST_NGINX")
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::split_paths(&path_dirs).map(|d| d.join("nginx")))
        .chain([PathBuf::from("/usr/sbin/nginx")])
        .find(|p| p.is_file());
    if found.is_none() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(
            !ci,
            "{test}: nginx is missing; `cargo xtask test` installs it"
        );
        eprintln!("{test}: skipped: nginx is not installed (`cargo xtask test` installs it)");
    }
    found
}

/// The agent-affinity configuration of docs/deployment.md (its `nginx` block), exactly as
/// documented but for the ports: the replicas `127.0.0.1:8001` / `:8002` and the listener
/// `127.0.0.1:8080` become `replicas` and `listen`.
pub fn documented_nginx_config(replicas: [&str; 2], listen: u16) -> String {
    let doc = include_str!("../../docs/deployment.md");
    let block = doc
        .split("```nginx\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("docs/deployment.md has an nginx block");
    for needle in ["127.0.0.1:8001", "127.0.0.1:8002", "listen 127.0.0.1:8080;"] {
        assert!(
            block.contains(needle),
            "the documented config lost {needle}"
        );
    }
    block
        .replace("127.0.0.1:8001", replicas[0])
        .replace("127.0.0.1:8002", replicas[1])
        .replace(
            "listen 127.0.0.1:8080;",
            &format!("listen 127.0.0.1:{listen};"),
        )
}

/// nginx running `http_block` (in the foreground, everything under `dir`); stopped on drop.
pub struct Nginx {
    child: Option<Child>,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    dir: PathBuf,
}

impl Nginx {
    /// Starts `bin` with a configuration made of `http_block` and the file paths of `dir`,
    /// and waits until `port` accepts connections.
    pub fn start(bin: &Path, dir: &Path, http_block: &str, port: u16) -> Self {
        std::fs::create_dir_all(dir.join("tmp")).expect("nginx dir");
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\nevents {{ worker_connections 256; }}\nhttp {{\n\
             access_log {d}/access.log;\nclient_body_temp_path {d}/tmp/body;\n\
             proxy_temp_path {d}/tmp/proxy;\nfastcgi_temp_path {d}/tmp/fastcgi;\n\
             uwsgi_temp_path {d}/tmp/uwsgi;\nscgi_temp_path {d}/tmp/scgi;\n{http_block}\n}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let mut nginx = Self {
            child: Some(child),
            base: format!("http://127.0.0.1:{port}"),
            dir: dir.to_path_buf(),
        };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(Ok(Some(status))) = nginx.child.as_mut().map(Child::try_wait) {
                panic!("nginx exited ({status}):\n{}", nginx.error_log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "nginx did not listen:\n{}",
                nginx.error_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        nginx
    }

    /// nginx's error log so far (upstream failures and failovers are logged there).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_tcp_port() -> u16 {
    free_port()
}

/// The value of `series` in a Prometheus text exposition.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Polls `probe` every 50 ms until it returns `true`; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut probe: impl FnMut() -> bool) {
    let start = Instant::now();
    while !probe() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A response whose body is read as it arrives.
pub struct Stream {
    /// HTTP status.
    pub status: u16,
    /// Headers (lower-case names).
    pub headers: Vec<(String, String)>,
    /// The body's SSE events, each yielded when it arrives.
    pub events: SseReader<BufReader<Box<dyn Read + Send + Sync + 'static>>>,
}

impl Stream {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn header_pairs(r: &ureq::Response) -> Vec<(String, String)> {
    r.headers_names()
        .into_iter()
        .map(|n| {
            let v = r.header(&n).unwrap_or_default().to_string();
            (n.to_ascii_lowercase(), v)
        })
        .collect()
}

impl Drop for Server {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// A response read in full.
#[derive(Debug)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Headers (lower-case names).
    pub headers: Vec<(String, String)>,
    /// Body text.
    pub text: String,
}

impl Response {
    fn read(r: ureq::Response) -> Self {
        let status = r.status();
        let headers = header_pairs(&r);
        let mut text = String::new();
        let _ = r.into_reader().read_to_string(&mut text);
        Self {
            status,
            headers,
            text,
        }
    }

    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// SSE events: (event name or "", data) in order.
    pub fn sse_events(&self) -> Vec<(String, String)> {
        parse_sse(BufReader::new(self.text.as_bytes()))
    }
}

/// The text of an Anthropic Messages response: its `text` content blocks, joined.
pub fn anthropic_text(message: &Value) -> String {
    message["content"]
        .as_array()
        .map(|blocks| {
            blocks
                .iter()
                .filter_map(|b| b["text"].as_str())
                .collect::<String>()
        })
        .unwrap_or_default()
}

/// Parses an SSE stream into (event, data) pairs.
pub fn parse_sse(reader: impl BufRead) -> Vec<(String, String)> {
    SseReader::new(reader).collect()
}

/// SSE events, (event name or "", data), parsed incrementally: each is yielded as soon as
/// the blank line that ends it is read.
pub struct SseReader<R> {
    lines: std::io::Lines<R>,
    done: bool,
}

impl<R: BufRead> SseReader<R> {
    /// Events of `reader`.
    pub fn new(reader: R) -> Self {
        Self {
            lines: reader.lines(),
            done: false,
        }
    }
}

impl<R: BufRead> Iterator for SseReader<R> {
    type Item = (String, String);

    fn next(&mut self) -> Option<Self::Item> {
        let mut event = String::new();
        let mut data = String::new();
        while !self.done {
            let Some(Ok(line)) = self.lines.next() else {
                self.done = true;
                break;
            };
            if line.is_empty() {
                if !data.is_empty() || !event.is_empty() {
                    return Some((event, data));
                }
            } else if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        (!data.is_empty()).then_some((event, data))
    }
}
