//! `ovl-controller`: parse arguments, run the subcommand, map failures to exit codes
//! (0 done, 1 failed at run time, 2 invalid input or usage).

mod cli;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    ovl::memory::keep_freed_memory();
    let cli = cli::Cli::parse();
    let format = match cli.common.log_format {
        cli::LogFormat::Text => ovl::logging::Format::Text,
        cli::LogFormat::Json => ovl::logging::Format::Json,
    };
    ovl::logging::init(&cli.common.log_level, format);
    let result = cli::run(cli);
    // Output lost to a full disk (not to a reader gone away) is a failure of its own,
    // after the command's own error if it had one.
    let lost = cli::output_failure();
    let failure = match (result, lost) {
        (Ok(()), None) => return ExitCode::from(cli::EXIT_OK),
        (Ok(()), Some(lost)) => lost,
        (Err(failure), lost) => {
            if let Some(lost) = lost {
                eprintln!("error: {}", lost.message);
            }
            failure
        }
    };
    eprintln!("error: {}", failure.message);
    ExitCode::from(failure.code)
}
