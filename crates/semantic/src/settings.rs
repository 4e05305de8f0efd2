//! Layered configuration: defaults < TOML file < `.env` < environment < command-line flags.
//!
//! Every setting has one environment variable (the seed's `SEMANTIC_*` names), one key in the
//! TOML file (the variable without `SEMANTIC_`, lower case) and a default. Values are parsed
//! and validated at start-up; an invalid value names its variable and the allowed values.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

/// Why the configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A value is not allowed.
    #[error("{var}={value:?} is invalid: {allowed}")]
    Invalid {
        /// The environment variable of the setting.
        var: &'static str,
        /// The value given.
        value: String,
        /// What is allowed.
        allowed: String,
    },
    /// The TOML or `.env` file could not be read.
    #[error("cannot read configuration file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// An unknown key in the TOML file.
    #[error("unknown setting {key:?} in {path}; known settings: {known}")]
    UnknownKey {
        /// The key.
        key: String,
        /// The file.
        path: String,
        /// The known keys.
        known: String,
    },
}

/// Where a setting's effective value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The built-in default.
    Default,
    /// The TOML file (`--config`).
    File,
    /// The `.env` file of the working directory.
    DotEnv,
    /// The process environment.
    Env,
    /// A command-line flag.
    Flag,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Default => "default",
            Source::File => "config file",
            Source::DotEnv => ".env",
            Source::Env => "environment",
            Source::Flag => "flag",
        })
    }
}

/// One setting: its variable, default and meaning.
#[derive(Debug)]
pub struct SettingDef {
    /// Environment variable.
    pub var: &'static str,
    /// Default value as text (`""` = unset).
    pub default: &'static str,
    /// What it does.
    pub help: &'static str,
}

impl SettingDef {
    /// The key in the TOML file.
    pub fn key(&self) -> String {
        self.var
            .trim_start_matches("SEMANTIC_")
            .to_ascii_lowercase()
    }
}

