//! `replicas`: four agents over two replicas behind nginx (the agent-affinity configuration
//! of docs/deployment.md), sharing the warm tier through a real S3-compatible server
//! (s3s-fs on 127.0.0.1); the replica of agent 0 is killed after turn 3.
//!
//! Measured: the TTFT of each moved agent's turn 4 (served by the other replica, which
//! restores the agent's blocks from the object store) against a cold prefill of the same
//! conversation on a fresh server; the restore rate of those turns (restored bytes / restore
//! time, from the surviving replica's metrics) against plain, signed GETs of the same block
//! objects (4 at a time, as the tier downloads them; no verification, no import).

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::client::{metric, Chat, Client, Message};
use super::prompts::words;
use super::report::{fmt_ratio, fmt_summary, utc_stamps, Table};
use super::server::{free_port, Server};
use super::stats::{median, Summary};
use super::{Ctx, Scenario};
use crate::setup::replicas::{ensure_nginx, ensure_s3_server};
use crate::util::{self, log};

const AGENTS: usize = 4;
/// The replica of agent 0 is killed after this turn.
const KILL_AFTER: usize = 3;
const MAX_TOKENS: u32 = 32;
const BUCKET: &str = "semantic-bench";
const PREFIX: &str = "bench";
const ACCESS_KEY: &str = "semantic-bench";
const SECRET_KEY: &str = "semantic-bench-secret";
const REGION: &str = "us-east-1";

#[derive(Debug, Clone, Serialize)]
struct Moved {
    agent: usize,
    ttft_moved_s: f64,
    ttft_cold_s: f64,
    prompt: u64,
    reused: u64,
    restored: u64,
}

#[derive(Debug, Clone, Serialize)]
struct RunResult {
    run: usize,
    /// Replica (0 or 1) of each agent before the kill.
    homes: Vec<usize>,
    moved: Vec<Moved>,
    restored_bytes: f64,
    downloaded_bytes: f64,
    restore_s: f64,
    restore_mb_s: f64,
    plain_get_bytes: u64,
    plain_get_s: f64,
    plain_get_mb_s: f64,
}

fn system_prompt(agent: usize) -> String {
    format!(
        "You can call tools by answering with a JSON object. Tool notes: {}\n\nYou are agent \
         {agent} of a team. Your own instructions follow. {}",
        words(42, "", 430),
        words(300 + agent as u64, "", 900)
    )
}

fn user_text(agent: usize, turn: usize) -> String {
    words(
        20_000 + agent as u64 * 100 + turn as u64,
        &format!("Turn {turn} for agent {agent}:"),
        85,
    )
}

/// Run the scenario.
pub fn run(ctx: &Ctx) -> Result<()> {
    let build = util::build_dir();
    let s3_bin = ensure_s3_server(&build)?;
    let nginx_bin = ensure_nginx()?;
    let mut runs = Vec::new();
    for run in 0..ctx.runs {
        runs.push(measure(ctx, run, &s3_bin, &nginx_bin)?);
    }
    let markdown = render(&runs);
    let json = json!({
        "scenario": "replicas", "date": ctx.date, "command": ctx.command, "machine": ctx.machine,
        "runs": ctx.runs, "agents": AGENTS, "kill_after": KILL_AFTER, "max_tokens": MAX_TOKENS,
        "results": runs,
    });
    ctx.publish(Scenario::Replicas, &json, &markdown)
}

fn stats_requests(client: &Client) -> Result<u64> {
    let v: serde_json::Value = serde_json::from_str(&client.get_text("/v1/stats")?)?;
    Ok(v["requests"].as_u64().unwrap_or(0))
}

fn metrics_of(client: &Client) -> Result<String> {
    client.get_text("/metrics")
}

