//! The engine handle ([`MlxEngine`], Send + Sync) and its worker thread, which owns every
//! MLX object (arrays are Send but not Sync, and MLX streams are thread-local).

use crate::arch::{self, AttentionKind, BuildOptions, CausalLm, DecodeKernel, Logits};
use crate::config::ModelConfig;
use crate::error::{Error, MlxContext, Result};
use crate::formatter::MlxChatFormatter;
use crate::gguf::GgufHeader;
use crate::hub;
use crate::kv::{import_capacity, KvBuffers, KvPool, SequenceKv};
use crate::sampling;
use crate::weights::{self, WeightFormat};
use agent_session::{
    EngineError, InferenceEngine, KvBlock, KvPayload, ModelDescriptor, SequenceId, StepRequest,
    TokenId,
};
use async_trait::async_trait;
use futures::channel::oneshot;
use model_cache_spec::{KvStorage, ModelCacheSpec};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// How to load and run a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Tokens per KV block (a positive multiple of 64).
    pub block_tokens: u32,
    /// Weight format for compute.
    pub weight_format: WeightFormat,
    /// Quantize exported KV blocks to 8 or 4 bits (group 64); `None`: export the live f32
    /// values bit-exactly.
    pub kv_bits: Option<u8>,
    /// One matmul for q/k/v and one for gate/up (faster; same results up to rounding).
    pub fuse_projections: bool,
    /// Hugging Face hub cache directory (default: `$HF_HOME/hub` or `~/.cache/huggingface/hub`).
    pub hf_cache_dir: Option<PathBuf>,
    /// Bind cached KV to these exact weights (the model fingerprint includes the weight
    /// files' identity). Off: only architecture, cache spec, tokenizer and weight format, so
    /// caches survive swapping between builds of the same model (outputs may then differ
    /// from a cold run). `SEMANTIC_AGENT_VALIDATE_MODEL_TAG`.
    pub bind_to_weights: bool,
    /// Attention kernel (part of the model fingerprint: it changes the KV's last bits).
    pub attention: AttentionKind,
    /// Kernel of the decode steps' linear layers (part of the model fingerprint when it
    /// applies to the weights: it changes the decoded tokens' KV in the last bits).
    pub decode_kernel: DecodeKernel,
    /// Spare KV buffer capacity, in tokens, kept for reuse by restores (released
    /// sequences' buffers; one set of this size is allocated at start-up). 0: none.
    /// `SEMANTIC_MLX_KV_POOL_TOKENS`.
    pub kv_pool_tokens: usize,
    /// Bytes of hot KV the caller will hold besides the engine's own buffers (the block
    /// pool's budget): counted in the memory check at load.
    pub kv_budget_bytes: u64,
    /// Refuse to load a GGUF model whose weights and KV would not fit the RAM available.
    pub check_memory: bool,
}

/// Default of [`EngineConfig::kv_pool_tokens`]: a 4,096-token restore plus the spare block
/// an import adds (17 blocks of 256 tokens).
pub const DEFAULT_KV_POOL_TOKENS: usize = 4352;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_tokens: model_cache_spec::DEFAULT_BLOCK_TOKENS,
            weight_format: WeightFormat::default(),
            kv_bits: None,
            fuse_projections: true,
            hf_cache_dir: None,
            bind_to_weights: true,
            attention: AttentionKind::default(),
            decode_kernel: DecodeKernel::default(),
            kv_pool_tokens: DEFAULT_KV_POOL_TOKENS,
            kv_budget_bytes: 0,
            check_memory: true,
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T>>;

/// Decode steps of running generations that may go before each prefill chunk of another
/// request (the chunk waits at most this many steps, each one token for every decoder).
pub const DECODE_STEPS_PER_PREFILL_CHUNK: usize = 4;

/// How long a waiting prefill chunk gives the decoders' next step to arrive.
const STEP_ROUND_TRIP: Duration = Duration::from_millis(20);

/// Commands to the worker thread.
enum Command {
    Open(Reply<u64>),
    PlanImport(u64, usize, Reply<()>),
    Import(u64, Vec<Arc<KvBlock>>, Reply<()>),
    Prefill(u64, Vec<TokenId>, Reply<()>),
    Step(Vec<StepRequest>, Reply<Vec<Result<TokenId>>>),
    Export(u64, usize, usize, Reply<Vec<KvPayload>>),
    Truncate(u64, usize, Reply<()>),
    Len(u64, Reply<usize>),
    Release(u64, Reply<()>),
    Logits(u64, Reply<Vec<f32>>),
    KvBytes(u64, Reply<usize>),
    ForwardAll(Vec<TokenId>, Reply<Vec<f32>>),
}

/// The inference engine: a handle to the worker thread that owns the model and every
/// sequence's KV. Cheap to share (`Arc<MlxEngine>`); every method is a message to the worker.
#[derive(Debug)]
pub struct MlxEngine {
    tx: mpsc::Sender<Command>,
    descriptor: ModelDescriptor,
    kv_bits: Option<u8>,
    /// The worker thread, joined on drop.
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Drop for MlxEngine {
    /// Closes the worker's queue and waits for it to free every MLX object it owns (model,
    /// sequences, spare KV buffers). A worker left running could still be freeing them while
    /// the process exits and MLX's globals are torn down, which corrupts the heap.
    fn drop(&mut self) {
        let (closed, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.tx, closed));
        if let Some(worker) = self.worker.take() {
            if worker.join().is_err() {
                tracing::warn!("the engine worker panicked");
            }
        }
    }
}

