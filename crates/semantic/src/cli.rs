//! The command line: `semantic serve | models inspect | agents list|show|rm | config`.

use crate::settings::{Layers, Settings};
use crate::wiring;
use clap::{Args, Parser, Subcommand};
use std::collections::HashMap;
use std::path::PathBuf;

/// Inference server for many agents sharing one local model, with persistent KV caches.
#[derive(Debug, Parser)]
#[command(name = "semantic", version, about)]
struct Cli {
    /// TOML configuration file (keys: the variable names without `SEMANTIC_`, lower case).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the OpenAI and Anthropic APIs.
    Serve(ServeArgs),
    /// Model tools.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// List, show or delete agents' caches (on disk, or through a running server with --url).
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// Print the effective configuration and where each value came from.
    Config(CommonArgs),
}

/// Flags shared by commands that read the server configuration.
#[derive(Debug, Args, Default)]
struct CommonArgs {
    /// Cache directory (SEMANTIC_AGENT_CACHE_DIR).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<String>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Model: a Hugging Face id, a directory or a .gguf file (SEMANTIC_MLX_MODEL_ID).
    #[arg(long)]
    model: Option<String>,
    /// Address to listen on (SEMANTIC_SERVER_HOST).
    #[arg(long)]
    host: Option<String>,
    /// Port to listen on (SEMANTIC_SERVER_PORT).
    #[arg(long)]
    port: Option<String>,
    /// Log level: trace, debug, info, warn, error (SEMANTIC_SERVER_LOG_LEVEL).
    #[arg(long)]
    log_level: Option<String>,
    /// Log format: human or json (SEMANTIC_SERVER_LOG_FORMAT).
    #[arg(long)]
    log_format: Option<String>,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    /// Print a model's ModelCacheSpec and the capacity maths for the configured budget.
    Inspect {
        /// A .gguf file, a model directory or a Hugging Face id (default: the default model).
        model: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum AgentsCommand {
    /// List agents.
    List(AgentsArgs),
    /// Show one agent.
    Show {
        /// The agent id.
        id: String,
        #[command(flatten)]
        args: AgentsArgs,
    },
    /// Delete an agent's cache (blocks shared with other agents stay).
    Rm {
        /// The agent id.
        id: String,
        #[command(flatten)]
        args: AgentsArgs,
    },
}

#[derive(Debug, Args)]
struct AgentsArgs {
    /// A running server's base URL (for example http://127.0.0.1:8000): go through its admin
    /// API instead of the cache directory.
    #[arg(long)]
    url: Option<String>,
    /// Admin key for --url (default: SEMANTIC_ADMIN_KEY).
    #[arg(long)]
    admin_key: Option<String>,
    #[command(flatten)]
    common: CommonArgs,
}

/// Errors of the command line, printed by `main`.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Configuration problem.
    #[error(transparent)]
    Settings(#[from] crate::settings::SettingsError),
    /// Start-up or runtime failure.
    #[error(transparent)]
    App(#[from] wiring::AppError),
}

fn layers(config: Option<PathBuf>, common: &CommonArgs) -> Layers {
    let mut flags = HashMap::new();
    if let Some(d) = &common.cache_dir {
        flags.insert("SEMANTIC_AGENT_CACHE_DIR", d.clone());
    }
    Layers {
        config_file: config,
        dotenv_file: Some(PathBuf::from(".env")),
        flags,
    }
}

/// Parses the command line and runs the command.
pub fn run() -> Result<(), CliError> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let mut l = layers(cli.config, &args.common);
            for (var, v) in [
                ("SEMANTIC_MLX_MODEL_ID", args.model),
                ("SEMANTIC_SERVER_HOST", args.host),
                ("SEMANTIC_SERVER_PORT", args.port),
                ("SEMANTIC_SERVER_LOG_LEVEL", args.log_level),
                ("SEMANTIC_SERVER_LOG_FORMAT", args.log_format),
            ] {
                if let Some(v) = v {
                    l.flags.insert(var, v);
                }
            }
            let settings = Settings::load(&l)?;
            wiring::serve(settings)?;
        }
        Command::Models(ModelsCommand::Inspect { model }) => {
            let mut l = layers(cli.config, &CommonArgs::default());
            if let Some(m) = model {
                l.flags.insert("SEMANTIC_MLX_MODEL_ID", m);
            }
            let settings = Settings::load(&l)?;
            print!("{}", wiring::inspect(&settings)?);
        }
        Command::Agents(cmd) => {
            let (action, args) = match cmd {
                AgentsCommand::List(a) => (wiring::AgentsAction::List, a),
                AgentsCommand::Show { id, args } => (wiring::AgentsAction::Show(id), args),
                AgentsCommand::Rm { id, args } => (wiring::AgentsAction::Rm(id), args),
            };
            let settings = Settings::load(&layers(cli.config, &args.common))?;
            let admin_key = args.admin_key.or_else(|| settings.admin_key.clone());
            print!(
                "{}",
                wiring::agents(&settings, action, args.url.as_deref(), admin_key.as_deref())?
            );
        }
        Command::Config(common) => {
            let settings = Settings::load(&layers(cli.config, &common))?;
            print!("{}", settings.describe());
        }
    }
    Ok(())
}
