//! `moat`: run containers in microVMs without containerd.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use moat_shim::run::{self, RunOptions, EXIT_MOAT_ERROR};

#[derive(Parser)]
#[command(name = "moat", version, about = "Run containers in their own KVM microVM.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a command in a new container, each in its own microVM.
    ///
    /// IMAGE is a docker-save tarball, an OCI image layout (a directory, or a tar of
    /// one), or a plain root directory used in place. moat exits with the command's
    /// status: 125 for moat's own errors, 126 if the command cannot be executed, 127
    /// if it does not exist, 128+N if signal N ended it.
    #[command(after_help = "Settings not given here come from /etc/moat/config.toml (or $MOAT_CONFIG).\n\
        moat run needs root: it mounts the container's root file system for the VM.")]
    Run(RunArgs),
}

#[derive(Args)]
struct RunArgs {
    /// vCPUs of the microVM [default: from the config, 1]
    #[arg(long, value_name = "N")]
    vcpus: Option<u64>,
    /// Guest memory in MiB [default: from the config, 256]
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
    /// Give the command a terminal (a pty in the guest)
    #[arg(short = 't', long = "tty")]
    tty: bool,
    /// Keep stdin attached to the command
    #[arg(short = 'i', long = "interactive")]
    interactive: bool,
    /// Set an environment variable (KEY alone copies moat's own value)
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory in the container [default: the image's, or /]
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// User (and group) to run as: UID[:GID] or NAME[:GROUP] from the image's /etc/passwd
    #[arg(short = 'u', long = "user", value_name = "USER[:GROUP]")]
    user: Option<String>,
    /// Mount the container's root file system read-only
    #[arg(long = "read-only")]
    read_only: bool,
    /// Share a host directory or file at a container path (absolute paths; :ro for read-only)
    #[arg(short = 'v', long = "volume", value_name = "HOST:CTR[:ro]")]
    volume: Vec<String>,
    /// Most processes the container may have at once
    #[arg(long = "pids-limit", value_name = "N")]
    pids_limit: Option<i64>,
    /// Name of the sandbox (its state is /run/moat/NAME) [default: random]
    #[arg(long, value_name = "ID")]
    name: Option<String>,
    /// The image: docker-save tar, OCI layout (dir or tar), or a root directory
    #[arg(value_name = "IMAGE")]
    image: PathBuf,
    /// The command and its arguments [default: the image's Entrypoint and Cmd]
    #[arg(value_name = "CMD", trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

fn main() {
    moat_shim::helper::run_if_helper();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_target(false)
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_MOAT_ERROR } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let code = match cli.command {
        Command::Run(args) => match options(args).and_then(|opts| {
            let cfg = run::load_config()?;
            run::run(&cfg, &opts)
        }) {
            Ok(status) => status,
            Err(e) => {
                eprintln!("moat: {}", chain(&e));
                e.exit_code()
            }
        },
    };
    std::process::exit(code);
}

fn options(a: RunArgs) -> Result<RunOptions, run::RunError> {
    let usage = |e: moat_config::ConfigError| run::RunError::Usage(e.to_string());
    Ok(RunOptions {
        vcpus: a.vcpus.map(moat_config::check_vcpus).transpose().map_err(usage)?,
        memory_mib: a.memory.map(moat_config::check_memory).transpose().map_err(usage)?,
        image: a.image,
        args: a.command,
        tty: a.tty,
        interactive: a.interactive,
        env: a.env,
        workdir: a.workdir,
        user: a.user,
        read_only: a.read_only,
        volumes: a.volume,
        pids_limit: a.pids_limit,
        name: a.name,
    })
}

/// The error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}
