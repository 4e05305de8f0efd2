//! The one place that knows every adapter: builds the MLX engine, the disk store and the
//! HTTP API from the settings, runs the server, and shuts it down cleanly.

use crate::settings::{LogFormat, Settings};
use agent_session::{
    AgentId, AgentKey, AgentService, CacheStore, ChatFormatter, InferenceEngine, Namespace,
    ServiceConfig, SystemClock,
};
use cache_store_disk::{DiskCacheStore, DiskStoreConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// The store's async methods do blocking file I/O inside, so a plain executor completes them.
use futures::executor::block_on;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The model could not be loaded.
    #[error("cannot load model {model}: {reason}")]
    Model {
        /// What was asked for.
        model: String,
        /// Why it failed (and how to fix it).
        reason: String,
    },
    /// The cache directory could not be opened.
    #[error("cannot open the cache directory {dir}: {reason}")]
    Store {
        /// The directory.
        dir: String,
        /// Why.
        reason: String,
    },
    /// Wiring the service failed (configuration does not fit the model).
    #[error("invalid configuration for this model: {0}")]
    Service(String),
    /// Binding or serving failed.
    #[error("server error: {0}")]
    Server(String),
    /// An agents command failed.
    #[error("{0}")]
    Agents(String),
}

fn init_logging(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match settings.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

/// The model to load, with a helpful error when the default model is missing.
fn model_location(settings: &Settings) -> Result<String, AppError> {
    let model = settings.model_or_default();
    if settings.model_id.is_none() && !std::path::Path::new(&model).exists() {
        return Err(AppError::Model {
            model,
            reason: "the default model is not installed; run `cargo xtask setup` \
                     (or pass --model <hf-id | dir | file.gguf>)"
                .into(),
        });
    }
    Ok(model)
}

/// The loaded model: the engine and its tokenizer + chat template.
type LoadedModel = (Arc<dyn InferenceEngine>, Arc<dyn ChatFormatter>);

/// Loads the engine and the chat formatter, printing progress when it takes over a second.
fn load_engine(settings: &Settings) -> Result<LoadedModel, AppError> {
    let model = model_location(settings)?;
    let done = Arc::new(AtomicBool::new(false));
    let ticker = {
        let done = done.clone();
        let model = model.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut next = 1;
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if start.elapsed().as_secs() >= next {
                    tracing::info!("loading {model}… {next}s");
                    next += 1;
                }
            }
        })
    };
    let config = engine_mlx::EngineConfig {
        block_tokens: settings.block_tokens,
        kv_bits: settings.kv_bits,
        bind_to_weights: settings.validate_model_tag,
        attention: settings.attention.unwrap_or_default(),
        weight_format: settings.weights.unwrap_or_default(),
        kv_pool_tokens: settings.kv_pool_tokens,
        kv_budget_bytes: settings.cache_budget_bytes,
        ..engine_mlx::EngineConfig::default()
    };
    let loaded = engine_mlx::MlxEngine::load(&model, config);
    done.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    let (engine, formatter) = loaded.map_err(|e| AppError::Model {
        model: model.clone(),
        reason: e.to_string(),
    })?;
    let formatter: Arc<dyn ChatFormatter> = formatter;
    Ok((Arc::new(engine), formatter))
}

fn open_store(settings: &Settings) -> Result<DiskCacheStore, AppError> {
    let mut cfg = DiskStoreConfig::new(&settings.cache_dir);
    cfg.disk_budget_bytes = settings.disk_budget_bytes;
    DiskCacheStore::open(cfg).map_err(|e| AppError::Store {
        dir: settings.cache_dir.display().to_string(),
        reason: e.to_string(),
    })
}

/// The store of `semantic serve`: the disk store, with the shared object-store tier behind
/// it when `SEMANTIC_OBJECT_STORE_BUCKET` is set.
fn open_serving_store(settings: &Settings) -> Result<Arc<dyn CacheStore>, AppError> {
    let disk = open_store(settings)?;
    let Some(bucket) = &settings.object_bucket else {
        return Ok(Arc::new(disk));
    };
    let fail = |reason: String| AppError::Store {
        dir: format!("object store bucket {bucket}"),
        reason,
    };
    let cfg = cache_store_object::ObjectTierConfig {
        prefix: settings.object_prefix.clone(),
        read_timeout: Duration::from_millis(settings.object_timeout_ms),
        ..cache_store_object::ObjectTierConfig::default()
    };
    let s3 = cache_store_object::S3Settings {
        endpoint: settings.object_endpoint.clone(),
        bucket: bucket.clone(),
        region: settings.object_region.clone(),
        ..cache_store_object::S3Settings::default()
    };
    let remote = cache_store_object::build_s3(&s3, &cfg).map_err(|e| fail(e.to_string()))?;
    tracing::info!(
        bucket = %bucket,
        endpoint = settings.object_endpoint.as_deref().unwrap_or("AWS"),
        prefix = %settings.object_prefix,
        "shared object-store tier behind the disk store"
    );
    let tier = cache_store_object::ObjectTierStore::open(disk, remote, cfg)
        .map_err(|e| fail(e.to_string()))?;
    Ok(Arc::new(tier))
}