/// Every setting, in display order.
pub const SETTINGS: &[SettingDef] = &[
    SettingDef { var: "SEMANTIC_MLX_MODEL_ID", default: "", help: "Model to serve: a Hugging Face id, a model directory or a .gguf file. Unset: the default model installed by `cargo xtask setup` ($SEMANTIC_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf)." },
    SettingDef { var: "SEMANTIC_MLX_CACHE_BUDGET_MB", default: "1024", help: "RAM for hot KV blocks, in MiB; blocks = budget / bytes_per_block." },
    SettingDef { var: "SEMANTIC_MLX_MAX_BATCH_SIZE", default: "4", help: "Generations that run at once (1-64); more wait in the queue." },
    SettingDef { var: "SEMANTIC_MLX_MAX_QUEUE", default: "64", help: "Requests that may wait for a slot (0-10000); more get 429/529 with Retry-After." },
    SettingDef { var: "SEMANTIC_MLX_KV_POOL_TOKENS", default: "4352", help: "Spare KV buffer capacity in tokens (0-1048576), allocated at start-up and refilled by released sequences, so restores skip fresh memory; 0 disables." },
    SettingDef { var: "SEMANTIC_MLX_PREFILL_STEP_SIZE", default: "256", help: "Prefill chunk in tokens; a positive multiple of the block size. Cache reuse happens in whole chunks." },
    SettingDef { var: "SEMANTIC_MLX_BLOCK_TOKENS", default: "256", help: "KV block size in tokens; a positive multiple of 64." },
    SettingDef { var: "SEMANTIC_MLX_KV_BITS", default: "null", help: "KV at rest: null (live dtype, bit-exact), 8 or 4 (MLX affine quantization, group 64; smaller, slightly lossy)." },
    SettingDef { var: "SEMANTIC_MLX_WEIGHTS", default: "auto", help: "How weights are kept: auto (host on Linux, quantized on macOS), host (the GGUF file's blocks in RAM, as much memory as the file; prefill through BLAS over panels dequantized on the fly, decode on the block kernels), f32 (everything dequantized to f32 at load: 4 bytes a weight) or quantized (MLX affine arrays, for Metal). Part of the cache fingerprint." },
    SettingDef { var: "SEMANTIC_MLX_ATTENTION", default: "auto", help: "Attention kernel: auto (host on Linux CPU, mlx on macOS), host (masked softmax on the CPU threads, matmuls in MLX; fastest on MLX's CPU backend) or mlx (fast::scaled_dot_product_attention). Part of the cache fingerprint." },
    SettingDef { var: "SEMANTIC_MLX_DEFAULT_MAX_TOKENS", default: "256", help: "Answer length when a request names none (1-65536)." },
    SettingDef { var: "SEMANTIC_MLX_MAX_TOKENS_CAP", default: "4096", help: "Longest answer a request may ask for (1-1048576, at least the default): a larger max_tokens (Claude Code asks 64000 or more) is lowered to it, and an answer that reaches it ends with stop_reason max_tokens / finish_reason length." },
    SettingDef { var: "SEMANTIC_MLX_DEFAULT_TEMPERATURE", default: "0.7", help: "Temperature when a request names none (0-2; 0 is greedy)." },
    SettingDef { var: "SEMANTIC_AGENT_CACHE_DIR", default: "", help: "Where KV blocks and agent manifests persist. Unset: $SEMANTIC_HOME/caches or ~/.semantic/caches." },
    SettingDef { var: "SEMANTIC_AGENT_DISK_BUDGET_MB", default: "0", help: "Disk budget for KV blocks in MiB; least recently used unpinned blocks go first. 0: unlimited." },
    SettingDef { var: "SEMANTIC_AGENT_VALIDATE_MODEL_TAG", default: "true", help: "true: cached KV is bound to the exact model weights (fingerprint includes the model file). false: bound only to the cache spec and tokenizer, so caches survive swapping between builds of the same model (outputs may then differ from a cold run)." },
    SettingDef { var: "SEMANTIC_OBJECT_STORE_BUCKET", default: "", help: "Bucket of an S3-compatible object store shared by replicas as a warm tier behind the local disk (reads: RAM, disk, bucket; writes: disk, then uploaded in the background). Unset: no shared tier. Credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and the other usual AWS variables)." },
    SettingDef { var: "SEMANTIC_OBJECT_STORE_ENDPOINT", default: "", help: "Endpoint URL of the object store (http://127.0.0.1:3900 for a local Garage, https://… for others; path-style requests). Unset: AWS S3 (or AWS_ENDPOINT_URL)." },
    SettingDef { var: "SEMANTIC_OBJECT_STORE_PREFIX", default: "semantic", help: "Key prefix inside the bucket; replicas that share a warm tier use the same bucket and prefix." },
    SettingDef { var: "SEMANTIC_OBJECT_STORE_REGION", default: "", help: "Region of the bucket. Unset: AWS_REGION, else us-east-1." },
    SettingDef { var: "SEMANTIC_OBJECT_STORE_TIMEOUT_MS", default: "2000", help: "Longest wait (50-60000 ms) for one object-store read on a turn's path; a slower or unreachable store is marked down (one warning, /health and /metrics say so), skipped by reads and probed until it answers, when queued uploads catch up." },
    SettingDef { var: "SEMANTIC_SERVER_HOST", default: "127.0.0.1", help: "Address to listen on." },
    SettingDef { var: "SEMANTIC_SERVER_PORT", default: "8000", help: "Port to listen on (0 picks a free one)." },
    SettingDef { var: "SEMANTIC_API_KEYS", default: "", help: "Comma-separated API keys; unset disables auth. Each key is its own cache namespace." },
    SettingDef { var: "SEMANTIC_ADMIN_KEY", default: "", help: "Key for admin routes (agent deletion, pin). Unset: admin routes need no key when auth is off and are refused when it is on." },
    SettingDef { var: "SEMANTIC_SERVER_LOG_LEVEL", default: "info", help: "trace, debug, info, warn or error (or a tracing filter)." },
    SettingDef { var: "SEMANTIC_SERVER_LOG_FORMAT", default: "human", help: "human or json." },
    SettingDef { var: "SEMANTIC_SERVER_MAX_BODY_MB", default: "32", help: "Largest request body in MiB (1-4096; 413 beyond)." },
    SettingDef { var: "SEMANTIC_SERVER_REQUEST_TIMEOUT_SECS", default: "600", help: "A generation running longer is cancelled (0: no limit)." },
    SettingDef { var: "SEMANTIC_SERVER_HEADER_READ_TIMEOUT_SECS", default: "10", help: "A request's headers must be complete within this many seconds (1-3600), counted from the connection's start or the previous response's end; else the connection is closed." },
    SettingDef { var: "SEMANTIC_SERVER_KEEP_ALIVE_TIMEOUT_SECS", default: "30", help: "A connection with no request in flight for this many seconds (1-3600) is closed." },
    SettingDef { var: "SEMANTIC_SERVER_MAX_CONNECTIONS", default: "1024", help: "Most open client connections (1-1000000); more wait in the listen backlog. Lowered at start to fit the file-descriptor limit (raised to its hard limit first), with a warning." },
    SettingDef { var: "SEMANTIC_SERVER_SHUTDOWN_GRACE_SECS", default: "30", help: "On SIGTERM / Ctrl-C: seconds (0-3600) requests in flight may still run; then streams end with an error event and the process exits within a few seconds." },
];

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// The effective, validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Model to serve (`None`: the default model).
    pub model_id: Option<String>,
    /// Hot-tier budget in bytes.
    pub cache_budget_bytes: u64,
    /// Concurrent generations.
    pub max_batch_size: usize,
    /// Waiting requests.
    pub max_queue: usize,
    /// Spare KV buffer capacity for restores, in tokens (`SEMANTIC_MLX_KV_POOL_TOKENS`).
    pub kv_pool_tokens: usize,
    /// Prefill chunk in tokens.
    pub prefill_step_size: usize,
    /// KV block size in tokens.
    pub block_tokens: u32,
    /// KV bits at rest (`None`: live dtype).
    pub kv_bits: Option<u8>,
    /// Attention kernel (`None`: the platform's default).
    pub attention: Option<engine_mlx::AttentionKind>,
    /// Weight format (`None`: the platform's default).
    pub weights: Option<engine_mlx::WeightFormat>,
    /// Default answer length.
    pub default_max_tokens: u32,
    /// Longest answer a request may ask for (a larger `max_tokens` is lowered to it).
    pub max_tokens_cap: u32,
    /// Default temperature.
    pub default_temperature: f32,
    /// Cache directory.
    pub cache_dir: PathBuf,
    /// Disk budget in bytes (`None`: unlimited).
    pub disk_budget_bytes: Option<u64>,
    /// Bind KV to the exact weights.
    pub validate_model_tag: bool,
    /// Bucket of the shared object-store tier (`None`: no shared tier).
    pub object_bucket: Option<String>,
    /// Endpoint URL of the object store (`None`: AWS).
    pub object_endpoint: Option<String>,
    /// Key prefix inside the bucket.
    pub object_prefix: String,
    /// Region of the bucket (`None`: from the environment or us-east-1).
    pub object_region: Option<String>,
    /// Longest wait for one object-store read, in milliseconds.
    pub object_timeout_ms: u64,
    /// Listen address.
    pub host: String,
    /// Listen port.
    pub port: u16,
    /// API keys (empty: no auth).
    pub api_keys: Vec<String>,
    /// Admin key.
    pub admin_key: Option<String>,
    /// Log filter.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Body limit in bytes.
    pub max_body_bytes: usize,
    /// Generation timeout in seconds (0: none).
    pub request_timeout_secs: u64,
    /// Header read timeout in seconds.
    pub header_read_timeout_secs: u64,
    /// Idle keep-alive timeout in seconds.
    pub keep_alive_timeout_secs: u64,
    /// Most open client connections.
    pub max_connections: usize,
    /// Shutdown grace period in seconds.
    pub shutdown_grace_secs: u64,
    /// Where each value came from, by variable.
    pub sources: BTreeMap<&'static str, (String, Source)>,
}

