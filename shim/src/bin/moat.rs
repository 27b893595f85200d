//! `moat`: run containers in microVMs without containerd.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use moat_shim::containerd_config::{self, Applied, ConfigVersion};
use moat_shim::doctor;
use moat_shim::image::cache::{self, Prune};
use moat_shim::run::{self, RunOptions, EXIT_MOAT_ERROR};

#[derive(Parser)]
#[command(
    name = "moat",
    version,
    about = "Run containers in their own KVM microVM.",
    after_help = "On a new host, `moat doctor` says what is missing; `moat containerd-config` registers moat with containerd."
)]
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
    /// Check this host for moat and say what to fix; exits 1 if a check failed.
    ///
    /// One line per check: `ok    WHAT`, `WARN  WHAT: FIX` or `FAIL  WHAT: FIX`. Checks
    /// /dev/kvm, moat's config and the files it names, the containerd shim on PATH,
    /// writable state and image dirs, cgroup v2, and containerd and its config.
    Doctor(DoctorArgs),
    /// Print the containerd config that registers moat as CRI runtime `moat`, or add it.
    ///
    /// The shape follows containerd's major version (1.x: config version 2; 2.x:
    /// config version 3), from `containerd --version` unless --version says. ctr and
    /// Docker need no config: they name the runtime io.containerd.moat.v2 directly.
    #[command(name = "containerd-config")]
    ContainerdConfig(ContainerdConfigArgs),
    /// List or prune the images `moat run` unpacked (the config's image_dir).
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Subcommand)]
enum ImageCommand {
    /// List the unpacked images: id, disk usage, last use, whether a run is using it,
    /// and the path it was last run from.
    #[command(visible_alias = "list")]
    Ls,
    /// Remove unpacked images that no run is using.
    ///
    /// Without --all, the least recently used ones until the cache fits in the
    /// config's image_cache_mib (what moat run does after unpacking a new image); with
    /// --all, every one. What interrupted unpacks left goes too. An image a run is
    /// using, or unpacking, stays.
    Prune(PruneArgs),
}

#[derive(Args)]
struct PruneArgs {
    /// Remove every image no run is using, not only what exceeds image_cache_mib
    #[arg(long)]
    all: bool,
}

#[derive(Args)]
struct DoctorArgs {
    /// containerd's config file
    #[arg(long = "containerd-config", value_name = "FILE", default_value = containerd_config::DEFAULT_CONTAINERD_CONFIG)]
    containerd_config: PathBuf,
}

#[derive(Args)]
struct ContainerdConfigArgs {
    /// containerd's major version [default: from `containerd --version`]
    #[arg(long = "version", value_name = "1|2", value_parser = clap::value_parser!(u64).range(1..=2))]
    version: Option<u64>,
    /// Add the runtime to containerd's config FILE (created if absent; a changed file
    /// is backed up to FILE.moat-backup first) [default FILE: /etc/containerd/config.toml]
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = containerd_config::DEFAULT_CONTAINERD_CONFIG)]
    apply: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// vCPUs of the microVM, at most the config's max_vcpus [default: from the config, 1]
    #[arg(long, value_name = "N")]
    vcpus: Option<u64>,
    /// Guest memory in MiB, at most the config's max_memory_mib [default: from the config, 256]
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
    /// Size of the container's writable layer in MiB, its disk quota [default: from the config, 10240]
    #[arg(long = "disk-size", value_name = "MIB")]
    disk_size: Option<u32>,
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
                eprintln!("moat: {}", moat_shim::error_chain(&e));
                e.exit_code()
            }
        },
        Command::Doctor(args) => {
            let checks = doctor::run(&doctor::Options { containerd_config: args.containerd_config });
            for c in &checks {
                println!("{c}");
            }
            doctor::exit_code(&checks)
        }
        Command::Image(cmd) => match image(cmd) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("moat: {e}");
                1
            }
        },
        Command::ContainerdConfig(args) => match containerd_config(args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("moat: {e}");
                1
            }
        },
    };
    std::process::exit(code);
}

