//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading a model or running it.
///
/// Load errors name the file (`path`) and, where one field or tensor is at fault, that field
/// or tensor, so a user knows what to look at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Neither a file, a model directory nor (as far as can be told) a Hugging Face id.
    #[error("{path}: no such model file or directory")]
    NotFound {
        /// What was asked for.
        path: PathBuf,
    },
    /// The file is not a GGUF file (wrong magic bytes).
    #[error("{path}: not a GGUF file (magic bytes {found:02x?}, expected \"GGUF\")")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The first four bytes found.
        found: [u8; 4],
    },
    /// A GGUF version this loader does not read.
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version found.
        version: u32,
    },
    /// The file ends before a structure it announces (header, metadata, tensor data).
    #[error("{path}: truncated or corrupt: {field} needs bytes up to {needed} but the file has {file_size}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The structure being read (a metadata key, a tensor name, `header`, ...).
        field: String,
        /// Offset one past the last byte needed.
        needed: u64,
        /// The file's size.
        file_size: u64,
    },
    /// A structural field has an impossible value (count, string length, dimension, type).
    #[error("{path}: invalid field `{field}`: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A required metadata key or config field is absent.
    #[error("{path}: missing field `{field}`")]
    MissingField {
        /// The file.
        path: PathBuf,
        /// The key.
        field: String,
    },
    /// A required tensor is absent.
    #[error("{path}: missing tensor `{tensor}`")]
    MissingTensor {
        /// The file (or model directory).
        path: PathBuf,
        /// The tensor name.
        tensor: String,
    },
    /// A tensor has a shape the configuration does not allow.
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The expected shape.
        expected: Vec<i64>,
        /// The shape found.
        found: Vec<i64>,
    },
    /// A tensor is stored in a quantization or element type this engine does not load.
    #[error("{path}: tensor `{tensor}` has unsupported type {type_name} (supported: {supported})")]
    UnsupportedTensorType {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The type found (GGML type name and id, or safetensors dtype).
        type_name: String,
        /// The supported types.
        supported: String,
    },
    /// The file holds tensors of types this engine does not load (all named at once).
    #[error("{path}: unsupported tensor types {found} (e.g. `{example}`; the file has {all}; supported: {supported})")]
    UnsupportedTensorTypes {
        /// The file.
        path: PathBuf,
        /// The unsupported types with their tensor counts (`2 × IQ2_XXS`).
        found: String,
        /// One tensor of such a type.
        example: String,
        /// Every type of the file with its count.
        all: String,
        /// The supported types.
        supported: String,
    },
    /// The weights and KV buffers would not fit in the memory available.
    #[error("{path}: needs about {needed_mib} MiB of RAM ({what}) but {available_mib} MiB are available; use a smaller model or quantization, or lower SEMANTIC_MLX_CACHE_BUDGET_MB / SEMANTIC_MLX_KV_POOL_TOKENS")]
    OutOfMemory {
        /// The model.
        path: PathBuf,
        /// Estimated resident bytes, MiB.
        needed_mib: u64,
        /// What the estimate is made of.
        what: String,
        /// `MemAvailable`, MiB.
        available_mib: u64,
    },
    /// Several problems found while checking a model before loading it, in check order.
    #[error("{path}: {} problems: {}", problems.len(), problems.iter().enumerate().map(|(i, p)| format!("({}) {p}", i + 1)).collect::<Vec<_>>().join("; "))]
    Problems {
        /// The model.
        path: PathBuf,
        /// Each problem.
        problems: Vec<Error>,
    },
    /// The model's architecture has no implementation here.
    #[error("{path}: unsupported architecture `{architecture}` (supported: {})", supported.join(", "))]
    UnsupportedArchitecture {
        /// The file.
        path: PathBuf,
        /// The architecture found.
        architecture: String,
        /// The supported ones.
        supported: Vec<String>,
    },
    /// The tokenizer could not be built or loaded.
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer {
        /// The file it comes from.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The chat template does not compile.
    #[error("{path}: chat template: {reason}")]
    Template {
        /// The file it comes from.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The KV-cache spec could not be derived from the model's metadata.
    #[error("{path}: cache spec: {source}")]
    Spec {
        /// The file.
        path: PathBuf,
        /// Why.
        source: model_cache_spec::SpecError,
    },
    /// A Hugging Face id could not be fetched.
    #[error("Hugging Face model `{id}`: {reason}")]
    Hub {
        /// The model id.
        id: String,
        /// Why (offline, unknown id, missing file).
        reason: String,
    },
    /// An engine configuration value is not allowed.
    #[error("invalid engine configuration `{field}`: {reason}")]
    Config {
        /// The option.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A KV payload does not fit the model (names, shapes, dtypes, encoding).
    #[error("KV payload does not fit the model: {0}")]
    KvPayload(String),
    /// A request is inconsistent with the sequence's state.
    #[error("invalid engine request: {0}")]
    Request(String),
    /// A request needs KV that a sliding-window layer has already dropped.
    #[error("KV left the sliding window: {0}")]
    WindowPassed(String),
    /// An unknown sequence id.
    #[error("unknown sequence {0}")]
    UnknownSequence(u64),
    /// MLX reported an error.
    #[error("MLX error while {context}: {message}")]
    Mlx {
        /// What the engine was doing.
        context: String,
        /// MLX's message.
        message: String,
    },
    /// The host decode kernel ([`crate::host_linear`]) was given weights or inputs it cannot
    /// use (code width, group size, inconsistent lengths).
    #[error("host linear kernel: {0}")]
    HostKernel(String),
    /// The worker thread stopped or could not be started.
    #[error("the engine worker stopped")]
    WorkerStopped,
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a context to MLX errors.
pub(crate) trait MlxContext<T> {
    /// Maps an MLX error to [`Error::Mlx`] with `context`.
    fn ctx(self, context: &str) -> Result<T>;
}

impl<T, E: std::fmt::Display> MlxContext<T> for std::result::Result<T, E> {
    fn ctx(self, context: &str) -> Result<T> {
        self.map_err(|e| Error::Mlx {
            context: context.to_owned(),
            message: e.to_string(),
        })
    }
}

impl From<Error> for agent_session::EngineError {
    fn from(e: Error) -> Self {
        match e {
            Error::WorkerStopped => agent_session::EngineError::Stopped,
            Error::KvPayload(m) => agent_session::EngineError::BadPayload(m),
            Error::Request(m) => agent_session::EngineError::Invalid(m),
            Error::WindowPassed(m) => agent_session::EngineError::WindowPassed(m),
            Error::UnknownSequence(id) => {
                agent_session::EngineError::UnknownSequence(agent_session::SequenceId(id))
            }
            other => agent_session::EngineError::Backend(other.to_string()),
        }
    }
}