/// `$SEMANTIC_HOME`, or `~/.semantic`.
pub fn semantic_home() -> PathBuf {
    if let Some(h) = std::env::var_os("SEMANTIC_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    home_dir().join(".semantic")
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Path of the default model file.
pub fn default_model_path() -> PathBuf {
    semantic_home()
        .join("models")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn expand_tilde(p: &str) -> PathBuf {
    match p.strip_prefix("~/") {
        Some(rest) => home_dir().join(rest),
        None => PathBuf::from(p),
    }
}

/// Inputs to [`Settings::load`]: everything outside the process environment.
#[derive(Debug, Default, Clone)]
pub struct Layers {
    /// TOML file given with `--config`.
    pub config_file: Option<PathBuf>,
    /// `.env` file to read (normally `./.env` if it exists).
    pub dotenv_file: Option<PathBuf>,
    /// Values from command-line flags, by variable.
    pub flags: HashMap<&'static str, String>,
}

fn read_toml(path: &Path) -> Result<HashMap<String, String>, SettingsError> {
    let err = |reason: String| SettingsError::File {
        path: path.display().to_string(),
        reason,
    };
    let cfg = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .build()
        .map_err(|e| err(e.to_string()))?;
    let table = cfg
        .try_deserialize::<HashMap<String, config::Value>>()
        .map_err(|e| err(e.to_string()))?;
    let known: Vec<String> = SETTINGS.iter().map(SettingDef::key).collect();
    let mut out = HashMap::new();
    for (k, v) in table {
        let k = k.to_ascii_lowercase();
        if !known.contains(&k) {
            return Err(SettingsError::UnknownKey {
                key: k,
                path: path.display().to_string(),
                known: known.join(", "),
            });
        }
        let text = match v.kind {
            config::ValueKind::Nil => "null".to_string(),
            config::ValueKind::Array(items) => items
                .into_iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(","),
            _ => v.to_string(),
        };
        out.insert(k, text);
    }
    Ok(out)
}

fn read_dotenv(path: &Path) -> Result<HashMap<String, String>, SettingsError> {
    let iter = dotenvy::from_path_iter(path).map_err(|e| SettingsError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut out = HashMap::new();
    for item in iter {
        let (k, v) = item.map_err(|e| SettingsError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        out.insert(k, v);
    }
    Ok(out)
}

/// `SEMANTIC_MLX_MAX_TOKENS_CAP`: 1 to 1,048,576 and at least the default answer length.
fn max_tokens_cap(v: &str, default_max_tokens: u32) -> Result<u32, SettingsError> {
    let cap: u32 = parse_range("SEMANTIC_MLX_MAX_TOKENS_CAP", v, 1, 1 << 20)?;
    if cap < default_max_tokens {
        return Err(invalid(
            "SEMANTIC_MLX_MAX_TOKENS_CAP",
            v,
            format!("at least SEMANTIC_MLX_DEFAULT_MAX_TOKENS ({default_max_tokens})"),
        ));
    }
    Ok(cap)
}

fn invalid(var: &'static str, value: &str, allowed: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        var,
        value: value.to_string(),
        allowed: allowed.into(),
    }
}

fn parse_range<T>(var: &'static str, v: &str, lo: T, hi: T) -> Result<T, SettingsError>
where
    T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
{
    let allowed = || format!("a number from {lo} to {hi}");
    let n: T = v.trim().parse().map_err(|_| invalid(var, v, allowed()))?;
    if n < lo || n > hi {
        return Err(invalid(var, v, allowed()));
    }
    Ok(n)
}

fn parse_bool(var: &'static str, v: &str) -> Result<bool, SettingsError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(invalid(var, v, "true or false")),
    }
}

impl Settings {
    /// Builds the effective configuration from the layers and the process environment.
    pub fn load(layers: &Layers) -> Result<Self, SettingsError> {
        Self::load_with_env(layers, &std::env::vars().collect())
    }

    /// As [`Settings::load`], with an explicit environment (for tests).
    pub fn load_with_env(
        layers: &Layers,
        env: &HashMap<String, String>,
    ) -> Result<Self, SettingsError> {
        let file = match &layers.config_file {
            Some(p) => read_toml(p)?,
            None => HashMap::new(),
        };
        let dotenv = match &layers.dotenv_file {
            Some(p) if p.exists() => read_dotenv(p)?,
            _ => HashMap::new(),
        };
        let mut sources = BTreeMap::new();
        for def in SETTINGS {
            let (value, source) = if let Some(v) = layers.flags.get(def.var) {
                (v.clone(), Source::Flag)
            } else if let Some(v) = env.get(def.var) {
                (v.clone(), Source::Env)
            } else if let Some(v) = dotenv.get(def.var) {
                (v.clone(), Source::DotEnv)
            } else if let Some(v) = file.get(&def.key()) {
                (v.clone(), Source::File)
            } else {
                (def.default.to_string(), Source::Default)
            };
            sources.insert(def.var, (value, source));
        }
        let get = |var: &'static str| -> String {
            sources
                .get(var)
                .map(|(v, _)| v.trim().to_string())
                .unwrap_or_default()
        };
        let opt = |var: &'static str| -> Option<String> {
            let v = get(var);
            (!v.is_empty()).then_some(v)
        };

        let block_tokens: u32 = parse_range(
            "SEMANTIC_MLX_BLOCK_TOKENS",
            &get("SEMANTIC_MLX_BLOCK_TOKENS"),
            64,
            4096,
        )?;
        if block_tokens % 64 != 0 {
            return Err(invalid(
                "SEMANTIC_MLX_BLOCK_TOKENS",
                &get("SEMANTIC_MLX_BLOCK_TOKENS"),
                "a positive multiple of 64",
            ));
        }
        let prefill_step_size: usize = parse_range(
            "SEMANTIC_MLX_PREFILL_STEP_SIZE",
            &get("SEMANTIC_MLX_PREFILL_STEP_SIZE"),
            64,
            16384,
        )?;
        if prefill_step_size % block_tokens as usize != 0 {
            return Err(invalid(
                "SEMANTIC_MLX_PREFILL_STEP_SIZE",
                &get("SEMANTIC_MLX_PREFILL_STEP_SIZE"),
                format!("a positive multiple of the block size ({block_tokens})"),
            ));
        }
        let kv_bits = match get("SEMANTIC_MLX_KV_BITS").to_ascii_lowercase().as_str() {
            "" | "null" | "none" => None,
            "8" => Some(8),
            "4" => Some(4),
            other => return Err(invalid("SEMANTIC_MLX_KV_BITS", other, "null, 8 or 4")),
        };
        let attention = match get("SEMANTIC_MLX_ATTENTION").to_ascii_lowercase().as_str() {
            "" | "auto" => None,
            "host" => Some(engine_mlx::AttentionKind::Host),
            "mlx" => Some(engine_mlx::AttentionKind::Mlx),
            other => {
                return Err(invalid(
                    "SEMANTIC_MLX_ATTENTION",
                    other,
                    "auto, host or mlx",
                ))
            }
        };
        let weights = match get("SEMANTIC_MLX_WEIGHTS").to_ascii_lowercase().as_str() {
            "" | "auto" => None,
            other => Some(engine_mlx::WeightFormat::from_name(other).ok_or_else(|| {
                invalid(
                    "SEMANTIC_MLX_WEIGHTS",
                    other,
                    "auto, host, f32 or quantized",
                )
            })?),
        };
        let log_format = match get("SEMANTIC_SERVER_LOG_FORMAT")
            .to_ascii_lowercase()
            .as_str()
        {
            "human" | "text" => LogFormat::Human,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "SEMANTIC_SERVER_LOG_FORMAT",
                    other,
                    "human or json",
                ))
            }
        };
        let log_level = get("SEMANTIC_SERVER_LOG_LEVEL").to_ascii_lowercase();
        if log_level.is_empty() {
            return Err(invalid(
                "SEMANTIC_SERVER_LOG_LEVEL",
                "",
                "trace, debug, info, warn or error",
            ));
        }
        let cache_budget_mb: u64 = parse_range(
            "SEMANTIC_MLX_CACHE_BUDGET_MB",
            &get("SEMANTIC_MLX_CACHE_BUDGET_MB"),
            16,
            1 << 24,
        )?;
        let disk_budget_mb: u64 = parse_range(
            "SEMANTIC_AGENT_DISK_BUDGET_MB",
            &get("SEMANTIC_AGENT_DISK_BUDGET_MB"),
            0,
            1 << 30,
        )?;
        let cache_dir = match opt("SEMANTIC_AGENT_CACHE_DIR") {
            Some(d) => expand_tilde(&d),
            None => semantic_home().join("caches"),
        };
        let default_temperature: f32 = parse_range(
            "SEMANTIC_MLX_DEFAULT_TEMPERATURE",
            &get("SEMANTIC_MLX_DEFAULT_TEMPERATURE"),
            0.0,
            2.0,
        )?;
        let default_max_tokens: u32 = parse_range(
            "SEMANTIC_MLX_DEFAULT_MAX_TOKENS",
            &get("SEMANTIC_MLX_DEFAULT_MAX_TOKENS"),
            1,
            65_536,
        )?;
        let max_tokens_cap =
            max_tokens_cap(&get("SEMANTIC_MLX_MAX_TOKENS_CAP"), default_max_tokens)?;
        Ok(Self {
            model_id: opt("SEMANTIC_MLX_MODEL_ID"),
            cache_budget_bytes: cache_budget_mb * 1024 * 1024,
            max_batch_size: parse_range(
                "SEMANTIC_MLX_MAX_BATCH_SIZE",
                &get("SEMANTIC_MLX_MAX_BATCH_SIZE"),
                1,
                64,
            )?,
            max_queue: parse_range(
                "SEMANTIC_MLX_MAX_QUEUE",
                &get("SEMANTIC_MLX_MAX_QUEUE"),
                0,
                10_000,
            )?,
            kv_pool_tokens: parse_range(
                "SEMANTIC_MLX_KV_POOL_TOKENS",
                &get("SEMANTIC_MLX_KV_POOL_TOKENS"),
                0,
                1 << 20,
            )?,
            prefill_step_size,
            block_tokens,
            kv_bits,
            attention,
            weights,
            default_max_tokens,
            max_tokens_cap,
            default_temperature,
            cache_dir,
            disk_budget_bytes: (disk_budget_mb > 0).then_some(disk_budget_mb * 1024 * 1024),
            validate_model_tag: parse_bool(
                "SEMANTIC_AGENT_VALIDATE_MODEL_TAG",
                &get("SEMANTIC_AGENT_VALIDATE_MODEL_TAG"),
            )?,
            object_bucket: opt("SEMANTIC_OBJECT_STORE_BUCKET"),
            object_endpoint: opt("SEMANTIC_OBJECT_STORE_ENDPOINT"),
            object_prefix: get("SEMANTIC_OBJECT_STORE_PREFIX"),
            object_region: opt("SEMANTIC_OBJECT_STORE_REGION"),
            object_timeout_ms: parse_range(
                "SEMANTIC_OBJECT_STORE_TIMEOUT_MS",
                &get("SEMANTIC_OBJECT_STORE_TIMEOUT_MS"),
                50,
                60_000,
            )?,
            host: get("SEMANTIC_SERVER_HOST"),
            port: parse_range(
                "SEMANTIC_SERVER_PORT",
                &get("SEMANTIC_SERVER_PORT"),
                0,
                65_535,
            )?,
            api_keys: get("SEMANTIC_API_KEYS")
                .split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(String::from)
                .collect(),
            admin_key: opt("SEMANTIC_ADMIN_KEY"),
            log_level,
            log_format,
            max_body_bytes: parse_range::<usize>(
                "SEMANTIC_SERVER_MAX_BODY_MB",
                &get("SEMANTIC_SERVER_MAX_BODY_MB"),
                1,
                4096,
            )? * 1024
                * 1024,
            request_timeout_secs: parse_range(
                "SEMANTIC_SERVER_REQUEST_TIMEOUT_SECS",
                &get("SEMANTIC_SERVER_REQUEST_TIMEOUT_SECS"),
                0,
                86_400,
            )?,
            header_read_timeout_secs: parse_range(
                "SEMANTIC_SERVER_HEADER_READ_TIMEOUT_SECS",
                &get("SEMANTIC_SERVER_HEADER_READ_TIMEOUT_SECS"),
                1,
                3600,
            )?,
            keep_alive_timeout_secs: parse_range(
                "SEMANTIC_SERVER_KEEP_ALIVE_TIMEOUT_SECS",
                &get("SEMANTIC_SERVER_KEEP_ALIVE_TIMEOUT_SECS"),
                1,
                3600,
            )?,
            max_connections: parse_range(
                "SEMANTIC_SERVER_MAX_CONNECTIONS",
                &get("SEMANTIC_SERVER_MAX_CONNECTIONS"),
                1,
                1_000_000,
            )?,
            shutdown_grace_secs: parse_range(
                "SEMANTIC_SERVER_SHUTDOWN_GRACE_SECS",
                &get("SEMANTIC_SERVER_SHUTDOWN_GRACE_SECS"),
                0,
                3600,
            )?,
            sources,
        })
    }

    /// The model to load: the configured one, or the default model file.
    pub fn model_or_default(&self) -> String {
        self.model_id
            .clone()
            .unwrap_or_else(|| default_model_path().display().to_string())
    }

    /// `semantic config`: every setting, its effective value and where it came from (keys are
    /// masked).
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for def in SETTINGS {
            let (value, source) = self
                .sources
                .get(def.var)
                .cloned()
                .unwrap_or((String::new(), Source::Default));
            let shown = if def.var.contains("KEY") && !value.is_empty() {
                "<set>".to_string()
            } else if value.is_empty() {
                "(unset)".to_string()
            } else {
                value
            };
            out.push_str(&format!("{:<40} {:<28} [{}]\n", def.var, shown, source));
            out.push_str(&format!("    {}\n", def.help));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let s = Settings::load_with_env(&Layers::default(), &HashMap::new()).expect("defaults");
        assert_eq!(s.kv_bits, None);
        assert_eq!(s.prefill_step_size, 256);
        assert_eq!(s.kv_pool_tokens, engine_mlx::DEFAULT_KV_POOL_TOKENS);
        assert_eq!(s.port, 8000);
        assert!(s.api_keys.is_empty());
        assert_eq!(s.sources["SEMANTIC_SERVER_PORT"].1, Source::Default);
    }

    #[test]
    fn layering_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let toml = dir.path().join("semantic.toml");
        std::fs::write(
            &toml,
            "server_port = 7001\nmlx_max_batch_size = 3\nmlx_kv_bits = 8\n",
        )
        .expect("write");
        let dotenv = dir.path().join(".env");
        std::fs::write(
            &dotenv,
            "SEMANTIC_SERVER_PORT=7002\nSEMANTIC_MLX_MAX_QUEUE=5\n",
        )
        .expect("write");
        let mut layers = Layers {
            config_file: Some(toml),
            dotenv_file: Some(dotenv),
            flags: HashMap::new(),
        };
        let e = env(&[("SEMANTIC_MLX_MAX_QUEUE", "6")]);
        let s = Settings::load_with_env(&layers, &e).expect("valid");
        assert_eq!(s.port, 7002);
        assert_eq!(s.max_batch_size, 3);
        assert_eq!(s.kv_bits, Some(8));
        assert_eq!(s.max_queue, 6);
        assert_eq!(s.sources["SEMANTIC_SERVER_PORT"].1, Source::DotEnv);
        assert_eq!(s.sources["SEMANTIC_MLX_MAX_BATCH_SIZE"].1, Source::File);
        layers.flags.insert("SEMANTIC_SERVER_PORT", "7003".into());
        let s = Settings::load_with_env(&layers, &e).expect("valid");
        assert_eq!(s.port, 7003);
        assert_eq!(s.sources["SEMANTIC_SERVER_PORT"].1, Source::Flag);
    }

    #[test]
    fn invalid_values_name_the_variable() {
        for (var, value, needle) in [
            ("SEMANTIC_MLX_KV_BITS", "3", "null, 8 or 4"),
            ("SEMANTIC_MLX_ATTENTION", "fast", "auto, host or mlx"),
            ("SEMANTIC_MLX_MAX_BATCH_SIZE", "0", "1 to 64"),
            (
                "SEMANTIC_MLX_PREFILL_STEP_SIZE",
                "300",
                "multiple of the block size",
            ),
            ("SEMANTIC_MLX_BLOCK_TOKENS", "100", "multiple of 64"),
            ("SEMANTIC_SERVER_LOG_FORMAT", "xml", "human or json"),
            (
                "SEMANTIC_AGENT_VALIDATE_MODEL_TAG",
                "maybe",
                "true or false",
            ),
            ("SEMANTIC_MLX_DEFAULT_TEMPERATURE", "9", "0 to 2"),
            ("SEMANTIC_OBJECT_STORE_TIMEOUT_MS", "10", "50 to 60000"),
        ] {
            let err = Settings::load_with_env(&Layers::default(), &env(&[(var, value)]))
                .expect_err("invalid");
            let msg = err.to_string();
            assert!(msg.contains(var) && msg.contains(needle), "{msg}");
        }
    }

    #[test]
    fn unknown_file_key_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let toml = dir.path().join("semantic.toml");
        std::fs::write(&toml, "prot = 1\n").expect("write");
        let layers = Layers {
            config_file: Some(toml),
            ..Layers::default()
        };
        let err = Settings::load_with_env(&layers, &HashMap::new()).expect_err("unknown");
        assert!(err.to_string().contains("prot"));
    }
}