fn measure(ctx: &Ctx, run: usize, s3_bin: &Path, nginx_bin: &Path) -> Result<RunResult> {
    let s3_root = ctx.fresh_dir(&format!("replicas-s3-{run}"))?;
    let s3 = Proc::s3s_fs(s3_bin, &s3_root)?;
    let endpoint = format!("http://127.0.0.1:{}", s3.port);
    let env = [
        ("SEMANTIC_OBJECT_STORE_BUCKET", BUCKET),
        ("SEMANTIC_OBJECT_STORE_ENDPOINT", endpoint.as_str()),
        ("SEMANTIC_OBJECT_STORE_PREFIX", PREFIX),
        ("SEMANTIC_OBJECT_STORE_REGION", REGION),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
    ];
    let caches = [
        ctx.fresh_dir(&format!("replicas-r1-{run}"))?,
        ctx.fresh_dir(&format!("replicas-r2-{run}"))?,
    ];
    let mut replicas = [
        Server::start(ctx.ours(&caches[0], "replica-1", &env)?)?,
        Server::start(ctx.ours(&caches[1], "replica-2", &env)?)?,
    ];
    let ports = [replicas[0].port(), replicas[1].port()];
    let nginx = Proc::nginx(
        nginx_bin,
        &ctx.fresh_dir(&format!("replicas-nginx-{run}"))?,
        ports,
    )?;
    let router = Client::new(nginx.port, "default");
    let direct = [replicas[0].client(), replicas[1].client()];

    let ids: Vec<String> = (0..AGENTS)
        .map(|a| format!("replicas-{}-r{run}-a{a}", ctx.stamp))
        .collect();
    let mut histories: Vec<Vec<Message>> = (0..AGENTS)
        .map(|a| vec![Message::system(system_prompt(a))])
        .collect();
    let mut homes = vec![0usize; AGENTS];
    for turn in 1..=KILL_AFTER {
        for agent in 0..AGENTS {
            histories[agent].push(Message::user(user_text(agent, turn)));
            let before = stats_requests(&direct[0])?;
            let s = router.chat(&Chat {
                messages: &histories[agent],
                max_tokens: MAX_TOKENS,
                agent: Some(&ids[agent]),
                extra: None,
            })?;
            homes[agent] = usize::from(stats_requests(&direct[0])? == before);
            histories[agent].push(Message::assistant(s.content.clone()));
        }
        log(
            "bench",
            format_args!("replicas run {run} turn {turn}: agents on replicas {homes:?}"),
        );
    }
    // Every block and manifest is in the bucket before the kill.
    for client in &direct {
        wait_uploaded(client)?;
    }
    let victim = homes[0];
    let survivor = 1 - victim;
    let moved: Vec<usize> = (0..AGENTS).filter(|a| homes[*a] == victim).collect();
    let objects = moved_block_objects(&caches[victim])?;
    replicas[victim].kill();
    log(
        "bench",
        format_args!(
            "replicas run {run}: killed replica {} (agents {moved:?} move)",
            victim + 1
        ),
    );

    let before = metrics_of(&direct[survivor])?;
    let mut results = Vec::new();
    for &agent in &moved {
        histories[agent].push(Message::user(user_text(agent, KILL_AFTER + 1)));
        let s = router.chat(&Chat {
            messages: &histories[agent],
            max_tokens: MAX_TOKENS,
            agent: Some(&ids[agent]),
            extra: None,
        })?;
        let cache = s.cache.unwrap_or_default();
        results.push(Moved {
            agent,
            ttft_moved_s: s.ttft_s,
            ttft_cold_s: f64::NAN,
            prompt: cache.prompt,
            reused: cache.reused,
            restored: cache.restored,
        });
    }
    let after = metrics_of(&direct[survivor])?;
    let delta =
        |name: &str| metric(&after, name).unwrap_or(0.0) - metric(&before, name).unwrap_or(0.0);
    let restored_bytes = delta("semantic_cache_restored_bytes_total");
    let downloaded_bytes = delta("semantic_object_store_downloaded_bytes_total");
    let restore_s = delta("semantic_restore_seconds_sum");
    let (plain_get_bytes, plain_get_s) = plain_gets(s3.port, &objects)?;
    drop(nginx);
    for r in &mut replicas {
        r.stop()?;
    }

    // The same turns on a fresh server: a cold prefill of the whole conversation.
    let cold_cache = ctx.fresh_dir(&format!("replicas-cold-{run}"))?;
    let mut cold = Server::start(ctx.ours(&cold_cache, "replicas-cold", &[])?)?;
    for m in &mut results {
        let s = cold.client().chat(&Chat {
            messages: &histories[m.agent],
            max_tokens: MAX_TOKENS,
            agent: Some(&format!("{}-cold", ids[m.agent])),
            extra: None,
        })?;
        m.ttft_cold_s = s.ttft_s;
    }
    cold.stop()?;
    drop(s3);
    let mb = |bytes: f64, s: f64| if s > 0.0 { bytes / s / 1e6 } else { f64::NAN };
    let r = RunResult {
        run,
        homes,
        restore_mb_s: mb(restored_bytes, restore_s),
        plain_get_mb_s: mb(plain_get_bytes as f64, plain_get_s),
        moved: results,
        restored_bytes,
        downloaded_bytes,
        restore_s,
        plain_get_bytes,
        plain_get_s,
    };
    log(
        "bench",
        format_args!(
            "replicas run {run}: moved TTFT {:?} ms vs cold {:?} ms; restore {:.0} MB/s, plain GET {:.0} MB/s",
            r.moved.iter().map(|m| (m.ttft_moved_s * 1e3).round()).collect::<Vec<_>>(),
            r.moved.iter().map(|m| (m.ttft_cold_s * 1e3).round()).collect::<Vec<_>>(),
            r.restore_mb_s,
            r.plain_get_mb_s
        ),
    );
    Ok(r)
}