/// `moat image ls` and `moat image prune`.
fn image(cmd: ImageCommand) -> Result<(), String> {
    let cfg = run::load_config().map_err(|e| moat_shim::error_chain(&e))?;
    let dir = &cfg.image_dir;
    match cmd {
        ImageCommand::Ls => {
            let images = cache::list(dir).map_err(|e| moat_shim::error_chain(&e))?;
            print!("{}", cache::format_list(&images, std::time::SystemTime::now()));
        }
        ImageCommand::Prune(a) => {
            let mode = match (a.all, cfg.image_cache_mib) {
                (true, _) => Prune::All,
                (false, 0) => Prune::ToCap(u64::MAX),
                (false, mib) => Prune::ToCap(mib.saturating_mul(1 << 20)),
            };
            let report = cache::prune(dir, mode).map_err(|e| moat_shim::error_chain(&e))?;
            for i in &report.removed {
                println!("removed {} ({})", i.digest, cache::human_size(i.bytes));
            }
            let sum = |v: &[cache::CachedImage]| cache::human_size(v.iter().fold(0u64, |t, i| t.saturating_add(i.bytes)));
            let in_use = report.kept.iter().filter(|i| i.in_use).count();
            println!(
                "moat: removed {} images ({}); {} left in {} ({}), {in_use} of them in use",
                report.removed.len(),
                sum(&report.removed),
                report.kept.len(),
                dir.display(),
                sum(&report.kept)
            );
            if !a.all && cfg.image_cache_mib == 0 {
                println!("moat: image_cache_mib is 0 (no limit), so only --all removes images");
            }
        }
    }
    Ok(())
}

/// `moat containerd-config`: print the CRI runtime entry, or add it to a file.
fn containerd_config(a: ContainerdConfigArgs) -> Result<(), String> {
    let detected = || -> Result<(u64, String), String> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let bin = doctor::find_in_path(&path, "containerd").ok_or("containerd is not on PATH")?;
        doctor::containerd_version(&bin).map_err(|e| format!("{} --version: {e}", bin.display()))
    };
    let major = match a.version {
        Some(v) => Ok((v, format!("{v}.x"))),
        None => detected(),
    };
    let Some(file) = a.apply else {
        match major {
            Ok((major, v)) => {
                let cv = ConfigVersion::for_containerd(major).map_err(|e| moat_shim::error_chain(&e))?;
                println!("# containerd {v}: add to its config (config version {}), then restart containerd", cv.number());
                print!("{}", cv.snippet());
            }
            Err(why) => {
                println!("# containerd's version is unknown ({why}); pick the entry for yours (or pass --version),");
                println!("# add it to its config, then restart containerd.");
                for (major, cv) in [(1, ConfigVersion::V2), (2, ConfigVersion::V3)] {
                    println!("\n# containerd {major}.x (config version {}):", cv.number());
                    print!("{}", cv.snippet());
                }
            }
        }
        return Ok(());
    };
    let (major, _) = major.map_err(|why| format!("{why}: pass --version 1 or 2 (containerd's major version)"))?;
    let restart = "restart containerd for it to take effect (systemctl restart containerd)";
    match containerd_config::apply(&file, major).map_err(|e| moat_shim::error_chain(&e))? {
        Applied::AlreadyRegistered => println!("moat: {} already registers runtime moat; nothing changed", file.display()),
        Applied::Created(v) => {
            println!("moat: wrote {} (config version {}) registering runtime moat; {restart}", file.display(), v.number())
        }
        Applied::Appended { version, backup } => println!(
            "moat: added runtime moat to {} (config version {}; the previous file is {}); {restart}",
            file.display(),
            version.number(),
            backup.display()
        ),
    }
    Ok(())
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
        disk_mib: a.disk_size,
        name: a.name,
    })
}

