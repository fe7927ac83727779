use clap::{Args, ValueEnum};

use ovl::kernel::Kernel;
use ovl::status::Status;

use super::{Common, Failure, runtime};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: Format,
}

pub fn run(_common: &Common, args: &StatusArgs) -> Result<(), Failure> {
    let state = runtime()?.block_on(async {
        let kernel = Kernel::connect().map_err(Failure::runtime)?;
        kernel.dump().await.map_err(Failure::runtime)
    })?;
    let status = Status::from_kernel(&state);
    match args.output {
        Format::Table => print!("{status}"),
        Format::Json => {
            let text = serde_json::to_string_pretty(&status)
                .map_err(|e| Failure::runtime(format!("cannot encode status: {e}")))?;
            println!("{text}");
        }
    }
    Ok(())
}
