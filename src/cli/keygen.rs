use std::path::PathBuf;

use clap::Args;

use ovl::identity::Identity;

use super::Failure;

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Where to write the private key (created with mode 0600, missing directories with
    /// 0700; never overwritten).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

pub fn run(args: &KeygenArgs) -> Result<(), Failure> {
    // A fresh node has no /etc/ovl-controller yet: make the missing directories, for
    // root only.
    if let Some(dir) = args.out.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Failure::runtime(format!("{}: {e}", dir.display())))?;
    }
    let id = Identity::generate().map_err(Failure::runtime)?;
    id.write(&args.out).map_err(|e| match e {
        // Refusing to overwrite an identity is about the invocation (exit 2).
        ovl::identity::IdentityError::Exists { .. } => Failure::input(e),
        e => Failure::runtime(e),
    })?;
    // The public key is the one output the operator needs (it goes into the spec): a
    // lost line is a failure, not a success with nothing to show.
    use std::io::Write as _;
    writeln!(std::io::stdout(), "{}", id.public.to_base64())
        .and_then(|()| std::io::stdout().flush())
        .map_err(|e| {
            Failure::runtime(format!(
                "the private key was written to {}, but its public key could not be printed \
                 ({e}); delete the file and run keygen again",
                args.out.display()
            ))
        })
}