/// What was found at the path or id given to [`MlxEngine::load`].
#[derive(Debug)]
enum Resolved {
    Gguf(PathBuf),
    Dir(PathBuf),
}

fn resolve(model: &str, config: &EngineConfig) -> Result<Resolved> {
    let path = Path::new(model);
    if path.is_file() {
        return Ok(Resolved::Gguf(path.to_path_buf()));
    }
    if path.is_dir() {
        if path.join("config.json").is_file() {
            return Ok(Resolved::Dir(path.to_path_buf()));
        }
        let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        return match ggufs.as_slice() {
            [one] => Ok(Resolved::Gguf(one.clone())),
            _ => Err(Error::MissingField {
                path: path.to_path_buf(),
                field: "config.json (or exactly one .gguf file)".into(),
            }),
        };
    }
    if hub::looks_like_hub_id(model) {
        return hub::fetch(model, config.hf_cache_dir.as_deref()).map(Resolved::Dir);
    }
    Err(Error::NotFound {
        path: path.to_path_buf(),
    })
}

/// Blake3 of a file's first `len` bytes.
fn hash_prefix(path: &Path, len: u64) -> Result<blake3::Hash> {
    use std::io::Read;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let mut h = blake3::Hasher::new();
    let mut reader = std::io::BufReader::new(f).take(len);
    std::io::copy(&mut reader, &mut h).map_err(io)?;
    Ok(h.finalize())
}

fn kv_storage(config: &EngineConfig) -> Result<KvStorage> {
    match config.kv_bits {
        None => Ok(KvStorage::FP32),
        Some(bits @ (4 | 8)) => Ok(KvStorage::Quantized {
            bits,
            group_size: crate::kv::KV_QUANT_GROUP as u32,
        }),
        Some(other) => Err(Error::Config {
            field: "kv_bits",
            reason: format!("{other} (supported: 4, 8)"),
        }),
    }
}

/// Everything prepared on the caller's thread before the worker loads weights.
struct Prepared {
    source: Resolved,
    config: ModelConfig,
    header: Option<GgufHeader>,
    hf_config: Option<serde_json::Value>,
    descriptor: ModelDescriptor,
    formatter: MlxChatFormatter,
}

