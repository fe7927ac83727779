use super::{Failure, SpecFile, load_spec};

pub fn run(args: &SpecFile) -> Result<(), Failure> {
    let spec = load_spec(&args.file)?;
    let encrypted = spec.networks.iter().filter(|n| n.encrypted).count();
    println!(
        "{}: valid: cluster {}, {} nodes, {} networks ({} encrypted)",
        args.file.display(),
        spec.cluster.name,
        spec.nodes.len(),
        spec.networks.len(),
        encrypted
    );
    Ok(())
}