fn service_config(settings: &Settings, engine: &dyn InferenceEngine) -> ServiceConfig {
    let spec = &engine.model().spec;
    let mut c = ServiceConfig::for_block_tokens(spec.block_tokens() as usize);
    c.prefill_step = settings.prefill_step_size;
    c.max_batch_size = settings.max_batch_size;
    c.max_queue = settings.max_queue;
    c.default_max_tokens = settings.default_max_tokens;
    c.max_tokens_cap = settings.max_tokens_cap;
    c.hot_capacity_blocks =
        usize::try_from(spec.blocks_for_budget(settings.cache_budget_bytes)).unwrap_or(usize::MAX);
    c
}

/// Descriptors kept for everything but client connections (model and cache files, block
/// reads, the runtime's own, logs).
const RESERVED_FDS: u64 = 64;

/// Raises the soft file-descriptor limit to the hard one (as servers do) and returns the
/// resulting soft limit (`None` when unknown or unlimited).
fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let before = getrlimit(Resource::Nofile);
    if before.current != before.maximum {
        let raised = Rlimit {
            current: before.maximum,
            maximum: before.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => tracing::info!(
                from = ?before.current,
                to = ?before.maximum,
                "raised the file-descriptor limit to its hard limit"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot raise the file-descriptor limit"),
        }
    }
    getrlimit(Resource::Nofile).current
}

/// The connection cap: the setting, lowered (with a warning) to fit the descriptor limit.
fn connection_cap(setting: usize, fd_limit: Option<u64>) -> usize {
    let Some(limit) = fd_limit else {
        return setting;
    };
    let fit = usize::try_from(limit.saturating_sub(RESERVED_FDS).max(8)).unwrap_or(usize::MAX);
    if fit < setting {
        tracing::warn!(
            fd_limit = limit,
            max_connections = fit,
            configured = setting,
            "the file-descriptor limit is near: SEMANTIC_SERVER_MAX_CONNECTIONS lowered to fit it (raise `ulimit -n` to serve more connections)"
        );
        fit
    } else {
        setting
    }
}