fn prepare(model: &str, cfg: &EngineConfig) -> Result<Prepared> {
    let storage = kv_storage(cfg)?;
    let source = resolve(model, cfg)?;
    let mut fp = blake3::Hasher::new();
    fp.update(b"semantic-model-v1\0");
    // The weights' identity (file name, size, header / config and shard hashes): part of the
    // fingerprint unless `bind_to_weights` is off.
    let mut ident = blake3::Hasher::new();
    let (config, header, hf_config, formatter, spec, id, mut weight_desc, host_decode) =
        match &source {
            Resolved::Gguf(path) => {
                let header = GgufHeader::read(path)?;
                // Every check, in this order, before any weight is read; all problems
                // found are reported together.
                let mut problems = Vec::new();
                let mut note = |r: Result<()>| {
                    if let Err(e) = r {
                        problems.push(e);
                    }
                };
                note(header.check_size());
                let config = ModelConfig::from_gguf(&header);
                let formatter = MlxChatFormatter::from_gguf(&header);
                note(header.check_types());
                let meta = header.metadata_json();
                let spec = ModelCacheSpec::from_gguf_metadata(&meta, cfg.block_tokens)
                    .and_then(|s| s.with_kv_storage(storage))
                    .map_err(|source| Error::Spec {
                        path: path.clone(),
                        source,
                    });
                let (config, formatter, spec) = match (config, formatter, spec) {
                    (Ok(c), Ok(f), Ok(s)) => {
                        let s = applied_windows(s, &c).map_err(|source| Error::Spec {
                            path: path.clone(),
                            source,
                        })?;
                        if cfg.check_memory {
                            note(memory_check(&header, cfg, &s));
                        }
                        (Some(c), Some(f), Some(s))
                    }
                    (c, f, s) => {
                        // Architecture, then tokenizer, before the type problems.
                        let mut first = Vec::new();
                        first.extend(c.err());
                        first.extend(f.err());
                        first.extend(s.err());
                        let at = usize::from(header.check_size().is_err());
                        for (i, e) in first.into_iter().enumerate() {
                            problems.insert(at + i, e);
                        }
                        (None, None, None)
                    }
                };
                let (Some(config), Some(formatter), Some(spec)) = (config, formatter, spec) else {
                    return Err(combine(path, problems));
                };
                if !problems.is_empty() {
                    return Err(combine(path, problems));
                }
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                ident.update(name.as_bytes());
                ident.update(&header.file_size.to_le_bytes());
                ident.update(hash_prefix(path, header.data_offset)?.as_bytes());
                let id = path
                    .file_stem()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let types = header.type_summary();
                // Every supported GGUF type has host decode kernels.
                let host_decode = true;
                let desc = match cfg.weight_format {
                    WeightFormat::Host => format!("host blocks ({types})"),
                    WeightFormat::F32 => format!("f32 (dequantized from {types})"),
                    WeightFormat::Quantized => {
                        format!("quantized (MLX affine, group 32, from {types})")
                    }
                };
                (
                    config,
                    Some(header),
                    None,
                    formatter,
                    spec,
                    id,
                    desc,
                    host_decode,
                )
            }
            Resolved::Dir(dir) => {
                let cpath = dir.join("config.json");
                let text = std::fs::read_to_string(&cpath).map_err(|source| Error::Io {
                    path: cpath.clone(),
                    source,
                })?;
                let v: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| Error::Invalid {
                        path: cpath.clone(),
                        field: "(file)".into(),
                        reason: e.to_string(),
                    })?;
                let config = ModelConfig::from_hf_config(&cpath, &v)?;
                let formatter = MlxChatFormatter::from_dir(dir)?;
                let spec = ModelCacheSpec::from_config(&v, cfg.block_tokens)
                    .and_then(|s| s.with_kv_storage(storage))
                    .and_then(|s| applied_windows(s, &config))
                    .map_err(|source| Error::Spec {
                        path: cpath.clone(),
                        source,
                    })?;
                ident.update(text.as_bytes());
                let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                    .map_err(|source| Error::Io {
                        path: dir.clone(),
                        source,
                    })?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                    .collect();
                files.sort();
                for f in &files {
                    let size = std::fs::metadata(f)
                        .map_err(|source| Error::Io {
                            path: f.clone(),
                            source,
                        })?
                        .len();
                    ident.update(f.file_name().map(|n| n.as_encoded_bytes()).unwrap_or(b""));
                    ident.update(&size.to_le_bytes());
                    ident.update(hash_prefix(f, 1 << 20)?.as_bytes());
                }
                let id = dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let quant = v.get("quantization").is_some();
                let q = v.get("quantization");
                let int = |k: &str| q.and_then(|q| q.get(k)).and_then(|x| x.as_i64());
                let host_decode = quant
                    && matches!(int("bits").unwrap_or(4), 4 | 8)
                    && int("group_size").unwrap_or(64) % 32 == 0;
                let desc = match (cfg.weight_format, quant) {
                    (WeightFormat::F32, true) => "f32 (dequantized from MLX affine)".to_owned(),
                    (WeightFormat::Quantized, true) => "quantized (MLX affine)".to_owned(),
                    _ => "f32".to_owned(),
                };
                (
                    config,
                    None,
                    Some(v),
                    formatter,
                    spec,
                    id,
                    desc,
                    host_decode,
                )
            }
        };
    if cfg.bind_to_weights {
        fp.update(b"\0weights-identity\0");
        fp.update(ident.finalize().as_bytes());
    } else {
        fp.update(b"\0architecture\0");
        fp.update(config.architecture.as_bytes());
    }
    fp.update(b"\0spec\0");
    fp.update(spec.canonical_string().as_bytes());
    fp.update(b"\0tokenizer\0");
    fp.update(agent_session::ChatFormatter::fingerprint(&formatter).as_bytes());
    // KV computed with another weight format differs in the last bits: never mixed.
    fp.update(b"\0weights\0");
    fp.update(cfg.weight_format.name().as_bytes());
    fp.update(b"\0attention\0");
    fp.update(cfg.attention.fingerprint().as_bytes());
    // So do the BLAS kernels under MLX's CPU matmuls (OpenBLAS's core type).
    fp.update(b"\0blas\0");
    fp.update(crate::blas::core_name().unwrap_or_default().as_bytes());
    // Decode steps on the host kernel round differently from MLX's matmuls; recorded only
    // where it applies, so models it cannot serve keep their fingerprint.
    // The whole-step host path (`host`) rounds differently again from the host linears with
    // MLX ops between them (`host-linears`, the previous `host`).
    if cfg.decode_kernel != DecodeKernel::Mlx && host_decode {
        fp.update(b"\0decode\0");
        fp.update(match cfg.decode_kernel {
            DecodeKernel::Host => b"host-step".as_slice(),
            _ => b"host".as_slice(),
        });
        weight_desc.push_str(&format!(
            "; decode: host kernels ({})",
            gguf_quants::Isa::detected().name()
        ));
    }
    if cfg.weight_format == WeightFormat::Host {
        // The prefill products over dequantized panels (BLAS) and the block kernels' revision.
        fp.update(b"\0host-weights\0gguf-quants-1\0");
    }
    let descriptor = ModelDescriptor {
        id,
        fingerprint: fp.finalize().to_hex().to_string(),
        architecture: config.architecture.clone(),
        weight_format: weight_desc,
        spec,
        context_length: config.context_length,
        vocab_size: config.vocab_size,
    };
    Ok(Prepared {
        source,
        config,
        header,
        hf_config,
        descriptor,
        formatter,
    })
}

