//! The `librechat-bff` command line.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// jemalloc, not glibc's malloc: after a burst of connections (5,000 held SSE streams in
/// `cargo bench --bench proxy_vs_nginx -- --modes held`) glibc kept the memory (+140 MB, growing
/// with each burst); jemalloc with the settings below gives it back within seconds.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's built-in configuration (`_RJEM_MALLOC_CONF` in the environment still overrides
/// it): a background thread purges freed pages, dirty pages after 1 s (reused meanwhile, so a
/// busy server does not pay an madvise per free), without the lazy `MADV_FREE` stage whose
/// pages would stay in RSS until the kernel is short of memory. The 8 KiB and 10 KiB classes
/// (hyper's per-connection read and write buffers and its client's request channel: 4–5 per
/// proxied stream) get slabs of 8+ pages rather than one extent per buffer: after 5,000 held
/// streams closed the live heap was back to its start but RSS was not (jemalloc keeps what it
/// made for every extent); with fewer extents +39 % → +27 % of the start (`--modes held`).
#[cfg(feature = "jemalloc")]
#[used]
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: MallocConf = MallocConf(
    c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,slab_sizes:8192-10240:8".as_ptr(),
);

/// `const char *malloc_conf` as jemalloc declares it.
#[cfg(feature = "jemalloc")]
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);
// SAFETY: points at an immutable static C string.
#[cfg(feature = "jemalloc")]
unsafe impl Sync for MallocConf {}
use librechat_bff::{
    admin::ops, app::AppState, config::Config, credentials::KeyRing, doctor, serve, telemetry,
};

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
    /// Check Redis, LibreChat, the identity keys, the key ring and the config; print a checklist.
    Doctor {
        #[arg(long, env = "BFF_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run provisioning workers only (scale-out), until SIGINT/SIGTERM.
    Worker {
        #[arg(long, env = "BFF_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Users: register, import, inspect, retry.
    Users {
        #[arg(long, env = "BFF_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Provisioning jobs.
    Jobs {
        #[arg(long, env = "BFF_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: JobsCommand,
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
enum UsersCommand {
    /// Register a user: enqueue the creation of their LibreChat account.
    Add {
        #[arg(long)]
        user_id: String,
        #[arg(long)]
        email: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Import users from CSV: user_id,email[,name][,librechat_password_encrypted].
    Import { file: PathBuf },
    /// Show a user's provisioning state (never the password).
    Show { user_id: String },
    /// Provision a user again (e.g. after fixing a conflict).
    Retry { user_id: String },
    /// Deactivate a user: no LibreChat access until registered again (`users add`).
    Deactivate { user_id: String },
}

#[derive(Subcommand)]
enum JobsCommand {
    /// List jobs in one state.
    List {
        #[arg(long, default_value = "dead")]
        state: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Run a dead job again.
    Retry { job_id: String },
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
        Command::Users { config, command } => run_async(users(config, command)),
        Command::Doctor { config } => run_async(async move {
            let config = match Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    println!("[FAIL] configuration: {e}\n       fix: correct that setting");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let state = AppState::new(config)?;
            let checks = doctor::run(&state).await;
            print!("{}", doctor::render(&checks));
            Ok(if checks.iter().any(|c| c.level == doctor::Level::Fail) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }),
        Command::Jobs { config, command } => run_async(jobs(config, command)),
        Command::Worker { config } => run_async(async move {
            let config = Config::load(config.as_deref())?;
            telemetry::init(&config.telemetry);
            let state = AppState::new(config)?;
            serve::run_worker(state).await;
            Ok(ExitCode::SUCCESS)
        }),
        Command::Serve { config } => {
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

type CliResult = Result<ExitCode, Box<dyn std::error::Error>>;

fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

async fn users(config_file: Option<PathBuf>, command: UsersCommand) -> CliResult {
    let state = AppState::new(Config::load(config_file.as_deref())?)?;
    match command {
        UsersCommand::Add {
            user_id,
            email,
            name,
        } => {
            let (job, created) = ops::add_user(
                &state.ops,
                ops::NewUser {
                    user_id,
                    email,
                    name,
                },
                "cli",
                ops::Reactivation::Lift,
            )
            .await?;
            println!(
                "{} job {job}",
                if created {
                    "enqueued"
                } else {
                    "already queued:"
                }
            );
        }
        UsersCommand::Import { file } => {
            let input = std::fs::File::open(&file)
                .map_err(|e| format!("cannot open {}: {e}", file.display()))?;
            let report = ops::import_csv(&state.ops, input).await?;
            println!(
                "import: {} migrated (ready), {} enqueued, {} already queued, {} rejected",
                report.migrated,
                report.enqueued,
                report.already_queued,
                report.rejected.len()
            );
            for line in &report.rejected {
                eprintln!("rejected: {line}");
            }
            if !report.rejected.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        UsersCommand::Show { user_id } => match ops::user_status(&state.ops, &user_id).await? {
            Some(v) => print_json(&v),
            None => {
                eprintln!("no user {user_id:?}: no credential and no job");
                return Ok(ExitCode::FAILURE);
            }
        },
        UsersCommand::Deactivate { user_id } => {
            print_json(
                &ops::deactivate(&state.ops, &user_id, "deactivated by an operator (CLI)").await?,
            );
        }
        UsersCommand::Retry { user_id } => {
            let Some(record) = state.vault.get(&user_id).await? else {
                eprintln!("no credential for {user_id:?}: use `users add`");
                return Ok(ExitCode::FAILURE);
            };
            let (job, _) = ops::add_user(
                &state.ops,
                ops::NewUser {
                    user_id,
                    email: record.email,
                    name: record.name,
                },
                "cli",
                ops::Reactivation::Lift,
            )
            .await?;
            println!("job {job}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn jobs(config_file: Option<PathBuf>, command: JobsCommand) -> CliResult {
    let state = AppState::new(Config::load(config_file.as_deref())?)?;
    match command {
        JobsCommand::List { state: s, limit } => {
            let jobs = state
                .provisioner
                .queue
                .list(ops::parse_state(&s)?, limit)
                .await?;
            let list: Vec<_> = jobs.iter().map(ops::job_json).collect();
            print_json(&serde_json::Value::Array(list));
        }
        JobsCommand::Retry { job_id } => {
            let job = state.provisioner.queue.requeue(&job_id).await?;
            println!("job {job} queued");
        }
    }
    Ok(ExitCode::SUCCESS)
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
    let config = match Config::load(config_file.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            telemetry::init_default();
            return Err(e.into());
        }
    };
    telemetry::init(&config.telemetry);
    let addr = config.listen_addr()?;
    let state = AppState::new(config.clone())?;
    serve::announce(&config, config_file.as_deref(), &state);
    let listener = serve::bind(addr).await?;
    tracing::info!(%addr, "listening");
    serve::run(listener, state).await?;
    Ok(())
}
