//! The `librechat-bff` command line.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use librechat_bff::{app::AppState, config::Config, credentials::KeyRing, serve, telemetry};

#[derive(Parser)]
#[command(
    name = "librechat-bff",
    version,
    about = "Puts an unmodified LibreChat behind your own login"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service.
    Serve {
        /// TOML config file layered over the embedded defaults.
        #[arg(long, env = "BFF_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Load and validate the configuration, print it with secrets redacted.
    CheckConfig {
        #[arg(long, env = "BFF_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Fernet key management.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The credential vault.
    Credentials {
        #[command(subcommand)]
        command: CredentialsCommand,
    },
}

#[derive(Subcommand)]
enum CredentialsCommand {
    /// Re-encrypt every stored credential under the first key of crypto.fernet_keys.
    Rotate {
        #[arg(long, env = "BFF_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a new random Fernet key (url-safe base64, 32 bytes).
    Generate,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Keys {
            command: KeysCommand::Generate,
        } => {
            println!("{}", KeyRing::generate_key());
            ExitCode::SUCCESS
        }
        Command::CheckConfig { config } => match Config::load(config.as_deref()) {
            Ok(cfg) => {
                print!("{}", cfg.to_redacted_toml());
                match AppState::new(cfg) {
                    Ok(_) => {
                        eprintln!("configuration is valid");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(2)
                    }
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Credentials {
            command: CredentialsCommand::Rotate { config },
        } => run_async(rotate_credentials(config)),
        Command::Serve { config } => {
            telemetry::init();
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run_serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run_async<F>(fut: F) -> ExitCode
where
    F: std::future::Future<Output = Result<ExitCode, Box<dyn std::error::Error>>>,
{
    match tokio::runtime::Runtime::new() {
        Ok(rt) => match rt.block_on(fut) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn rotate_credentials(
    config_file: Option<PathBuf>,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let config = Config::load(config_file.as_deref())?;
    if config.crypto.fernet_keys.is_empty() {
        return Err("crypto.fernet_keys is empty: configure the key ring (new key first)".into());
    }
    let state = AppState::new(config)?;
    let report = state.vault.rotate().await?;
    println!(
        "credentials: {} total, {} re-encrypted, {} already under the first key, {} failed",
        report.total, report.rotated, report.already_current, report.failed
    );
    Ok(if report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn run_serve(config_file: Option<PathBuf>) -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::load(config_file.as_deref())?;
    let addr = config.listen_addr()?;
    let state = AppState::new(config.clone())?;
    serve::announce(&config, config_file.as_deref(), &state);
    let listener = serve::bind(addr).await?;
    tracing::info!(%addr, "listening");
    serve::run(listener, state).await?;
    Ok(())
}
