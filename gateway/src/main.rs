//! The `gateway` binary: runs an area's gateway, checks a configuration, or
//! starts the development federation.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gateway::{Config, Gateway};

/// Many threads allocate and free message-sized buffers; mimalloc's
/// per-thread heaps spend less on that than the system allocator.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An area's referral gateway: federates with peer areas over mutual TLS and
/// stores and forwards end-to-end encrypted referrals.
///
/// Exit codes: 0 success; 1 runtime failure; 2 bad command line; 3 bad
/// configuration.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a gateway from its TOML configuration until Ctrl-C or SIGTERM.
    ///
    /// On SIGHUP it reads the configuration file again and takes up, without
    /// dropping a connection, the directory of users, the sharing policy,
    /// the revocation lists and the certificates (a renewed gateway
    /// certificate, new CA files); if any of them cannot be used nothing
    /// changes, and the log says why. Other changed settings are logged as
    /// needing a restart.
    ///
    /// Example: gateway run --config /etc/referral-gateway/gateway.toml
    ///          kill -HUP $(pidof gateway)   # after editing [[users]]
    Run {
        /// The configuration file (see deploy/gateway.example.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration and its certificate files without starting.
    ///
    /// Prints when each certificate the gateway depends on expires (its
    /// own, its area's CA, each peer's CA), each revocation list with how
    /// many certificates it revokes and when the next is due, the sharing
    /// policy's version once its signature verifies, and the data
    /// directory's free space against its reserve; exits 3 if the
    /// configuration, a certificate, a revocation list or the policy is
    /// unusable, its own certificate expired included. Run it before a
    /// reload (the systemd unit does).
    ///
    /// Example: gateway check-config --config /etc/referral-gateway/gateway.toml
    CheckConfig {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start a local demo federation of three areas on 127.0.0.1, with
    /// freshly minted certificates, and print what to type next.
    ///
    /// Files go under --dir; running it again reuses them (and the messages).
    Dev {
        /// Where to put certificates, configurations and databases.
        #[arg(long, default_value = "demo")]
        dir: PathBuf,
        /// Port of the first gateway; the others follow (0: pick free ports).
        #[arg(long, default_value_t = 7441)]
        base_port: u16,
        /// Write the files and exit without starting the gateways.
        #[arg(long)]
        init_only: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(real_main(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            let config_error = e.chain().any(|c| {
                c.downcast_ref::<gateway::ConfigError>().is_some()
                    || c.downcast_ref::<certs::CertError>().is_some()
                    || c.downcast_ref::<gateway::sharing::SharingError>().is_some()
                    || matches!(
                        c.downcast_ref::<gateway::GatewayError>(),
                        Some(
                            gateway::GatewayError::Config(_)
                                | gateway::GatewayError::Certs(_)
                                | gateway::GatewayError::Policy(_)
                        )
                    )
            });
            ExitCode::from(if config_error { 3 } else { 1 })
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}

/// SIGHUP, taken over from its default (ending the process): installed
/// before the gateway starts, so that a reload asked for while it starts
/// (systemd's `ExecReload`) does not end it, and is made once it runs.
#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = Option<()>;

fn hangups() -> Hangups {
    #[cfg(unix)]
    return tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    #[cfg(not(unix))]
    None
}

/// Waits for Ctrl-C or SIGTERM; on each SIGHUP, reloads from `path`.
async fn serve(gw: &Gateway, path: &std::path::Path, mut hangups: Hangups) {
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = hangup(&mut hangups) => reload(gw, path).await,
        }
    }
}

#[cfg(unix)]
async fn hangup(signals: &mut Option<tokio::signal::unix::Signal>) {
    if let Some(s) = signals {
        if s.recv().await.is_some() {
            return;
        }
    }
    std::future::pending().await
}

#[cfg(not(unix))]
async fn hangup(_: &mut Option<()>) {
    std::future::pending().await
}

/// Reads the configuration file again and takes up what a running gateway can.
async fn reload(gw: &Gateway, path: &std::path::Path) {
    match gw.reload_file(path).await {
        Ok(r) if r.needs_restart.is_empty() => {}
        Ok(r) => tracing::warn!(
            settings = ?r.needs_restart,
            "reload: these settings changed and take effect only after a restart"
        ),
        Err(e) => {
            tracing::error!(error = %e, "reload: the configuration cannot be used; nothing changed")
        }
    }
}

async fn real_main(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config: path } => {
            let hangups = hangups();
            let config = Config::load(&path)?;
            let gw = Gateway::start(config).await?;
            serve(&gw, &path, hangups).await;
            gw.shutdown().await;
        }
        Command::CheckConfig { config } => {
            let path = config;
            let config = Config::load(&path)?;
            certs::Credentials::load(&config.tls.cert, &config.tls.key)?;
            certs::load_certs(&config.tls.ca)?;
            for p in &config.peers {
                certs::load_certs(&p.ca).with_context(|| format!("peer {}", p.area))?;
            }
            for line in gateway::certificate_report(&config)? {
                println!("{line}");
            }
            for line in gateway::revocation_report(&config)? {
                println!("{line}");
            }
            if let Some(p) = &config.policy {
                let own = gateway::sharing::OwnPolicy::load(p, &config.area)?;
                println!(
                    "sharing policy {} (policy {} version {}): signature verified",
                    p.file.display(),
                    own.policy.id(),
                    own.policy.version()
                );
            }
            println!("{}", gateway::data_dir_report(&config));
            println!(
                "{}: ok (area {}, {} peers, {} users)",
                path.display(),
                config.area,
                config.peers.len(),
                config.users.len()
            );
        }
        Command::Dev {
            dir,
            base_port,
            init_only,
        } => {
            let fed = gateway::dev::init(&dir, base_port)
                .context("writing the development federation")?;
            if init_only {
                println!("Development federation written under {}", dir.display());
                return Ok(());
            }
            let mut gateways = Vec::new();
            for path in &fed.gateway_configs {
                let config = Config::load(path)?;
                gateways.push(Gateway::start(config).await?);
            }
            print_next_steps(&dir, &fed, &gateways);
            shutdown_signal().await;
            for g in gateways {
                g.shutdown().await;
            }
        }
    }
    Ok(())
}

