//! The peers, installed once into `.peers/` (ignored by git) from the package registries,
//! at pinned versions:
//!
//! * **llama.cpp**: `llama-server` and `llama-bench` built from the vendored llama.cpp of
//!   the `llama-cpp-python` source distribution on PyPI (CPU, `-DGGML_NATIVE=ON
//!   -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON`, Release). About 6 minutes on 2 cores, once.
//! * **mlx-lm**: `mlx`, `mlx-cpu` and `mlx-lm` from PyPI in a venv, and the default model
//!   exported to mlx-lm's layout (float32 safetensors, config.json, tokenizer.json,
//!   tokenizer_config.json with the GGUF's chat template) by `export_mlx_model.py`. Its
//!   server runs with Debian's OpenBLAS preloaded (the wheel's bundled reference BLAS is
//!   about 20× slower), as the project's own MLX build uses.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use super::server::{IdleProbe, Spec};
use super::Target;
use crate::util::{self, log, step};

/// llama-cpp-python source distribution whose vendored llama.cpp is built.
pub const LLAMA_CPP_PYTHON_VERSION: &str = "0.3.36";
/// mlx, mlx-cpu and mlx-lm version.
pub const MLX_VERSION: &str = "0.32.2";
/// gguf-py, used only by the model export.
pub const GGUF_PY_VERSION: &str = "0.19.0";
/// CMake options of the llama.cpp build.
pub const LLAMA_CMAKE_FLAGS: &[&str] = &[
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
];
/// Slots of llama-server: one per agent of the `agents` scenario (4), also enough for the
/// four context lengths of a `ttft` run.
pub const LLAMA_SLOTS: usize = 4;
/// Context per llama-server slot.
pub const LLAMA_SLOT_CTX: usize = 8192;

const EXPORT_SCRIPT: &str = include_str!("export_mlx_model.py");

/// What `--peers` installed.
#[derive(Debug, Clone)]
pub struct Installed {
    /// llama-server.
    pub llama_server: PathBuf,
    /// llama-bench.
    pub llama_bench: PathBuf,
    /// The venv's `mlx_lm.server` script.
    pub mlx_server: PathBuf,
    /// The exported model directory.
    pub mlx_model: PathBuf,
    /// OpenBLAS to preload into mlx-lm, when present.
    pub openblas: Option<PathBuf>,
}

/// `.peers/` at the workspace root.
pub fn peers_dir() -> PathBuf {
    util::workspace_root().join(".peers")
}

/// Install (or find) both peers, and export `model` for mlx-lm.
pub fn ensure(model: &Path) -> Result<Installed> {
    let root = peers_dir();
    fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let (llama_server, llama_bench) = ensure_llama(&root)?;
    let (mlx_server, python) = ensure_mlx(&root)?;
    let mlx_model = ensure_mlx_model(&root, &python, model)?;
    let openblas = openblas();
    if openblas.is_none() {
        log("bench", "warning: Debian's OpenBLAS was not found; mlx-lm runs with its reference BLAS (much slower)");
    }
    Ok(Installed {
        llama_server,
        llama_bench,
        mlx_server,
        mlx_model,
        openblas,
    })
}

fn openblas() -> Option<PathBuf> {
    let path = PathBuf::from(format!(
        "/usr/lib/{}-linux-gnu/openblas-pthread/libblas.so.3",
        std::env::consts::ARCH
    ));
    path.is_file().then_some(path)
}

fn stamp_matches(path: &Path, expected: &str) -> bool {
    fs::read_to_string(path).is_ok_and(|s| s == expected)
}

fn python() -> Result<PathBuf> {
    util::find_in_path("python3")
        .or_else(|| util::find_in_path("python"))
        .context("python3 is needed to fetch and run the peers (pip, venv); install it or run without --peers")
}

