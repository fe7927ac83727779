use clap::{Args, ValueEnum};

use ovl::agent::api::{self, Request};
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

pub fn run(common: &Common, args: &StatusArgs) -> Result<(), Failure> {
    let status = runtime()?.block_on(async {
        // The agent knows sessions and keys; without one, the kernel's view alone.
        if let Some(r) = api::call(&common.socket, &Request::Status, &mut |_| {})
            .await
            .map_err(Failure::runtime)?
        {
            if let Some(e) = r.error {
                return Err(Failure {
                    code: r.code.max(1),
                    message: e,
                });
            }
            let status = serde_json::from_str::<Status>(&r.output).map_err(|e| {
                Failure::runtime(format!("the agent's status was not understood: {e}"))
            })?;
            // As `apply` does: a --node that is not the agent's is a mistake to report.
            if let (Some(want), Some(agent)) = (common.node.as_deref(), &status.agent)
                && agent.node != want
            {
                return Err(Failure::input(format!(
                    "this agent runs node {}, not {want}",
                    agent.node
                )));
            }
            return Ok(status);
        }
        let kernel = Kernel::connect_for_display().map_err(Failure::runtime)?;
        let (status, _) = ovl::status::read_kernel(&kernel)
            .await
            .map_err(Failure::runtime)?;
        Ok(status)
    })?;
    match args.output {
        Format::Table => out!("{status}"),
        Format::Json => {
            let text = serde_json::to_string_pretty(&status)
                .map_err(|e| Failure::runtime(format!("cannot encode status: {e}")))?;
            outln!("{text}");
        }
    }
    Ok(())
}