/// One error for the problems found checking a model, in check order.
fn combine(path: &Path, mut problems: Vec<Error>) -> Error {
    if problems.len() == 1 {
        problems.remove(0)
    } else {
        Error::Problems {
            path: path.to_path_buf(),
            problems,
        }
    }
}

/// The weights' resident size plus the KV this configuration allocates, against the RAM
/// available; [`Error::OutOfMemory`] when it cannot fit.
fn memory_check(header: &GgufHeader, cfg: &EngineConfig, spec: &ModelCacheSpec) -> Result<()> {
    let Some(available) = crate::memory::available_bytes() else {
        return Ok(());
    };
    let est = MemoryEstimate::new(header, cfg, spec);
    if est.total() <= available {
        return Ok(());
    }
    Err(Error::OutOfMemory {
        path: header.path.clone(),
        needed_mib: est.total() >> 20,
        what: est.describe(),
        available_mib: available >> 20,
    })
}

/// What loading a GGUF model with a configuration will take in RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// The weights in the configured format.
    pub weights: u64,
    /// The engine's spare KV buffers ([`EngineConfig::kv_pool_tokens`]).
    pub kv_pool: u64,
    /// The hot KV tier the caller reserves ([`EngineConfig::kv_budget_bytes`]).
    pub kv_budget: u64,
    /// Runtime overhead ([`crate::memory::RUNTIME_OVERHEAD_BYTES`]).
    pub runtime: u64,
}

impl MemoryEstimate {
    /// The estimate for `header` loaded with `cfg`, its KV shaped by `spec`.
    pub fn new(header: &GgufHeader, cfg: &EngineConfig, spec: &ModelCacheSpec) -> Self {
        let per_token = spec
            .clone()
            .with_kv_storage(KvStorage::FP32)
            .map_or(spec.bytes_per_token(), |s| s.bytes_per_token());
        Self {
            weights: crate::memory::resident_weight_bytes(header, cfg.weight_format),
            kv_pool: per_token.saturating_mul(cfg.kv_pool_tokens as u64),
            kv_budget: cfg.kv_budget_bytes,
            runtime: crate::memory::RUNTIME_OVERHEAD_BYTES,
        }
    }

    /// Everything, in bytes.
    pub fn total(&self) -> u64 {
        self.weights + self.kv_pool + self.kv_budget + self.runtime
    }

    /// `weights 94 MiB + KV pool 51 MiB + ...`.
    pub fn describe(&self) -> String {
        format!(
            "weights {} MiB + KV pool {} MiB + hot KV budget {} MiB + runtime {} MiB",
            self.weights >> 20,
            self.kv_pool >> 20,
            self.kv_budget >> 20,
            self.runtime >> 20
        )
    }
}

/// What `semantic models inspect` prints about a GGUF file's weights.
#[derive(Debug, Clone)]
pub struct WeightsReport {
    /// `general.file_type`, named (`Q4_K_M`), when the file has one.
    pub file_type: Option<String>,
    /// Tensor count per type (`166 × Q5_0, 16 × Q4_K`).
    pub types: String,
    /// The file's size.
    pub file_bytes: u64,
    /// Resident memory with the configuration given.
    pub memory: MemoryEstimate,
    /// RAM available now, where it can be read.
    pub available_bytes: Option<u64>,
}

impl WeightsReport {
    /// Whether the estimate fits the RAM available (`None`: unknown).
    pub fn fits(&self) -> Option<bool> {
        self.available_bytes.map(|a| self.memory.total() <= a)
    }
}

/// [`inspect`] plus, for GGUF files, the weight types, resident size and whether it fits
/// this machine (a model too large is reported, not refused).
pub fn inspect_report(
    model: &str,
    config: &EngineConfig,
) -> Result<(ModelDescriptor, Option<WeightsReport>)> {
    let unchecked = EngineConfig {
        check_memory: false,
        ..config.clone()
    };
    let prepared = prepare(model, &unchecked)?;
    let report = prepared.header.as_ref().map(|h| WeightsReport {
        file_type: h
            .get("general.file_type")
            .and_then(|v| v.as_u64())
            .map(|id| {
                crate::memory::file_type_name(id)
                    .map_or_else(|| format!("unknown ({id})"), str::to_owned)
            }),
        types: h.type_summary(),
        file_bytes: h.file_size,
        memory: MemoryEstimate::new(h, config, &prepared.descriptor.spec),
        available_bytes: crate::memory::available_bytes(),
    });
    Ok((prepared.descriptor, report))
}

/// The spec with the sliding windows the engine applies (some families ignore a config's
/// `sliding_window`, as their references do: Mistral, Phi-3), so that the capacity maths and
/// the fingerprint describe the KV the engine keeps.
fn applied_windows(
    spec: ModelCacheSpec,
    config: &ModelConfig,
) -> std::result::Result<ModelCacheSpec, model_cache_spec::SpecError> {
    let layers = (0..spec.num_layers() as usize)
        .map(|i| match config.layer_window(i) {
            Some(w) => model_cache_spec::LayerKind::SlidingWindow {
                window: u32::try_from(w).unwrap_or(u32::MAX),
            },
            None => model_cache_spec::LayerKind::Global,
        })
        .collect();
    spec.with_layers(layers)
}