fn ensure_llama(root: &Path) -> Result<(PathBuf, PathBuf)> {
    let v = LLAMA_CPP_PYTHON_VERSION;
    let dir = root.join(format!("llama.cpp-{v}"));
    let build = dir.join("build");
    let server = build.join("bin").join("llama-server");
    let bench = build.join("bin").join("llama-bench");
    let stamp = dir.join(".complete");
    let expected = format!("llama-cpp-python=={v}\n{}\n", LLAMA_CMAKE_FLAGS.join(" "));
    if stamp_matches(&stamp, &expected) && server.is_file() && bench.is_file() {
        return Ok((server, bench));
    }
    let downloads = root.join("downloads");
    let sdist = downloads.join(format!("llama_cpp_python-{v}.tar.gz"));
    if !sdist.is_file() {
        step(
            "peers",
            &format!("download llama-cpp-python {v} (sdist, PyPI)"),
            "needs PyPI; retry",
            || {
                util::run(
                    Command::new(python()?)
                        .args(["-m", "pip", "download", "--no-deps", "--no-binary", ":all:"])
                        .arg(format!("llama-cpp-python=={v}"))
                        .arg("-d")
                        .arg(&downloads),
                )
            },
        )?;
    }
    let src = dir
        .join(format!("llama_cpp_python-{v}"))
        .join("vendor")
        .join("llama.cpp");
    if !src.join("CMakeLists.txt").is_file() {
        step(
            "peers",
            "unpack the sdist",
            "delete .peers/ and retry",
            || {
                fs::create_dir_all(&dir)?;
                util::run(
                    Command::new("tar")
                        .arg("-xzf")
                        .arg(&sdist)
                        .arg("-C")
                        .arg(&dir),
                )
            },
        )?;
    }
    let jobs = std::thread::available_parallelism()
        .map_or(2, usize::from)
        .to_string();
    step(
        "peers",
        "build llama-server and llama-bench (CPU, about 6 minutes on 2 cores, once)",
        "cmake and a C++ compiler are needed (apt-get install cmake g++); the errors are above",
        || {
            util::run(
                Command::new("cmake")
                    .arg("-S")
                    .arg(&src)
                    .arg("-B")
                    .arg(&build)
                    .args(LLAMA_CMAKE_FLAGS),
            )?;
            util::run(Command::new("cmake").arg("--build").arg(&build).args([
                "--config",
                "Release",
                "--target",
                "llama-server",
                "llama-bench",
                "-j",
                &jobs,
            ]))
        },
    )?;
    if !server.is_file() {
        bail!(
            "the llama.cpp build finished but {} is missing",
            server.display()
        );
    }
    util::write_atomic(&stamp, expected.as_bytes())?;
    Ok((server, bench))
}

/// The mlx-lm venv: returns (mlx_lm.server, the venv's python).
fn ensure_mlx(root: &Path) -> Result<(PathBuf, PathBuf)> {
    let dir = root.join(format!("mlx-lm-{MLX_VERSION}"));
    let venv = dir.join("venv");
    let bin = venv.join("bin");
    let server = bin.join("mlx_lm.server");
    let py = bin.join("python");
    let packages = [
        format!("mlx=={MLX_VERSION}"),
        format!("mlx-cpu=={MLX_VERSION}"),
        format!("mlx-lm=={MLX_VERSION}"),
        format!("gguf=={GGUF_PY_VERSION}"),
    ];
    let stamp = dir.join(".complete");
    let expected = format!("{}\n", packages.join(" "));
    if stamp_matches(&stamp, &expected) && server.is_file() && py.is_file() {
        return Ok((server, py));
    }
    step(
        "peers",
        &format!("venv with {}", packages.join(" ")),
        "needs PyPI and python3-venv; retry",
        || {
            fs::create_dir_all(&dir)?;
            util::run(Command::new(python()?).args(["-m", "venv"]).arg(&venv))?;
            util::run(
                Command::new(&py)
                    .args(["-m", "pip", "install", "--quiet"])
                    .args(&packages),
            )
        },
    )?;
    if !server.is_file() {
        bail!("mlx-lm installed but {} is missing", server.display());
    }
    util::write_atomic(&stamp, expected.as_bytes())?;
    Ok((server, py))
}

