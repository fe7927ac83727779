use clap::Args;

use ovl::agent::{self, AgentConfig};

use super::{Common, Failure, SpecFile, load_spec_text};

#[derive(Args, Debug)]
pub struct AgentArgs {
    #[command(flatten)]
    pub spec: SpecFile,
    /// Serve Prometheus metrics on PORT (loopback) or IP:PORT; off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics_address: Option<String>,
}

pub fn run(common: &Common, args: &AgentArgs) -> Result<(), Failure> {
    let (spec, _, source) = load_spec_text(&args.spec.file)?;
    let metrics = match &args.metrics_address {
        Some(a) => Some(agent::metrics::parse_address(a).map_err(Failure::input)?),
        None => None,
    };
    let config = AgentConfig {
        spec,
        spec_source: source,
        node: common.node.clone(),
        state_dir: common.state_dir.clone(),
        socket: common.socket.clone(),
        key: common.key.clone(),
        metrics,
    };
    super::agent_runtime()?
        .block_on(agent::run(config))
        .map_err(|e| {
            if e.is_input_error() {
                Failure::input(e)
            } else {
                Failure::runtime(e)
            }
        })
}