/// `semantic serve`: load, wire, listen, and on SIGTERM / Ctrl-C drain, flush and return.
pub fn serve(settings: Settings) -> Result<(), AppError> {
    init_logging(&settings);
    let max_connections = connection_cap(settings.max_connections, raise_fd_limit());
    // Validate the cheap things before the expensive model load.
    let store = open_serving_store(&settings)?;
    let (engine, formatter) = load_engine(&settings)?;
    let model = engine.model().clone();
    tracing::info!(
        model = %model.id,
        weights = %model.weight_format,
        block_tokens = model.spec.block_tokens(),
        bytes_per_block = model.spec.bytes_per_block(),
        blas = %engine_mlx::blas::core_name().unwrap_or_else(|| "not OpenBLAS".into()),
        "model loaded"
    );
    let config = service_config(&settings, engine.as_ref());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| AppError::Server(e.to_string()))?;
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    // Template rendering and tokenization run on the blocking pool, one per CPU at most.
    let runner = Arc::new(http_api::TokioBlocking::new(runtime.handle().clone(), cpus));
    let service = AgentService::new(engine, store, formatter, Arc::new(SystemClock), config)
        .map_err(|e| AppError::Service(e.to_string()))?
        .with_blocking_runner(runner);
    let service = Arc::new(service);

    runtime.block_on(async {
        let limits = http_api::Limits {
            max_body_bytes: settings.max_body_bytes,
            request_timeout: (settings.request_timeout_secs > 0)
                .then(|| Duration::from_secs(settings.request_timeout_secs)),
            shutdown_drain: Duration::from_secs(settings.shutdown_grace_secs),
            header_read_timeout: Duration::from_secs(settings.header_read_timeout_secs),
            keep_alive_timeout: Duration::from_secs(settings.keep_alive_timeout_secs),
            max_connections,
            ..http_api::Limits::default()
        };
        let state = http_api::AppState::new(service.clone())
            .with_limits(limits)
            .with_api_keys(settings.api_keys.clone())
            .with_admin_key(settings.admin_key.clone())
            .with_default_temperature(settings.default_temperature);
        let addr = format!("{}:{}", settings.host, settings.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| AppError::Server(format!("cannot listen on {addr}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| AppError::Server(e.to_string()))?;
        tracing::info!("listening on http://{local}");
        http_api::serve(listener, state, http_api::shutdown_signal())
            .await
            .map_err(|e| AppError::Server(e.to_string()))?;
        tracing::info!("stopped accepting; flushing cache writes");
        service
            .flush()
            .await
            .map_err(|e| AppError::Server(format!("flushing the cache: {e}")))
    })?;
    tracing::info!("shut down cleanly");
    Ok(())
}

/// `semantic models inspect`: the spec and capacity maths, without loading weights.
pub fn inspect(settings: &Settings) -> Result<String, AppError> {
    let model = model_location(settings)?;
    let config = engine_mlx::EngineConfig {
        block_tokens: settings.block_tokens,
        bind_to_weights: settings.validate_model_tag,
        attention: settings.attention.unwrap_or_default(),
        weight_format: settings.weights.unwrap_or_default(),
        kv_pool_tokens: settings.kv_pool_tokens,
        kv_budget_bytes: settings.cache_budget_bytes,
        ..engine_mlx::EngineConfig::default()
    };
    let (info, weights) =
        engine_mlx::inspect_report(&model, &config).map_err(|e| AppError::Model {
            model: model.clone(),
            reason: e.to_string(),
        })?;
    let spec = &info.spec;
    let budget = settings.cache_budget_bytes;
    let mut out = format!(
        "model:               {model}\narchitecture:        {}\ncontext length:      {}\n\
         layers:              {} ({} sliding-window)\nKV heads:            {}\n\
         K / V head dim:      {} / {}\nblock tokens:        {}\n\n",
        info.architecture,
        info.context_length,
        spec.num_layers(),
        spec.num_sliding_layers(),
        spec.num_kv_heads(),
        spec.k_head_dim(),
        spec.v_head_dim(),
        spec.block_tokens(),
    );
    if spec.values_are_keys() {
        out.insert_str(
            out.len() - 1,
            "values:              the keys (latent attention: one vector per token, stored once)\n",
        );
    }
    if let Some(w) = &weights {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        out.push_str(&format!(
            "file type:           {}\ntensor types:        {}\nfile size:           {:.1} MiB\n\
             weights:             {} ({:.1} MiB resident)\n\
             memory at load:      {:.1} MiB ({})\n",
            w.file_type.as_deref().unwrap_or("(not stated)"),
            w.types,
            mib(w.file_bytes),
            info.weight_format,
            mib(w.memory.weights),
            mib(w.memory.total()),
            w.memory.describe(),
        ));
        out.push_str(&match (w.available_bytes, w.fits()) {
            (Some(a), Some(true)) => {
                format!("fits this machine:   yes ({:.1} MiB available)\n\n", mib(a))
            }
            (Some(a), _) => format!(
                "fits this machine:   NO: needs {:.1} MiB, {:.1} MiB available\n\n",
                mib(w.memory.total()),
                mib(a)
            ),
            (None, _) => {
                "fits this machine:   unknown (available memory not readable)\n\n".to_owned()
            }
        });
    }
    out.push_str(&format!(
        "cache budget {} MiB (SEMANTIC_MLX_CACHE_BUDGET_MB):\n",
        budget / (1024 * 1024)
    ));
    out.push_str(
        "KV storage      bytes/block/layer   bytes/block     bytes/token  blocks   tokens\n",
    );
    for (name, storage) in [
        ("fp32 (live)", model_cache_spec::KvStorage::FP32),
        ("fp16", model_cache_spec::KvStorage::FP16),
        ("8-bit g64", model_cache_spec::KvStorage::Q8),
        ("4-bit g64", model_cache_spec::KvStorage::Q4),
    ] {
        match spec.clone().with_kv_storage(storage) {
            Ok(s) => out.push_str(&format!(
                "{name:<15} {:>17} {:>13} {:>15} {:>7} {:>8}\n",
                s.bytes_per_block_per_layer(),
                s.bytes_per_block(),
                s.bytes_per_token(),
                s.blocks_for_budget(budget),
                s.tokens_for_budget(budget)
            )),
            Err(e) => out.push_str(&format!("{name:<15} not applicable: {e}\n")),
        }
    }
    if spec.num_sliding_layers() > 0 {
        // The live KV is f32; sliding layers keep their window plus one block in RAM.
        let live = spec
            .clone()
            .with_kv_storage(model_cache_spec::KvStorage::FP32);
        if let Ok(live) = live {
            let longest = match live.max_sequence_tokens(budget) {
                u64::MAX => "unbounded (every layer slides)".to_owned(),
                n => format!("{n} tokens"),
            };
            let ctx = info.context_length as u64;
            out.push_str(&format!(
                "\nsliding-window layers keep their window + one block in RAM:\n\
                 longest sequence in the budget (fp32 live): {longest}; blocks a sequence of \
                 {ctx} tokens is charged: {} of {} full\n",
                live.resident_blocks(ctx, 0),
                live.blocks_for_tokens(ctx),
            ));
        }
    }
    Ok(out)
}

/// What `semantic agents` does.
#[derive(Debug)]
pub enum AgentsAction {
    /// List every agent.
    List,
    /// Show one agent.
    Show(String),
    /// Delete one agent.
    Rm(String),
}

fn agent_key(id: &str) -> Result<AgentKey, AppError> {
    let agent = AgentId::new(id).map_err(|e| AppError::Agents(format!("invalid agent id: {e}")))?;
    Ok(AgentKey {
        namespace: Namespace::default(),
        agent,
    })
}

/// `semantic agents …`: through a running server's admin API (`url`), else on the cache dir.
pub fn agents(
    settings: &Settings,
    action: AgentsAction,
    url: Option<&str>,
    admin_key: Option<&str>,
) -> Result<String, AppError> {
    if let Some(url) = url {
        return agents_over_http(url.trim_end_matches('/'), action, admin_key);
    }
    let store = open_store(settings)?;
    let err = |e: agent_session::StoreError| AppError::Agents(e.to_string());
    match action {
        AgentsAction::List => {
            let list = block_on(store.list_manifests(None)).map_err(err)?;
            let mut out = format!(
                "{:<32} {:>8} {:>7} {:>6}  last used (unix ms)\n",
                "agent", "tokens", "blocks", "pinned"
            );
            for m in list {
                out.push_str(&format!(
                    "{:<32} {:>8} {:>7} {:>6}  {}\n",
                    if m.namespace.0.is_empty() {
                        m.agent.to_string()
                    } else {
                        format!("{}/{}", m.namespace.0, m.agent)
                    },
                    m.token_ids.len(),
                    m.block_hashes.len(),
                    m.pinned,
                    m.last_used_at_ms
                ));
            }
            Ok(out)
        }
        AgentsAction::Show(id) => {
            let key = agent_key(&id)?;
            let m = block_on(store.load_manifest(&key))
                .map_err(err)?
                .ok_or_else(|| {
                    AppError::Agents(format!("no agent {id} in {}", settings.cache_dir.display()))
                })?;
            Ok(format!(
                "agent:        {}\ntokens:       {}\nblocks:       {}\ntail tokens:  {}\npinned:       {}\nmodel:        {}\ncreated (ms): {}\nlast used:    {}\n",
                m.agent,
                m.token_ids.len(),
                m.block_hashes.len(),
                m.tail_tokens().len(),
                m.pinned,
                m.model_fingerprint,
                m.created_at_ms,
                m.last_used_at_ms
            ))
        }
        AgentsAction::Rm(id) => {
            let key = agent_key(&id)?;
            let existed = block_on(store.delete_manifest(&key)).map_err(err)?;
            block_on(store.flush()).map_err(err)?;
            if existed {
                Ok(format!("deleted agent {id}\n"))
            } else {
                Err(AppError::Agents(format!("no agent {id}")))
            }
        }
    }
}

fn agents_over_http(
    base: &str,
    action: AgentsAction,
    admin_key: Option<&str>,
) -> Result<String, AppError> {
    let (method, path) = match &action {
        AgentsAction::List => ("GET", "/v1/agents".to_string()),
        AgentsAction::Show(id) => ("GET", format!("/v1/agents/{}", agent_key(id)?.agent)),
        AgentsAction::Rm(id) => ("DELETE", format!("/v1/agents/{}", agent_key(id)?.agent)),
    };
    let mut req = ureq::request(method, &format!("{base}{path}")).timeout(Duration::from_secs(30));
    if let Some(k) = admin_key {
        req = req.set("authorization", &format!("Bearer {k}"));
    }
    match req.call() {
        Ok(r) => Ok(r.into_string().unwrap_or_default() + "\n"),
        Err(ureq::Error::Status(code, r)) => Err(AppError::Agents(format!(
            "{method} {path}: HTTP {code}: {}",
            r.into_string().unwrap_or_default()
        ))),
        Err(e) => Err(AppError::Agents(format!("{method} {base}{path}: {e}"))),
    }
}