fn ensure_mlx_model(root: &Path, python: &Path, model: &Path) -> Result<PathBuf> {
    let stem = model
        .file_stem()
        .map_or_else(|| "model".to_owned(), |s| s.to_string_lossy().into_owned());
    let dir = root.join(format!("mlx-lm-{MLX_VERSION}"));
    let out = dir.join(format!("model-{stem}-f32"));
    let size = fs::metadata(model)
        .with_context(|| format!("cannot read {}", model.display()))?
        .len();
    let stamp = out.join(".complete");
    let expected = format!(
        "{}\n{size}\n{}\n",
        model.display(),
        util::sha256_bytes(EXPORT_SCRIPT.as_bytes())
    );
    if stamp_matches(&stamp, &expected) {
        return Ok(out);
    }
    let script = dir.join("export_mlx_model.py");
    util::write_atomic(&script, EXPORT_SCRIPT.as_bytes())?;
    step(
        "peers",
        "export the model for mlx-lm (float32 safetensors + tokenizer)",
        "the Python error is above",
        || {
            util::remove_path(&out)?;
            util::run(Command::new(python).arg(&script).arg(model).arg(&out))
        },
    )?;
    util::write_atomic(&stamp, expected.as_bytes())?;
    Ok(out)
}

impl Installed {
    /// How to run `target` on `port`.
    pub fn spec(
        &self,
        target: Target,
        model: &Path,
        port: u16,
        work: &Path,
        log: PathBuf,
    ) -> Result<Spec> {
        let threads = std::thread::available_parallelism()
            .map_or(2, usize::from)
            .to_string();
        match target {
            Target::LlamaCpp => {
                let slots = work.join("llama-slots");
                fs::create_dir_all(&slots)?;
                let args: Vec<OsString> = vec![
                    "-m".into(),
                    model.into(),
                    "--host".into(),
                    "127.0.0.1".into(),
                    "--port".into(),
                    port.to_string().into(),
                    "-t".into(),
                    threads.clone().into(),
                    "-tb".into(),
                    threads.into(),
                    "-c".into(),
                    (LLAMA_SLOTS * LLAMA_SLOT_CTX).to_string().into(),
                    "-np".into(),
                    LLAMA_SLOTS.to_string().into(),
                    "--jinja".into(),
                    "--slot-save-path".into(),
                    slots.into(),
                ];
                Ok(Spec {
                    label: target.label().into(),
                    program: self.llama_server.clone(),
                    args,
                    env: Vec::new(),
                    port,
                    ready_path: "/health".into(),
                    model_field: "default".into(),
                    idle: IdleProbe::Cpu,
                    log,
                })
            }
            Target::MlxLm => {
                let mut env: Vec<(String, OsString)> = Vec::new();
                if let Some(blas) = &self.openblas {
                    env.push(("LD_PRELOAD".into(), blas.into()));
                    if let Some(core) = openblas_coretype() {
                        env.push(("OPENBLAS_CORETYPE".into(), core.into()));
                    }
                }
                Ok(Spec {
                    label: target.label().into(),
                    program: self.mlx_server.clone(),
                    args: vec![
                        "--model".into(),
                        self.mlx_model.clone().into(),
                        "--host".into(),
                        "127.0.0.1".into(),
                        "--port".into(),
                        port.to_string().into(),
                        // Our prefill chunk (SEMANTIC_MLX_PREFILL_STEP_SIZE's default): its
                        // own default of 2,048 is slower at depth on MLX's CPU attention.
                        "--prefill-step-size".into(),
                        "256".into(),
                    ],
                    env,
                    port,
                    ready_path: "/health".into(),
                    model_field: "default_model".into(),
                    idle: IdleProbe::Cpu,
                    log,
                })
            }
            Target::Ours => bail!("not a peer"),
        }
    }
}

/// The OpenBLAS kernels for mlx-lm: the ones our server runs with. OpenBLAS 0.3.21 takes
/// CPUs newer than itself for a Prescott (SSE3 kernels, half the prefill speed); the server
/// then restarts itself with `OPENBLAS_CORETYPE` (see `engine_mlx::blas`), and mlx-lm, on the
/// same library, gets the same setting here: SkylakeX with AVX-512, Haswell with AVX2 + FMA
/// (on a CPU that OpenBLAS recognises these are the kernels it picks anyway). A value the
/// user set is inherited as it is.
fn openblas_coretype() -> Option<&'static str> {
    if std::env::var_os("OPENBLAS_CORETYPE").is_some() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f")
            && has!("avx512bw")
            && has!("avx512dq")
            && has!("avx512vl")
            && has!("avx512cd")
        {
            return Some("SkylakeX");
        }
        if has!("avx2") && has!("fma") {
            return Some("Haswell");
        }
    }
    None
}
