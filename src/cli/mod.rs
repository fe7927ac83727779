//! Command-line interface: argument parsing and output only. Each subcommand has its own
//! file; the work is done by the library.

/// `print!` that does not panic when stdout is gone (`ovl-controller status | head -1`):
/// what could not be written is dropped, and the command still ends with its own exit
/// code. Any other write error (a full disk behind `> file`) is remembered, and the
/// command exits 1 ([`output_failure`]).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        $crate::cli::note_output(write!(std::io::stdout(), $($arg)*));
    }};
}

/// `println!` as [`out!`].
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        $crate::cli::note_output(writeln!(std::io::stdout(), $($arg)*));
    }};
}

/// The first error writing to stdout other than a reader gone away (EPIPE).
static OUTPUT_ERROR: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

pub fn note_output(result: std::io::Result<()>) {
    if let Err(e) = result
        && e.kind() != std::io::ErrorKind::BrokenPipe
        && let Ok(mut first) = OUTPUT_ERROR.lock()
    {
        first.get_or_insert_with(|| e.to_string());
    }
}

/// Flushes stdout; the failure to report if any output was lost other than to a closed
/// pipe.
pub fn output_failure() -> Option<Failure> {
    use std::io::Write as _;
    note_output(std::io::stdout().flush());
    let lost = OUTPUT_ERROR.lock().ok()?.take()?;
    Some(Failure::runtime(format!("cannot write the output: {lost}")))
}

mod agent;
mod apply;
mod keygen;
mod progress;
mod rotate;
mod status;
mod validate;

use std::io::Read as _;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use ovl::spec::{self, MAX_SPEC_BYTES, Spec};

/// Exit codes of the contract: 0 done, 1 failed at run time, 2 invalid input or usage.
pub const EXIT_OK: u8 = 0;
pub const EXIT_RUNTIME: u8 = 1;
pub const EXIT_INPUT: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "ovl-controller",
    version,
    about = "Declarative VXLAN overlays with kernel IPsec ESP"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand accepts, so scripts can pass one set to all of them.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// This node's name in the spec (default: the node whose address is local).
    #[arg(long, global = true, value_name = "NAME")]
    pub node: Option<String>,
    /// Directory for the agent's state.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        default_value = "/var/lib/ovl-controller"
    )]
    pub state_dir: PathBuf,
    /// The local agent's control socket.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        default_value = "/run/ovl-controller/agent.sock"
    )]
    pub socket: PathBuf,
    /// This node's private key file.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        default_value = "/etc/ovl-controller/node.key"
    )]
    pub key: PathBuf,
    /// Log verbosity (RUST_LOG, when set, takes precedence).
    #[arg(
        long,
        global = true,
        value_name = "LEVEL",
        default_value = "warn",
        value_parser = ["off", "error", "warn", "info", "debug", "trace"]
    )]
    pub log_level: String,
    /// Log format: text for people, json for log collectors (one event per line).
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check a spec file; the first problem found is reported with its location.
    Validate(SpecFile),
    /// Show the plan for this node and apply it.
    Apply(apply::ApplyArgs),
    /// Remove everything the spec's networks own on this node.
    Delete(apply::DeleteArgs),
    /// Show the overlay state of this node.
    Status(status::StatusArgs),
    /// Run the per-node daemon.
    Agent(agent::AgentArgs),
    /// Rotate keys now (for cron and timers).
    Rotate(rotate::RotateArgs),
    /// Create this node's identity key (mode 0600) and print its public key.
    Keygen(keygen::KeygenArgs),
}

#[derive(Args, Debug)]
pub struct SpecFile {
    /// The spec file, or - for standard input.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
}

/// A failure with the exit code it maps to. Messages are one line where possible.
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn input(message: impl std::fmt::Display) -> Failure {
        Failure {
            code: EXIT_INPUT,
            message: message.to_string(),
        }
    }
    pub fn runtime(message: impl std::fmt::Display) -> Failure {
        Failure {
            code: EXIT_RUNTIME,
            message: message.to_string(),
        }
    }
}

/// Reads and validates a spec file (`-` is standard input), never more than the size
/// limit plus one byte, so a huge file is refused without being read whole. Also
/// returns the text and the name errors are reported under (the agent re-validates the
/// text it is sent).
pub fn load_spec_text(path: &std::path::Path) -> Result<(Spec, String, String), Failure> {
    let (name, mut reader): (String, Box<dyn std::io::Read>) = if path.as_os_str() == "-" {
        ("<stdin>".into(), Box::new(std::io::stdin()))
    } else {
        let file = std::fs::File::open(path)
            .map_err(|e| Failure::input(format!("{}: {e}", path.display())))?;
        (path.display().to_string(), Box::new(file))
    };
    let mut bytes = Vec::new();
    reader
        .by_ref()
        .take(MAX_SPEC_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Failure::input(format!("{name}: {e}")))?;
    let spec = spec::parse(&bytes, &name).map_err(Failure::input)?;
    // parse() accepted it, so it is UTF-8.
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Ok((spec, text, name))
}

pub fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Validate(args) => validate::run(&args, cli.common.node.as_deref()),
        Command::Apply(args) => apply::run_apply(&cli.common, &args),
        Command::Delete(args) => apply::run_delete(&cli.common, &args),
        Command::Status(args) => status::run(&cli.common, &args),
        Command::Keygen(args) => keygen::run(&args),
        Command::Agent(args) => agent::run(&cli.common, &args),
        Command::Rotate(args) => rotate::run(&cli.common, &args),
    }
}

/// The agent's runtime: its main loop runs on the calling thread, everything it spawns
/// (the local API, control sessions and their keepalives, metrics, the netlink
/// connections) on two worker threads. A kernel change can hold the main loop inside
/// one system call for seconds (the kernel carries out a netlink batch in the sender's
/// `send()`; deleting a link costs tens of milliseconds): the rest keeps going meanwhile.
pub fn agent_runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ovl-agent")
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("cannot start the async runtime: {e}")))
}

/// A single-threaded runtime: the CLI does one thing at a time.
pub fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("cannot start the async runtime: {e}")))
}
