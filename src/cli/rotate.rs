use clap::Args;

use ovl::agent::api::{self, Request};

use super::progress::Terminal;
use super::{Common, Failure, runtime};

#[derive(Args, Debug)]
pub struct RotateArgs {
    /// Only the peers of this encrypted network.
    #[arg(long, value_name = "NAME")]
    pub network: Option<String>,
    /// Only this peer.
    #[arg(long, value_name = "NAME")]
    pub peer: Option<String>,
    /// How long to wait for every peer to switch to the new keys.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub timeout: u64,
}

pub fn run(common: &Common, args: &RotateArgs) -> Result<(), Failure> {
    let request = Request::Rotate {
        network: args.network.clone(),
        peer: args.peer.clone(),
        timeout_secs: args.timeout,
        node: common.node.clone(),
    };
    let mut terminal = Terminal::new();
    let answer = runtime()?.block_on(api::call(&common.socket, &request, &mut |p| {
        terminal.show(p)
    }));
    terminal.finish();
    let response = answer.map_err(Failure::runtime)?.ok_or_else(|| {
        Failure::runtime(format!(
            "no agent is running on {}: start `ovl-controller agent` first",
            common.socket.display()
        ))
    })?;
    out!("{}", response.output);
    match response.error {
        Some(e) => Err(Failure {
            code: response.code.max(1),
            message: e,
        }),
        None => Ok(()),
    }
}
