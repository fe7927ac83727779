use std::path::PathBuf;

use clap::Args;

use ovl::identity::Identity;

use super::Failure;

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Where to write the private key (created with mode 0600; never overwritten).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

pub fn run(args: &KeygenArgs) -> Result<(), Failure> {
    let id = Identity::generate().map_err(Failure::runtime)?;
    id.write(&args.out).map_err(Failure::runtime)?;
    println!("{}", id.public.to_base64());
    Ok(())
}