#[cfg(test)]
mod max_tokens_cap_tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let env = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::load_with_env(&Layers::default(), &env)
    }

    #[test]
    fn the_object_store_tier_is_off_unless_a_bucket_is_set() {
        let s = load(&[]).expect("defaults");
        assert_eq!(s.object_bucket, None);
        assert_eq!(
            (s.object_prefix.as_str(), s.object_timeout_ms),
            ("semantic", 2000)
        );
        let s = load(&[
            ("SEMANTIC_OBJECT_STORE_BUCKET", "semantic-kv"),
            ("SEMANTIC_OBJECT_STORE_ENDPOINT", "http://127.0.0.1:3900"),
            ("SEMANTIC_OBJECT_STORE_PREFIX", "prod"),
        ])
        .expect("valid");
        assert_eq!(s.object_bucket.as_deref(), Some("semantic-kv"));
        assert_eq!(s.object_endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert_eq!(s.object_prefix, "prod");
    }

    #[test]
    fn the_cap_defaults_to_4096_and_may_not_undercut_the_default_length() {
        let s = load(&[]).expect("defaults");
        assert_eq!(s.max_tokens_cap, 4096);
        assert_eq!(
            s.max_tokens_cap,
            agent_session::DEFAULT_MAX_TOKENS_CAP,
            "the service's default and the setting's agree"
        );
        let s = load(&[("SEMANTIC_MLX_MAX_TOKENS_CAP", "20000")]).expect("valid");
        assert_eq!(s.max_tokens_cap, 20_000);
        let e = load(&[
            ("SEMANTIC_MLX_MAX_TOKENS_CAP", "100"),
            ("SEMANTIC_MLX_DEFAULT_MAX_TOKENS", "256"),
        ])
        .expect_err("below the default");
        let text = e.to_string();
        assert!(
            text.contains("SEMANTIC_MLX_MAX_TOKENS_CAP") && text.contains("256"),
            "{text}"
        );
        assert!(load(&[("SEMANTIC_MLX_MAX_TOKENS_CAP", "0")]).is_err());
    }
}

#[cfg(test)]
mod doc_tests {
    use super::SETTINGS;

    /// docs/configuration.md documents every setting with its default.
    #[test]
    fn configuration_doc_is_complete() {
        let doc = include_str!("../../../docs/configuration.md");
        for def in SETTINGS {
            let default = if def.default.is_empty() {
                "(unset)"
            } else {
                def.default
            };
            let row = format!("| `{}` | `{}` | `{}` |", def.var, def.key(), default);
            assert!(doc.contains(&row), "docs/configuration.md lacks {row}");
        }
    }

    /// The body limit's default is http-api's one constant, and both docs state it.
    #[test]
    fn body_limit_default_is_http_apis() {
        let def = SETTINGS
            .iter()
            .find(|d| d.var == "SEMANTIC_SERVER_MAX_BODY_MB")
            .expect("the body limit setting");
        let mb: usize = def.default.parse().expect("a number");
        assert_eq!(mb * 1024 * 1024, http_api::DEFAULT_MAX_BODY_BYTES);
        let api = include_str!("../../../docs/api.md");
        assert!(
            api.contains(&format!("(default {mb} MiB")),
            "docs/api.md does not state the {mb} MiB body limit"
        );
    }
}