fn wait_uploaded(client: &Client) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v: serde_json::Value = serde_json::from_str(&client.get_text("/health")?)?;
        let o = &v["object_store"];
        if o["status"] == "up" && o["upload_queue"] == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("uploads did not finish within 2 minutes: {v}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The object keys of every block the killed replica's agents' manifests name.
fn moved_block_objects(cache: &Path) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    let dir = cache.join("agents");
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let m: serde_json::Value = serde_json::from_slice(&fs::read(&path)?)?;
            for h in m["block_hashes"].as_array().into_iter().flatten() {
                if let Some(h) = h.as_str() {
                    keys.push(format!("{PREFIX}/blocks/{h}.safetensors"));
                }
            }
        }
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// GETs every object, 4 at a time, through plain signed requests; (bytes, seconds).
fn plain_gets(port: u16, keys: &[String]) -> Result<(u64, f64)> {
    let started = Instant::now();
    let chunks: Vec<&[String]> = keys.chunks(keys.len().div_ceil(4).max(1)).collect();
    let total = std::thread::scope(|scope| -> Result<u64> {
        let handles: Vec<_> = chunks
            .iter()
            .map(|chunk| {
                scope.spawn(move || -> Result<u64> {
                    let mut n = 0;
                    for key in *chunk {
                        n += signed_get(port, key)?;
                    }
                    Ok(n)
                })
            })
            .collect();
        let mut sum = 0;
        for h in handles {
            sum += h
                .join()
                .map_err(|_| anyhow::anyhow!("a GET thread panicked"))??;
        }
        Ok(sum)
    })?;
    Ok((total, started.elapsed().as_secs_f64()))
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let inner = Sha256::new()
        .chain_update(block.map(|b| b ^ 0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(block.map(|b| b ^ 0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A GET of `<bucket>/<key>` signed with AWS Signature V4 (path style); returns its bytes.
fn signed_get(port: u16, key: &str) -> Result<u64> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let stamp = utc_stamps(secs).1; // YYYYMMDD-HHMMSS
    let amz_date = format!("{}Z", stamp.replace('-', "T"));
    let date = &stamp[..8];
    let host = format!("127.0.0.1:{port}");
    let path = format!("/{BUCKET}/{key}");
    let empty = hex(&Sha256::digest(b""));
    let canonical = format!(
        "GET\n{path}\n\nhost:{host}\nx-amz-content-sha256:{empty}\nx-amz-date:{amz_date}\n\n\
         host;x-amz-content-sha256;x-amz-date\n{empty}"
    );
    let scope = format!("{date}/{REGION}/s3/aws4_request");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical.as_bytes()))
    );
    let k = hmac(format!("AWS4{SECRET_KEY}").as_bytes(), date.as_bytes());
    let k = hmac(&k, REGION.as_bytes());
    let k = hmac(&k, b"s3");
    let k = hmac(&k, b"aws4_request");
    let signature = hex(&hmac(&k, to_sign.as_bytes()));
    let auth = format!(
        "AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/{scope}, \
         SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={signature}"
    );
    let resp = ureq::get(&format!("http://{host}{path}"))
        .set("x-amz-date", &amz_date)
        .set("x-amz-content-sha256", &empty)
        .set("authorization", &auth)
        .call()
        .with_context(|| format!("GET {path}"))?;
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut resp.into_reader(), &mut body)?;
    Ok(body.len() as u64)
}