fn print_next_steps(
    dir: &std::path::Path,
    fed: &gateway::dev::DevFederation,
    gateways: &[Gateway],
) {
    println!("\nDemo federation running:");
    for g in gateways {
        println!("  area {:<11} https://{}", g.area(), g.local_addr());
    }
    println!("\nUsers (client configs under {}):", dir.display());
    for (area, user, path) in &fed.clients {
        println!("  {user:<6} in {area:<11} {}", path.display());
    }
    let cfg = |area: &str, user: &str| {
        fed.clients
            .iter()
            .find(|(a, u, _)| a.as_str() == area && u.as_str() == user)
            .map(|(_, _, p)| p.display().to_string())
            .unwrap_or_default()
    };
    let alice = cfg("northshire", "alice");
    let dan = cfg("southvale", "dan");
    let client = "cargo run -q --release -p client --";
    println!("\nIn another terminal: southvale's duty team publishes its encryption keys (once):");
    for u in ["dan", "erin", "farah"] {
        println!("  {client} --config {} keys", cfg("southvale", u));
    }
    println!("alice (northshire) sends an end-to-end encrypted referral to southvale's duty team:");
    println!("  echo 'Family relocated; see plan' | {client} --config {alice} refer --to team:duty@southvale --category relocation");
    println!("dan reads it (joins the case, decrypts, acknowledges) and replies:");
    println!("  {client} --config {dan} read --wait 30");
    println!("  echo 'Received; visit booked' | {client} --config {dan} reply --case <case-id>");
    println!("alice reads the reply, and sees where everything she sent is:");
    println!("  {client} --config {alice} read --wait 30");
    println!("  {client} --config {alice} sent");
    println!(
        "Opaque messages and their status: `send`, `inbox`, `fetch`, `ack`, `status` (see --help)."
    );
    println!("\nPress Ctrl-C to stop the gateways.");
}

/// An error and its causes, each said once: most messages here already
/// name their cause (`cannot read FILE: <the OS error>`), which the chain
/// would repeat.
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
