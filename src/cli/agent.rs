use ovl::agent::{self, AgentConfig};

use super::{Common, Failure, SpecFile, load_spec_text};

pub fn run(common: &Common, args: &SpecFile) -> Result<(), Failure> {
    let (spec, _, source) = load_spec_text(&args.file)?;
    let config = AgentConfig {
        spec,
        spec_source: source,
        node: common.node.clone(),
        state_dir: common.state_dir.clone(),
        socket: common.socket.clone(),
        key: common.key.clone(),
    };
    super::runtime()?.block_on(agent::run(config)).map_err(|e| {
        if e.is_input_error() {
            Failure::input(e)
        } else {
            Failure::runtime(e)
        }
    })
}