/// A helper process (s3s-fs, nginx), killed on drop.
struct Proc {
    child: Child,
    port: u16,
}

impl Proc {
    fn wait_listening(mut self, what: &str) -> Result<Self> {
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.try_wait()? {
                bail!("{what} exited ({status})");
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("{what} did not listen on port {} within 20 s", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(self)
    }

    fn s3s_fs(bin: &Path, root: &Path) -> Result<Self> {
        fs::create_dir_all(root.join(BUCKET))?;
        let port = free_port()?;
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        Self { child, port }.wait_listening("s3s-fs")
    }

    fn nginx(bin: &Path, dir: &Path, replicas: [u16; 2]) -> Result<Self> {
        let doc = fs::read_to_string(util::workspace_root().join("docs/deployment.md"))?;
        let block = doc
            .split("```nginx\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .context("docs/deployment.md has no nginx block")?;
        let port = free_port()?;
        let http = block
            .replace("127.0.0.1:8001", &format!("127.0.0.1:{}", replicas[0]))
            .replace("127.0.0.1:8002", &format!("127.0.0.1:{}", replicas[1]))
            .replace(
                "listen 127.0.0.1:8080;",
                &format!("listen 127.0.0.1:{port};"),
            );
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log;\nevents {{ worker_connections 256; }}\nhttp {{\n\
             access_log off;\nclient_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\nuwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n\
             {http}\n}}\n"
        );
        let conf_path: PathBuf = dir.join("nginx.conf");
        fs::write(&conf_path, conf)?;
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        Self { child, port }.wait_listening("nginx")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn render(runs: &[RunResult]) -> String {
    let all = |f: fn(&Moved) -> f64| -> Vec<f64> {
        runs.iter().flat_map(|r| r.moved.iter().map(f)).collect()
    };
    let per_run = |f: fn(&RunResult) -> f64| -> Vec<f64> { runs.iter().map(f).collect() };
    let moved = all(|m| m.ttft_moved_s * 1e3);
    let cold = all(|m| m.ttft_cold_s * 1e3);
    let restore = per_run(|r| r.restore_mb_s);
    let plain = per_run(|r| r.plain_get_mb_s);
    let mut t = Table::new(["figure", "value", "vs"]);
    t.row([
        "moved agent's next turn, TTFT ms (restored from the object store)".to_owned(),
        fmt_summary(Summary::of(&moved), 0),
        format!(
            "cold prefill {} ms: {} faster",
            fmt_summary(Summary::of(&cold), 0),
            fmt_ratio(median(&cold), median(&moved))
        ),
    ]);
    t.row([
        "restore MB/s (restored bytes / restore time, surviving replica)".to_owned(),
        fmt_summary(Summary::of(&restore), 0),
        format!(
            "plain GET of the same objects: {} MB/s",
            fmt_summary(Summary::of(&plain), 0)
        ),
    ]);
    let restored: Vec<f64> = all(|m| m.restored as f64);
    let prompt: Vec<f64> = all(|m| m.prompt as f64);
    t.row([
        "moved turn: prompt tokens / restored tokens".to_owned(),
        format!(
            "{} / {}",
            fmt_summary(Summary::of(&prompt), 0),
            fmt_summary(Summary::of(&restored), 0)
        ),
        String::new(),
    ]);
    format!(
        "{AGENTS} agents through nginx (`hash $http_x_agent_id consistent`) over two replicas \
         sharing an s3s-fs bucket; agent 0's replica is killed (SIGKILL) after turn {KILL_AFTER}, \
         and its agents' turn {} goes to the other replica.\n\n{}",
        KILL_AFTER + 1,
        t.render()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // RFC 4231, test case 2.
        assert_eq!(
            hex(&hmac(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block is hashed first.
        assert_eq!(
            hex(&hmac(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }
}
