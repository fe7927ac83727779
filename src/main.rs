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
                report(&lost.message);
            }
            failure
        }
    };
    report(&failure.message);
    ExitCode::from(failure.code)
}

/// Writes an error to stderr. One that says where in the spec it is
/// (`net.yaml:12:10: network big: ...`) starts with that place, as compilers write
/// them, for editors and scripts to find; any other starts with `error: `.
fn report(message: &str) {
    if starts_with_place(message) {
        eprintln!("{message}");
    } else {
        eprintln!("error: {message}");
    }
}

/// Whether `message` starts with `FILE:LINE:COLUMN: `.
fn starts_with_place(message: &str) -> bool {
    let Some((head, _)) = message.split_once(": ") else {
        return false;
    };
    let mut parts = head.rsplitn(3, ':');
    let number =
        |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    number(parts.next()) && number(parts.next()) && parts.next().is_some_and(|f| !f.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn places_in_the_spec_are_recognised() {
        use super::starts_with_place;
        assert!(starts_with_place(
            "net.yaml:12:10: network big: mtu 9000 does not fit"
        ));
        assert!(starts_with_place("/etc/ovl/a b.yaml:1:1: unknown field"));
        assert!(starts_with_place("<stdin>:3:5: duplicate vni"));
        assert!(!starts_with_place("cannot read net.yaml: No such file"));
        assert!(!starts_with_place("node a: its address 192.0.2.1:7946: x"));
        assert!(!starts_with_place("net.yaml:12: no column"));
        assert!(!starts_with_place("no place at all"));
    }
}