/// Describes a model (architecture, cache spec, context length, fingerprint) from its
/// metadata and tokenizer, without loading the weights: `semantic models inspect`.
pub fn inspect(model: &str, config: &EngineConfig) -> Result<ModelDescriptor> {
    Ok(prepare(model, config)?.descriptor)
}

impl MlxEngine {
    /// Loads a model — a GGUF file, a directory (safetensors with `config.json`, or one
    /// `.gguf`), or a Hugging Face id `org/name` — and starts the worker thread.
    ///
    /// Returns the engine and the model's chat formatter (tokenizer + template). Blocks until
    /// the weights are loaded.
    pub fn load(model: &str, config: EngineConfig) -> Result<(MlxEngine, Arc<MlxChatFormatter>)> {
        let started = std::time::Instant::now();
        let prepared = prepare(model, &config)?;
        let Prepared {
            source,
            config: model_config,
            header,
            hf_config,
            descriptor,
            formatter,
        } = prepared;
        let (tx, rx) = mpsc::channel::<Command>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let options = BuildOptions {
            format: config.weight_format,
            fuse_projections: config.fuse_projections,
            attention: config.attention,
            decode: config.decode_kernel,
        };
        let block_tokens = config.block_tokens as usize;
        let kv_bits = config.kv_bits;
        let kv_pool_tokens = config.kv_pool_tokens;
        let worker = std::thread::Builder::new()
            .name("engine-mlx".into())
            .spawn(move || {
                let built = (|| -> Result<Box<dyn CausalLm>> {
                    let tensors = match (&source, &header, &hf_config) {
                        (Resolved::Gguf(_), Some(h), _) => weights::load_gguf(h)?,
                        (Resolved::Dir(dir), _, Some(v)) => weights::load_safetensors_dir(dir, v)?,
                        _ => {
                            return Err(Error::Request("inconsistent model source".into()));
                        }
                    };
                    arch::build(&model_config, tensors, options)
                })();
                match built {
                    Ok(model) => {
                        let _ = ready_tx.send(Ok(()));
                        let pool = Worker::filled_pool(&*model, block_tokens, kv_pool_tokens);
                        Worker {
                            model,
                            seqs: HashMap::new(),
                            next_id: 1,
                            block_tokens,
                            kv_bits,
                            pool,
                        }
                        .run(rx);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|_| Error::WorkerStopped)?;
        ready_rx.recv().map_err(|_| Error::WorkerStopped)??;
        tracing::info!(
            model = %descriptor.id,
            architecture = %descriptor.architecture,
            weights = %descriptor.weight_format,
            seconds = started.elapsed().as_secs_f64(),
            "model loaded"
        );
        Ok((
            MlxEngine {
                tx,
                descriptor,
                kv_bits,
                worker: Some(worker),
            },
            Arc::new(formatter),
        ))
    }

    /// The KV export quantization in use.
    pub fn kv_bits(&self) -> Option<u8> {
        self.kv_bits
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| Error::WorkerStopped)?;
        rx.await.map_err(|_| Error::WorkerStopped)?
    }

    /// The pending (last-position) logits of a sequence, for tests and debugging.
    #[doc(hidden)]
    pub async fn debug_logits(&self, seq: SequenceId) -> Result<Vec<f32>> {
        self.call(|r| Command::Logits(seq.0, r)).await
    }

    /// Bytes of KV buffers a sequence holds in RAM (every layer's allocated rows): what a
    /// sliding window saves shows here.
    pub async fn kv_bytes(&self, seq: SequenceId) -> Result<usize> {
        self.call(|r| Command::KvBytes(seq.0, r)).await
    }

    /// Logits of every position of `tokens` run from an empty context, `[len × vocab]` row
    /// major (golden tests).
    #[doc(hidden)]
    pub async fn debug_forward_all(&self, tokens: Vec<TokenId>) -> Result<Vec<f32>> {
        self.call(|r| Command::ForwardAll(tokens, r)).await
    }
}

#[async_trait]
impl InferenceEngine for MlxEngine {
    fn model(&self) -> &ModelDescriptor {
        &self.descriptor
    }

    async fn open_sequence(&self) -> Result<SequenceId, EngineError> {
        Ok(SequenceId(self.call(Command::Open).await?))
    }

    async fn import_blocks(
        &self,
        seq: SequenceId,
        blocks: Vec<Arc<KvBlock>>,
    ) -> Result<(), EngineError> {
        Ok(self.call(|r| Command::Import(seq.0, blocks, r)).await?)
    }

    async fn plan_import(&self, seq: SequenceId, tokens: usize) -> Result<(), EngineError> {
        Ok(self.call(|r| Command::PlanImport(seq.0, tokens, r)).await?)
    }

    async fn prefill(&self, seq: SequenceId, tokens: Vec<TokenId>) -> Result<(), EngineError> {
        Ok(self.call(|r| Command::Prefill(seq.0, tokens, r)).await?)
    }

    async fn step(
        &self,
        batch: Vec<StepRequest>,
    ) -> Result<Vec<Result<TokenId, EngineError>>, EngineError> {
        let out = self.call(|r| Command::Step(batch, r)).await?;
        Ok(out
            .into_iter()
            .map(|r| r.map_err(EngineError::from))
            .collect())
    }

    async fn export_blocks(
        &self,
        seq: SequenceId,
        first_block: usize,
        count: usize,
    ) -> Result<Vec<KvPayload>, EngineError> {
        Ok(self
            .call(|r| Command::Export(seq.0, first_block, count, r))
            .await?)
    }

    async fn truncate(&self, seq: SequenceId, tokens: usize) -> Result<(), EngineError> {
        Ok(self.call(|r| Command::Truncate(seq.0, tokens, r)).await?)
    }

    async fn sequence_len(&self, seq: SequenceId) -> Result<usize, EngineError> {
        Ok(self.call(|r| Command::Len(seq.0, r)).await?)
    }

    async fn release(&self, seq: SequenceId) -> Result<(), EngineError> {
        Ok(self.call(|r| Command::Release(seq.0, r)).await?)
    }
}

/// One sequence inside the worker.
struct Sequence {
    kv: SequenceKv,
    /// Token ids whose KV is held (for the repetition penalty).
    tokens: Vec<TokenId>,
    /// Logits of the last position, pending sampling.
    logits: Option<Vec<f32>>,
}

/// The worker: owns the model and the sequences; runs commands one at a time.
struct Worker {
    model: Box<dyn CausalLm>,
    seqs: HashMap<u64, Sequence>,
    next_id: u64,
    block_tokens: usize,
    kv_bits: Option<u8>,
    /// Spare KV buffers for restores.
    pool: KvPool,
}

impl Worker {
    /// A pool of `max_tokens` holding one set of that size (allocated now, so that the first
    /// restore after a start finds buffers); empty if the allocation fails.
    fn filled_pool(model: &dyn CausalLm, block_tokens: usize, max_tokens: usize) -> KvPool {
        let mut pool = KvPool::new(max_tokens);
        if max_tokens >= block_tokens {
            match KvBuffers::allocate(model.kv_layout(block_tokens), max_tokens) {
                Ok(b) => pool.put(b),
                Err(e) => tracing::warn!(error = %e, "no spare KV buffers allocated"),
            }
        }
        pool
    }

    /// Serves commands in arrival order, with one exception: a prefill chunk that arrives
    /// while sequences are decoding lets their next steps go first, up to
    /// [`DECODE_STEPS_PER_PREFILL_CHUNK`] per chunk. Without it a long cold prefill and the
    /// running generations alternate one chunk (seconds on a CPU) per generated token.
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut queue: VecDeque<Command> = VecDeque::new();
        let mut prev_was_step = false;
        let mut steps_since_prefill = 0usize;
        loop {
            let cmd = match queue.pop_front() {
                Some(c) => c,
                None => match rx.recv() {
                    Ok(c) => c,
                    Err(_) => return,
                },
            };
            let cmd = if matches!(cmd, Command::Prefill(..))
                && prev_was_step
                && steps_since_prefill < DECODE_STEPS_PER_PREFILL_CHUNK
            {
                // The decoders' next step is on its way (a round trip through the service).
                match rx.recv_timeout(STEP_ROUND_TRIP) {
                    Ok(next @ Command::Step(..)) => {
                        queue.push_front(cmd);
                        next
                    }
                    Ok(other) => {
                        queue.push_back(other);
                        cmd
                    }
                    Err(_) => cmd,
                }
            } else {
                cmd
            };
            match &cmd {
                Command::Step(..) => {
                    prev_was_step = true;
                    steps_since_prefill += 1;
                }
                Command::Prefill(..) => {
                    prev_was_step = false;
                    steps_since_prefill = 0;
                }
                _ => {}
            }
            self.handle(cmd);
        }
    }

    fn handle(&mut self, cmd: Command) {
        {
            match cmd {
                Command::Open(r) => {
                    let id = self.next_id;
                    self.next_id += 1;
                    let kv = SequenceKv::new(self.model.kv_layout(self.block_tokens));
                    self.seqs.insert(
                        id,
                        Sequence {
                            kv,
                            tokens: Vec::new(),
                            logits: None,
                        },
                    );
                    let _ = r.send(Ok(id));
                }
                Command::PlanImport(id, tokens, r) => {
                    let _ = r.send(self.plan_import(id, tokens));
                }
                Command::Import(id, blocks, r) => {
                    let _ = r.send(self.import(id, &blocks));
                }
                Command::Prefill(id, tokens, r) => {
                    let _ = r.send(self.prefill(id, &tokens));
                }
                Command::Step(batch, r) => {
                    let _ = r.send(Ok(self.step(&batch)));
                }
                Command::Export(id, first, count, r) => {
                    let res = self
                        .seq(id)
                        .and_then(|s| s.kv.export_blocks(first, count, self.kv_bits));
                    let _ = r.send(res);
                }
                Command::Truncate(id, n, r) => {
                    let res = self.seq_mut(id).and_then(|s| {
                        if n > s.kv.len() {
                            return Err(Error::Request(format!(
                                "cannot truncate {} tokens to {n}",
                                s.kv.len()
                            )));
                        }
                        s.kv.truncate(n)?;
                        s.tokens.truncate(n);
                        s.logits = None;
                        Ok(())
                    });
                    let _ = r.send(res);
                }
                Command::Len(id, r) => {
                    let _ = r.send(self.seq(id).map(|s| s.kv.len()));
                }
                Command::Release(id, r) => {
                    let res = match self.seqs.remove(&id) {
                        Some(mut s) => {
                            if let Some(buffers) = s.kv.take_buffers() {
                                self.pool.put(buffers);
                            }
                            Ok(())
                        }
                        None => Err(Error::UnknownSequence(id)),
                    };
                    let _ = r.send(res);
                }
                Command::Logits(id, r) => {
                    let res = self.seq(id).and_then(|s| {
                        s.logits
                            .clone()
                            .ok_or_else(|| Error::Request("no pending logits".into()))
                    });
                    let _ = r.send(res);
                }
                Command::KvBytes(id, r) => {
                    let _ = r.send(self.seq(id).map(|s| s.kv.resident_bytes()));
                }
                Command::ForwardAll(tokens, r) => {
                    let _ = r.send(self.forward_all(&tokens));
                }
            }
        }
    }

    fn seq(&self, id: u64) -> Result<&Sequence> {
        self.seqs.get(&id).ok_or(Error::UnknownSequence(id))
    }

    fn seq_mut(&mut self, id: u64) -> Result<&mut Sequence> {
        self.seqs.get_mut(&id).ok_or(Error::UnknownSequence(id))
    }

    fn check_tokens(&self, tokens: &[TokenId], current: usize) -> Result<()> {
        let vocab = self.model.config().vocab_size;
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Request(format!(
                "token id {bad} is outside the vocabulary ({vocab})"
            )));
        }
        let ctx = self.model.config().context_length;
        if current + tokens.len() > ctx {
            return Err(Error::Request(format!(
                "{} tokens exceed the context length {ctx}",
                current + tokens.len()
            )));
        }
        Ok(())
    }

    /// [`SequenceKv::plan_import`], into spare buffers from the pool when the sequence is
    /// empty and one fits. With quantized KV at rest (`kv_bits`) the blocks are dequantized
    /// through MLX into arrays of their own, so there is nothing to size in advance.
    fn plan_import(&mut self, id: u64, tokens: usize) -> Result<()> {
        let s = self.seqs.get_mut(&id).ok_or(Error::UnknownSequence(id))?;
        if self.kv_bits.is_some() {
            return Ok(());
        }
        let need = import_capacity(self.block_tokens, tokens);
        if s.kv.is_empty() && s.kv.capacity() < need {
            if let Some(buffers) = self.pool.take(need) {
                if let Some(own) = s.kv.take_buffers() {
                    self.pool.put(own);
                }
                s.kv.adopt_buffers(buffers)?;
            }
        }
        s.kv.plan_import(tokens)
    }

    fn import(&mut self, id: u64, blocks: &[Arc<KvBlock>]) -> Result<()> {
        let bt = self.block_tokens;
        let vocab = self.model.config().vocab_size;
        for b in blocks {
            if b.meta.token_ids.len() != bt {
                return Err(Error::KvPayload(format!(
                    "block has {} token ids, expected {bt}",
                    b.meta.token_ids.len()
                )));
            }
            if b.meta.token_ids.iter().any(|&t| t as usize >= vocab) {
                return Err(Error::KvPayload(
                    "block token id outside the vocabulary".into(),
                ));
            }
        }
        let s = self.seq_mut(id)?;
        let payloads: Vec<&KvPayload> = blocks.iter().map(|b| &b.payload).collect();
        s.kv.import_blocks(&payloads)?;
        for b in blocks {
            s.tokens.extend_from_slice(&b.meta.token_ids);
        }
        s.logits = None;
        Ok(())
    }

    /// One forward pass over `tokens` appended to sequence `id`; keeps the last logits.
    fn run_forward(&mut self, id: u64, tokens: &[TokenId]) -> Result<()> {
        let current = self.seq(id)?.kv.len();
        self.check_tokens(tokens, current)?;
        let model = &self.model;
        let s = self.seqs.get_mut(&id).ok_or(Error::UnknownSequence(id))?;
        let result = (|| -> Result<Vec<f32>> {
            let logits = model.forward(tokens, &mut s.kv, Logits::Last)?;
            let mut all: Vec<&mlx_rs::Array> = vec![&logits];
            all.extend(s.kv.arrays());
            mlx_rs::transforms::eval(all).ctx("forward pass")?;
            logits.to_vec_exact::<f32>().ctx("reading logits")
        })();
        match result {
            Ok(l) => {
                s.tokens.extend_from_slice(tokens);
                s.logits = Some(l);
                Ok(())
            }
            Err(e) => {
                // Back to where the pass began (which the windows still reach).
                let _ = s.kv.truncate(current);
                s.logits = None;
                Err(e)
            }
        }
    }

    fn prefill(&mut self, id: u64, tokens: &[TokenId]) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::Request("prefill needs at least one token".into()));
        }
        // Blocks no sliding window of this chunk reaches leave RAM first (the service has
        // exported those it stores).
        self.seq_mut(id)?.kv.retain_windows()?;
        self.run_forward(id, tokens)
    }

    /// One decode step per entry: every entry that feeds a token joins one batched forward
    /// pass (the weights are read once per step), then each entry samples with its own
    /// parameters. A bad entry (unknown sequence, token outside the vocabulary, full
    /// context, a sequence named twice) gets its own error and does not stop the others.
    fn step(&mut self, batch: &[StepRequest]) -> Vec<Result<TokenId>> {
        let mut out: Vec<Option<Result<TokenId>>> = (0..batch.len()).map(|_| None).collect();
        // Entries to feed; a sequence may appear once per step (a second entry would sample
        // from logits its first entry's token already moved past).
        let mut pending: Vec<usize> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, req) in batch.iter().enumerate() {
            if !seen.insert(req.seq.0) {
                out[i] = Some(Err(Error::Request(format!(
                    "sequence {} appears more than once in one step",
                    req.seq.0
                ))));
                continue;
            }
            if let Some(t) = req.feed {
                let checked = self
                    .seq(req.seq.0)
                    .and_then(|s| self.check_tokens(&[t], s.kv.len()));
                match checked {
                    Ok(()) => pending.push(i),
                    Err(e) => out[i] = Some(Err(e)),
                }
            }
        }
        if !pending.is_empty() {
            if let Err(e) = self.feed_batch(batch, &pending) {
                let msg = e.to_string();
                for &i in &pending {
                    out[i] = Some(Err(Error::Request(format!("decode step failed: {msg}"))));
                }
            }
        }
        batch
            .iter()
            .zip(out)
            .map(|(req, done)| {
                if let Some(Err(e)) = done {
                    return Err(e);
                }
                let s = self.seq(req.seq.0)?;
                let logits = s.logits.as_ref().ok_or_else(|| {
                    Error::Request("no logits to sample from: prefill or feed a token first".into())
                })?;
                Ok(sampling::sample(
                    logits,
                    &req.params,
                    &s.tokens,
                    &req.generated,
                    req.step,
                ))
            })
            .collect()
    }

    /// Feeds `batch[i].feed` to each listed entry's sequence (distinct sequences) in one
    /// forward pass and keeps each one's new last logits. On error no sequence advances.
    /// A single sequence takes the same path (the decode kernel, not a one-token prefill).
    fn feed_batch(&mut self, batch: &[StepRequest], entries: &[usize]) -> Result<()> {
        let mut taken: Vec<(u64, Sequence)> = Vec::with_capacity(entries.len());
        let mut tokens = Vec::with_capacity(entries.len());
        for &i in entries {
            let req = &batch[i];
            let s = self.seqs.remove(&req.seq.0);
            match (s, req.feed) {
                (Some(s), Some(t)) => {
                    taken.push((req.seq.0, s));
                    tokens.push(t);
                }
                (s, _) => {
                    if let Some(s) = s {
                        taken.push((req.seq.0, s));
                    }
                    self.seqs.extend(taken);
                    return Err(Error::UnknownSequence(req.seq.0));
                }
            }
        }
        let lens: Vec<usize> = taken.iter().map(|(_, s)| s.kv.len()).collect();
        let model = &self.model;
        let result = (|| -> Result<Vec<f32>> {
            let mut kvs: Vec<&mut SequenceKv> = taken.iter_mut().map(|(_, s)| &mut s.kv).collect();
            let logits = model.decode_batch(&tokens, &mut kvs)?;
            let mut all: Vec<&mlx_rs::Array> = vec![&logits];
            all.extend(kvs.iter().flat_map(|kv| kv.arrays()));
            mlx_rs::transforms::eval(all).ctx("batched decode")?;
            logits.to_vec_exact::<f32>().ctx("reading logits")
        })();
        let vocab = self.model.config().vocab_size;
        let res = match result {
            Ok(all) if all.len() == vocab * taken.len() => {
                for ((_, s), (row, &t)) in
                    taken.iter_mut().zip(all.chunks_exact(vocab).zip(&tokens))
                {
                    s.tokens.push(t);
                    s.logits = Some(row.to_vec());
                }
                Ok(())
            }
            other => {
                for ((_, s), &len) in taken.iter_mut().zip(&lens) {
                    let _ = s.kv.truncate(len);
                    s.logits = None;
                }
                match other {
                    Err(e) => Err(e),
                    Ok(_) => Err(Error::Request("batched logits have the wrong size".into())),
                }
            }
        };
        self.seqs.extend(taken);
        res
    }

    fn forward_all(&mut self, tokens: &[TokenId]) -> Result<Vec<f32>> {
        self.check_tokens(tokens, 0)?;
        let mut kv = SequenceKv::new(self.model.kv_layout(self.block_tokens));
        let logits = self.model.forward(tokens, &mut kv, Logits::All)?;
        logits.to_vec_exact::<f32>().ctx("reading logits")
    }
}
